"""Following the write leader: failover, switchover, split brain, read port, agent restarts.

Each test builds its own PostgreSQL 15 cluster (pg1 primary, pg2 and pg3 streaming replicas;
see cluster.py) and its own pgrelay with health_interval = 200ms, fall = 2, rise = 1, a
read-only port, pg1 as role = primary and pg2/pg3 as role = replica. What is asserted is
what a user relies on (pgrelay(8), pgrelay-agent(8), pgrelay.ini(5)):

  * after the primary dies and a replica is promoted, writes through pgrelay work again
    within seconds, and no write ever reaches a node in recovery;
  * a planned switchover (promote + ``set leader``) moves new sessions, closes idle sessions
    on the old leader with FATAL 57P01 "write leader changed", and lets an open transaction
    commit first;
  * the read port spreads sessions over the replicas and avoids a lagging one;
  * the agent can die without disturbing traffic or the epoch;
  * two primaries at once keep the current leader (SPLIT BRAIN logged);
  * no leader => 57P03, or a wait of no_leader_wait; close_all closes at once;
  * with no replica fit for reads, read_fallback = leader sends read sessions to the leader,
    none refuses them with FATAL 57P03;
  * max_replica_lag_seconds takes a paused replica out (and back after resume), but not
    replicas that keep up through a long write after an idle spell;
  * a replica that goes down loses its read sessions, new ones go to the other replica;
  * leader_change_grace: an open transaction on the old leader is closed when it runs out, a
    commit within it succeeds first;
  * set leader NODE force takes a node in recovery; show leader history records each change
    with its time, epoch and reason;
  * with health_interval = 10s, a promoted replica takes writes within seconds: a new session
    that cannot reach the dead leader, or finds no write leader, asks the agent to probe now.
"""

import collections
import datetime
import os
import re
import select
import signal
import subprocess
import threading
import time

import psycopg
import pytest

import loadgen
from cluster import (
    Cluster,
    admin,
    agent_kill9,
    destroy_relay,
    leader_history,
    log_lines,
    show_info,
    show_nodes,
    start_ha_relay,
    wait_probe_rounds,
)
from conftest import PG_BIN, RawClient, data_rows, error_fields, pid_alive, wait_for

AGENT = {"health_interval": "200ms", "fall": 2, "rise": 1, "health_timeout": "1s"}

pytestmark = pytest.mark.deadline(90)


# --------------------------------------------------------------------------- #
# fixtures and helpers
# --------------------------------------------------------------------------- #


@pytest.fixture
def make_cluster():
    made = []

    def make(**kw):
        c = Cluster.create(**kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.destroy()


@pytest.fixture
def ha_relay():
    """``ha_relay(cluster, **pgrelay_keys)``: pgrelay in front of the cluster, agent on."""
    started = []

    def start(cluster, agent=None, **extra):
        extra.setdefault("read_listen_port", "auto")
        extra.setdefault("workers", 2)
        extra.setdefault("no_leader_wait", "0")  # these tests see 57P03 at once (the default holds 5s)
        r = start_ha_relay(cluster, agent={**AGENT, **(agent or {})}, **extra)
        started.append(r)
        return r

    yield start
    for r in started:
        destroy_relay(r)


@pytest.fixture
def say(capsys):
    """Print a measurement so that it shows even without -s."""

    def out(msg):
        with capsys.disabled():
            print(f"\n    [failover] {msg}", flush=True)

    return out


def wait_replicas_readable(relay, names=("pg2", "pg3")):
    """Until the replicas are readable. Right after start a replica whose replay cannot be
    dated yet (nothing replayed since it started) has unknown lag until the leader's next
    sample, one health_interval later; tests about the steady state wait for it."""
    wait_for(lambda: all(show_nodes(relay)[n]["readable"] for n in names), timeout=15,
             what=f"{', '.join(names)} readable")


def raw_login(port, timeout=10.0, **params):
    """A RawClient logged in through pgrelay (AssertionError with the messages if not)."""
    c = RawClient(port, timeout=timeout)
    c.login(**params)
    return c


def raw_scalar(client, sql):
    msgs = client.simple_query(sql)
    err = error_fields(msgs)
    assert err is None, f"{sql}: {err}"
    return data_rows(msgs)[0][0]


def tx_status(msgs):
    """Transaction status byte of the last ReadyForQuery in msgs ('I', 'T', 'E')."""
    for mtype, body in reversed(msgs):
        if mtype == "Z":
            return body.decode()
    return None


def nothing_arrives(client, seconds):
    """True if nothing (no message, no close) arrives on the client within ``seconds``."""
    if client.buf:
        return False
    r, _, _ = select.select([client.sock], [], [], seconds)
    return not r


def closing_error(client, timeout=5.0):
    """Read until the peer closes; the fields of the ErrorResponse that preceded the close."""
    client.sock.settimeout(timeout)
    msgs = client.read_to_eof()
    fields = error_fields(msgs)
    assert fields is not None, f"connection closed without an ErrorResponse: {msgs!r}"
    return fields


def promote_then_set_leader(relay, node):
    """Promote ``node`` while the leader still runs (pgrelay keeps the leader and logs the split
    brain), then switch to it with the console's ``set leader``; the time it was set."""
    node.promote()
    wait_log(relay, "SPLIT BRAIN", timeout=5)
    t_set = time.monotonic()
    out = admin(relay, f"set leader {node.name}")
    assert not out.startswith("error"), out
    return t_set


def assert_closed_for_leader_change(fields):
    assert fields.get("C") == "57P01" and "write leader changed" in fields.get("M", ""), fields


def write_port_of_new_session(relay):
    with relay.connect(connect_timeout=5) as c:
        return c.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()


def read_conn(relay):
    return psycopg.connect(relay.conninfo(port=relay.read_port, connect_timeout=5),
                           autocommit=True)


def wait_log(relay, needle, timeout=10.0):
    return wait_for(lambda: log_lines(relay, needle), timeout=timeout, interval=0.05,
                    what=f"pgrelay log line containing {needle!r}")


class Writer(loadgen.Writer):
    """Inserts one row per statement through pgrelay's write port, reconnecting after any
    error; ok: (seq, t_sent, t_done, port, in_recovery), errors: (seq, t, sqlstate, line)."""

    def __init__(self, relay, pause=0.01):
        def insert(conn, seq):
            return conn.execute(
                "INSERT INTO ft (seq) VALUES (%s) RETURNING inet_server_port(),"
                " pg_is_in_recovery()",
                (seq,),
            ).fetchone()

        super().__init__(relay, insert, pause=pause, connect_timeout=3, application_name="writer")

    def first_ok_on(self, port, after=0.0):
        for seq, t, done, p, rec in self.ok:
            if p == port and done >= after:
                return done
        return None


def error_summary(errors):
    c = collections.Counter((st, re.sub(r"\d+", "N", line)[:90]) for _, _, st, line in errors)
    return "; ".join(f"{n}x [{st}] {line}" for (st, line), n in c.most_common())


# --------------------------------------------------------------------------- #
# 1. failover
# --------------------------------------------------------------------------- #


def test_failover_writes_move_to_the_promoted_replica_and_never_reach_a_replica(
    make_cluster, ha_relay, say
):
    # pg1 commits synchronously to pg2: a commit a client saw succeed must survive on pg2
    # (with asynchronous replication a failover may lose commits; that is not pgrelay's doing)
    c = make_cluster(sync_standby="pg2")
    pg1, pg2, pg3 = c.nodes
    pg1.query(
        "CREATE TABLE ft (seq int PRIMARY KEY, port int NOT NULL DEFAULT inet_server_port(),"
        " in_rec bool NOT NULL DEFAULT pg_is_in_recovery(), at timestamptz DEFAULT"
        " clock_timestamp())"
    )
    relay = ha_relay(c)
    writer = Writer(relay)
    writer.start()
    try:
        wait_for(lambda: len(writer.ok) >= 20, timeout=10, what="20 writes through pgrelay")
        t_kill = time.monotonic()
        pg1.stop("immediate")
        t_promote = time.monotonic()
        pg2.promote()
        t_promoted = time.monotonic()
        first = wait_for(
            lambda: writer.first_ok_on(pg2.port), timeout=15, interval=0.01,
            what=f"a write through pgrelay to succeed on pg2 (errors: "
                 f"{error_summary(writer.errors)})",
        )
        time.sleep(1.0)  # keep writing on the new leader for a while
    finally:
        writer.stop()

    say(
        f"failover: pg_ctl stop -m immediate took {t_promote - t_kill:.3f}s, pg_promote()"
        f" {t_promoted - t_promote:.3f}s; first write on the new primary"
        f" {first - t_promote:.3f}s after pg_promote() was called"
        f" ({first - t_kill:.3f}s after the kill); {len(writer.ok)} writes ok,"
        f" {len(writer.errors)} failed: {error_summary(writer.errors)}"
    )
    assert first - t_promote <= 5.0, f"writes resumed only {first - t_promote:.3f}s after promote"

    # no write reached a node in recovery: none was refused as read-only, none said recovery
    read_only = [e for e in writer.errors if e[2] == "25006" or "read-only" in e[3]]
    assert not read_only, f"writes were sent to a node in recovery: {read_only[:5]}"
    assert all(rec is False for *_, rec in writer.ok), "an INSERT returned pg_is_in_recovery()=t"
    assert {p for *_, p, _ in writer.ok} <= {pg1.port, pg2.port}, writer.ok
    # once the new leader took a write, nothing went to the old one
    after = [o for o in writer.ok if o[2] > first]
    assert after and all(o[3] == pg2.port for o in after), after[:5]
    assert show_info(relay)["write_leader"] == "pg2"

    # every committed row is on the new primary; no node holds a row written in recovery
    on_pg2 = {seq: (port, rec) for seq, port, rec in pg2.query("SELECT seq, port, in_rec FROM ft")}
    missing = [o[0] for o in writer.ok if o[0] not in on_pg2]
    assert not missing, f"{len(missing)} committed rows are not on the new primary: {missing[:10]}"
    for seq, _, _, port, _ in writer.ok:
        assert on_pg2[seq][0] == port
    for node in (pg2, pg3):
        bad = node.query("SELECT seq, port FROM ft WHERE in_rec OR port NOT IN (%s, %s)",
                         (pg1.port, pg2.port))
        assert bad == [], f"{node.name} holds rows written on a node in recovery: {bad[:5]}"
    assert pg3.query("SELECT count(*) FROM ft WHERE port = %s", (pg2.port,))[0][0] == 0


# --------------------------------------------------------------------------- #
# 2. planned switchover under load
# --------------------------------------------------------------------------- #


def parse_pgbench(out):
    """What pgbench (PG 15) reported: transactions processed and failed, the clients that
    aborted, and the server errors it printed (FATAL/ERROR lines, standalone or inline)."""

    def num(pattern):
        m = re.search(pattern, out)
        return int(m.group(1)) if m else None

    errors = re.findall(r"(?:FATAL|ERROR):\s+(.*)", out)
    return {
        "processed": num(r"number of transactions actually processed: (\d+)"),
        "failed": num(r"number of failed transactions: (\d+)"),
        "aborted": sorted({int(n) for n in re.findall(r"client (\d+) (?:script \d+ )?aborted", out)}),
        "errors": errors,
        "leader_changed": sum("write leader changed" in e for e in errors),
        "run_aborted": "Run was aborted" in out,
    }


def test_planned_switchover_under_pgbench(make_cluster, ha_relay, say):
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    r = subprocess.run(
        [f"{PG_BIN}/pgbench", "-i", "-s", "1", "-q", "-h", pg1.host, "-p", str(pg1.port),
         "-U", "postgres", "postgres"],
        capture_output=True, text=True, timeout=60,
    )
    assert r.returncode == 0, r.stderr
    pg1.query("CREATE TABLE sw (id int)")
    c.wait_caught_up(pg2)
    relay = ha_relay(c, leader_change_grace="10s")

    bench = subprocess.Popen(
        [f"{PG_BIN}/pgbench", "-n", "-c", "8", "-j", "2", "-T", "10", "-M", "simple",
         "-h", "127.0.0.1", "-p", str(relay.port), "-U", "postgres", "postgres"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        time.sleep(2.0)
        assert bench.poll() is None, bench.communicate()[0]
        idle = [raw_login(relay.port) for _ in range(3)]
        for s in idle:
            assert int(raw_scalar(s, "SELECT inet_server_port()")) == pg1.port
        tx = raw_login(relay.port)
        tx.simple_query("BEGIN")
        msgs = tx.simple_query("INSERT INTO sw VALUES (1)")
        assert error_fields(msgs) is None and tx_status(msgs) == "T", msgs
        epoch0 = show_info(relay)["epoch"]
        hist0 = leader_history(relay)

        # promote pg2 while pg1 runs: two primaries, pgrelay keeps pg1
        pg2.promote()
        wait_log(relay, "SPLIT BRAIN", timeout=5)
        info = show_info(relay)
        assert (info["write_leader"], info["epoch"]) == ("pg1", epoch0), info
        assert leader_history(relay) == hist0

        t_set = time.monotonic()
        out = admin(relay, "set leader pg2")
        assert not out.startswith("error"), out
        info = wait_for(
            lambda: (i := show_info(relay))["write_leader"] == "pg2" and i,
            timeout=5, interval=0.02, what="show info to name pg2 the write leader",
        )
        t_leader = time.monotonic()
        assert info["epoch"] > epoch0, info
        hist = leader_history(relay)
        assert hist[0]["to"] == "pg2" and hist[0]["from"] == "pg1", hist
        assert hist[0]["epoch"] == info["epoch"], hist

        # new sessions go to pg2
        for _ in range(3):
            port, rec = write_port_of_new_session(relay)
            assert (port, rec) == (pg2.port, False)

        # idle sessions on pg1: FATAL 57P01 "write leader changed", then closed
        for s in idle:
            f = closing_error(s, timeout=5)
            assert f.get("S") == "FATAL" and f.get("C") == "57P01", f
            assert "write leader changed" in f.get("M", ""), f
        t_idle_closed = time.monotonic()

        # the open transaction on pg1 goes on and commits; the session is closed after it
        assert nothing_arrives(tx, 0.5), "a session inside a transaction was closed at once"
        msgs = tx.simple_query("COMMIT")
        assert error_fields(msgs) is None, msgs
        assert ("C", b"COMMIT\0") in msgs and tx_status(msgs) == "I", msgs
        f = closing_error(tx, timeout=5)
        assert f.get("C") == "57P01" and "write leader changed" in f.get("M", ""), f
        assert pg1.query("SELECT count(*) FROM sw")[0][0] == 1  # the commit happened on pg1

        out, _ = bench.communicate(timeout=30)
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.communicate()

    p = parse_pgbench(out)
    say(
        f"switchover: set leader -> show info names pg2 in {t_leader - t_set:.3f}s, idle"
        f" sessions closed within {t_idle_closed - t_set:.3f}s; pgbench exit {bench.returncode}:"
        f" processed={p['processed']} failed={p['failed']} aborted clients={len(p['aborted'])}"
        f" {p['aborted']}; server errors: {collections.Counter(p['errors'])}"
    )
    assert p["processed"] and p["processed"] > 0, out
    assert p["failed"] == 0, f"pgbench counted failed transactions:\n{out}"
    # every client that stopped was stopped by the documented FATAL 57P01 leader-change close
    others = [e for e in p["errors"] if "write leader changed" not in e]
    assert not others, f"pgbench saw errors other than the leader-change close:\n{out}"
    assert p["leader_changed"] >= len(p["aborted"]), out
    assert bench.returncode == 0 or p["run_aborted"], out


# --------------------------------------------------------------------------- #
# 3. read port
# --------------------------------------------------------------------------- #


def test_read_port_spreads_sessions_and_avoids_a_lagging_replica(make_cluster, ha_relay, say):
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE walgen (id int, pad text)")
    relay = ha_relay(c, max_replica_lag_bytes=100000, leader_change_grace="10s")
    wait_replicas_readable(relay)

    # 20 sessions held open at once: spread over both replicas, none on the primary
    conns = [read_conn(relay) for _ in range(20)]
    try:
        dist = collections.Counter(
            cn.execute("SELECT inet_server_port()").fetchone()[0] for cn in conns
        )
    finally:
        for cn in conns:
            cn.close()
    say(f"read port, 20 sessions: pg2={dist[pg2.port]} pg3={dist[pg3.port]} pg1={dist[pg1.port]}")
    assert dist[pg1.port] == 0, dist
    assert abs(dist[pg2.port] - dist[pg3.port]) <= 2, dist
    wait_for(lambda: all(n["read_sessions"] == 0 for n in show_nodes(relay).values()),
             timeout=5, what="read session counts back to 0")

    # sessions held on both replicas; one on pg3 inside a (read-only) transaction
    held = [raw_login(relay.read_port) for _ in range(6)]
    by_node = collections.defaultdict(list)
    for s in held:
        by_node[int(raw_scalar(s, "SELECT inet_server_port()"))].append(s)
    assert len(by_node[pg2.port]) == 3 and len(by_node[pg3.port]) == 3, dict(by_node)
    pg3_idle = by_node[pg3.port][:2]
    pg3_tx = by_node[pg3.port][2]
    msgs = pg3_tx.simple_query("BEGIN; SELECT 1")
    assert tx_status(msgs) == "T", msgs

    pg3.pause_replay()
    # WAL in ~16 kB steps, ~160 kB/s: less than max_replica_lag_bytes per health_interval, so
    # that pg2, which keeps up, stays readable (faster writes: see the test after this one)
    with relay.connect() as w:
        deadline = time.monotonic() + 20
        while show_nodes(relay)["pg3"]["readable"]:
            assert time.monotonic() < deadline, show_nodes(relay)
            w.execute("INSERT INTO walgen SELECT g, repeat('x', 100) FROM generate_series(1, 50) g")
            time.sleep(0.1)
    nodes = show_nodes(relay)
    say(f"pg3 paused: lag_bytes={nodes['pg3']['lag_bytes']} readable={nodes['pg3']['readable']};"
        f" pg2 lag_bytes={nodes['pg2']['lag_bytes']} readable={nodes['pg2']['readable']}")
    assert nodes["pg3"]["lag_bytes"] > 100000, nodes["pg3"]
    assert nodes["pg2"]["readable"] is True, nodes["pg2"]

    # idle read sessions on pg3 are closed; the one in a transaction at its end
    for s in pg3_idle:
        f = closing_error(s, timeout=5)
        assert f.get("C") == "57P01" and "pg3" in f.get("M", ""), f
    assert nothing_arrives(pg3_tx, 0.3), "a read session inside a transaction was closed at once"
    msgs = pg3_tx.simple_query("COMMIT")
    assert error_fields(msgs) is None and tx_status(msgs) == "I", msgs
    f = closing_error(pg3_tx, timeout=5)
    assert f.get("C") == "57P01", f
    # sessions on pg2 are untouched
    for s in by_node[pg2.port]:
        assert int(raw_scalar(s, "SELECT inet_server_port()")) == pg2.port

    # new read sessions all go to pg2 while pg3 lags
    extra = [read_conn(relay) for _ in range(4)]
    ports = [cn.execute("SELECT inet_server_port()").fetchone()[0] for cn in extra]
    assert ports == [pg2.port] * 4, ports

    # caught up again: pg3 takes sessions (it has the fewest)
    pg3.resume_replay()
    wait_for(lambda: show_nodes(relay)["pg3"]["readable"], timeout=15, interval=0.05,
             what="pg3 readable again after pg_wal_replay_resume()")
    more = [read_conn(relay) for _ in range(4)]
    ports = [cn.execute("SELECT inet_server_port()").fetchone()[0] for cn in more]
    say(f"after resume, 4 new read sessions went to {ports} (pg3={pg3.port})")
    assert ports.count(pg3.port) >= 3 and ports[0] == pg3.port, ports
    for cn in extra + more:
        cn.close()
    for s in by_node[pg2.port]:
        s.close()


def test_read_sessions_on_replicas_that_keep_up_survive_steady_writes(
    make_cluster, ha_relay, say
):
    """Replicas replaying within a few kB of the primary stay readable under a steady write
    load, so their read sessions are not closed. The load (~0.6 MB/s) writes more than
    max_replica_lag_bytes (100000) per health_interval (200ms), but each replica's real
    lag, measured directly, stays far below the limit."""
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE walgen (id int, pad text)")
    relay = ha_relay(c, max_replica_lag_bytes=100000)
    wait_replicas_readable(relay)
    held = [raw_login(relay.read_port) for _ in range(4)]
    ports = sorted(int(raw_scalar(s, "SELECT inet_server_port()")) for s in held)
    assert ports == sorted([pg2.port, pg2.port, pg3.port, pg3.port]), ports

    real_lag = {"pg2": 0, "pg3": 0}
    unreadable = collections.Counter()
    done = threading.Event()
    wal = {"bytes": 0}

    def load():
        with relay.connect() as w:
            start = w.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            while not done.is_set():
                w.execute("INSERT INTO walgen SELECT g, repeat('x', 100)"
                          " FROM generate_series(1, 100) g")
                time.sleep(0.02)
            wal["bytes"] = w.execute("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)",
                                     (str(start),)).fetchone()[0]

    loader = threading.Thread(target=load, daemon=True)
    t0 = time.monotonic()
    loader.start()
    with pg1.connect() as d1, pg2.connect() as d2, pg3.connect() as d3:
        while time.monotonic() < t0 + 3.0:
            # real lag: the primary's position first, then each replica's replay position
            lsn = d1.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
            for name, d in (("pg2", d2), ("pg3", d3)):
                lag = d.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn())",
                                (str(lsn),)).fetchone()[0]
                real_lag[name] = max(real_lag[name], int(lag))
            for name, n in show_nodes(relay).items():
                if name != "pg1" and not n["readable"]:
                    unreadable[(name, n["lag_bytes"])] += 1
            time.sleep(0.01)
    done.set()
    loader.join(10)
    rate = float(wal["bytes"]) / (time.monotonic() - t0)
    closed = []
    for s in held:
        msgs = s.simple_query("SELECT inet_server_port()")
        if error_fields(msgs):
            closed.append(error_fields(msgs).get("M"))
    say(f"steady writes at {rate / 1e6:.2f} MB/s: max real replay lag pg2={real_lag['pg2']} pg3={real_lag['pg3']} bytes;"
        f" show nodes said readable=no {sum(unreadable.values())} times"
        f" {dict(unreadable)}; read sessions closed: {len(closed)} {closed[:2]}")
    assert max(real_lag.values()) < 100000, real_lag  # the replicas do keep up
    assert not closed, (
        f"read sessions on replicas that keep up were closed: {closed}; show nodes lag seen:"
        f" {dict(unreadable)}"
    )
    assert not unreadable, f"show nodes marked replicas that keep up unreadable: {dict(unreadable)}"


# --------------------------------------------------------------------------- #
# 4. agent killed
# --------------------------------------------------------------------------- #


def test_agent_kill9_is_restarted_without_disturbing_traffic_or_the_epoch(
    make_cluster, ha_relay, say
):
    c = make_cluster()
    pg1 = c.primary
    relay = ha_relay(c)
    before = show_info(relay)
    hist0 = leader_history(relay)
    held = relay.connect()
    held.execute("CREATE TABLE ak (n int)")

    old = agent_kill9(relay)
    assert old
    # meanwhile: the held session and new sessions work
    held.execute("INSERT INTO ak VALUES (1)")
    assert write_port_of_new_session(relay) == (pg1.port, False)

    t0 = time.monotonic()
    new = wait_for(lambda: (p := relay.agent_pid()) and p != old and p, timeout=15,
                   what="the master to restart the agent")
    say(f"agent {old} killed; new agent pid {new} after {time.monotonic() - t0:.3f}s")
    assert not pid_alive(old)
    wait_probe_rounds(relay)  # of the new agent
    assert relay.agent_pid() == new
    for i in range(5):
        held.execute("INSERT INTO ak VALUES (%s)", (i,))
        assert write_port_of_new_session(relay) == (pg1.port, False)
    after = show_info(relay)
    assert after["epoch"] == before["epoch"], (before, after)
    assert after["write_leader"] == "pg1" and after["agent"] == new, after
    assert leader_history(relay) == hist0
    assert pg1.query("SELECT count(*) FROM ak")[0][0] == 6
    held.close()


# --------------------------------------------------------------------------- #
# 5. two primaries at once
# --------------------------------------------------------------------------- #


def test_split_brain_keeps_the_current_leader(make_cluster, ha_relay, say):
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE sb (port int)")
    c.wait_caught_up(pg2)
    relay = ha_relay(c)
    held = relay.connect()
    info0 = show_info(relay)
    hist0 = leader_history(relay)

    pg2.promote()
    line = wait_log(relay, "SPLIT BRAIN", timeout=5)
    say(f"log: {line[0]}")
    assert "pg2" in line[0]
    wait_probe_rounds(relay)  # with two primaries

    for _ in range(5):
        with relay.connect() as w:
            port, rec = w.execute(
                "INSERT INTO sb VALUES (inet_server_port()) RETURNING port, pg_is_in_recovery()"
            ).fetchone()
            assert (port, rec) == (pg1.port, False)
    held.execute("INSERT INTO sb VALUES (inet_server_port())")
    assert pg1.query("SELECT count(*) FROM sb WHERE port = %s", (pg1.port,))[0][0] == 6
    assert pg2.query("SELECT count(*) FROM sb")[0][0] == 0
    info = show_info(relay)
    assert (info["write_leader"], info["epoch"]) == ("pg1", info0["epoch"]), info
    assert leader_history(relay) == hist0

    # set leader to a node in recovery: refused without force
    out = admin(relay, "set leader pg3")
    say(f"set leader pg3 -> {out.strip()}")
    assert out.startswith("error:") and "recovery" in out, out
    wait_probe_rounds(relay, rounds=2)
    info = show_info(relay)
    assert (info["write_leader"], info["epoch"]) == ("pg1", info0["epoch"]), info
    assert leader_history(relay) == hist0
    held.close()


# --------------------------------------------------------------------------- #
# 6. no leader at all
# --------------------------------------------------------------------------- #


def test_leader_gone_without_replacement_gives_57P03_then_recovers(make_cluster, ha_relay, say):
    c = make_cluster()
    pg1 = c.primary
    relay = ha_relay(c)
    assert write_port_of_new_session(relay) == (pg1.port, False)

    t0 = time.monotonic()
    pg1.stop("immediate")
    seen = []

    def refused_57p03():
        with RawClient(relay.port, timeout=5) as cl:
            cl.send_startup()
            f = error_fields(cl.read_until("ZE"))
        seen.append(f and f.get("C"))
        return f if f and f.get("C") == "57P03" else None

    f = wait_for(refused_57p03, timeout=5, interval=0.1, what="FATAL 57P03 for a new session")
    t57 = time.monotonic() - t0
    say(f"no leader: 57P03 {t57:.3f}s after the primary stopped (before that: "
        f"{collections.Counter(seen)}); message: {f.get('M')}")
    assert f.get("S") == "FATAL" and "no write leader" in f.get("M", ""), f
    assert show_info(relay)["write_leader"] is None

    t1 = time.monotonic()
    pg1.start()

    def writes():
        try:
            with relay.connect(connect_timeout=3) as w:
                w.execute("CREATE TABLE IF NOT EXISTS back (n int)")
                return w.execute("INSERT INTO back VALUES (1) RETURNING inet_server_port(),"
                                 " pg_is_in_recovery()").fetchone()
        except psycopg.Error:
            return None

    row = wait_for(writes, timeout=10, interval=0.1, what="writes through pgrelay after restart")
    say(f"old primary restarted: writes work {time.monotonic() - t1:.3f}s after pg_ctl start")
    assert row == (pg1.port, False)
    assert show_info(relay)["write_leader"] == "pg1"


def test_a_slow_leader_is_kept_while_no_other_node_is_primary(make_cluster, ha_relay, say):
    """Probes that only time out (a loaded primary) must not cost every session. The
    postmaster and the agent's monitoring backend are stopped (SIGSTOP): the agent's probes
    and reconnects hang as on an overloaded host, while established sessions keep working."""
    c = make_cluster()
    pg1 = c.primary
    relay = ha_relay(c, agent={"health_timeout": "300ms"})
    epoch = show_info(relay)["epoch"]
    app = relay.connect()
    assert app.execute("SELECT inet_server_port()").fetchone()[0] == pg1.port
    monitor = wait_for(lambda: pg1.scalar(
        "SELECT pid FROM pg_stat_activity WHERE application_name = 'pgrelay-agent'"),
        timeout=5, what="the agent's monitoring backend on pg1")
    with open(os.path.join(pg1.pgdata, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    os.kill(postmaster, signal.SIGSTOP)
    os.kill(monitor, signal.SIGSTOP)
    try:
        wait_for(lambda: show_nodes(relay)["pg1"]["health"] == "down", timeout=10,
                 what="pg1 marked down by timed-out probes")
        wait_log(relay, "no other node is primary, so it stays the leader")
        info = show_info(relay)
        say(f"slow leader: still {info['write_leader']}, epoch {info['epoch']}")
        assert info["write_leader"] == "pg1" and info["epoch"] == epoch
        assert app.execute("SELECT 1").fetchone()[0] == 1, "a live session was disturbed"
    finally:
        os.kill(monitor, signal.SIGCONT)
        os.kill(postmaster, signal.SIGCONT)
    wait_for(lambda: show_nodes(relay)["pg1"]["health"] == "up", timeout=10,
             what="pg1 up again once it answers")
    assert write_port_of_new_session(relay) == (pg1.port, False)
    assert show_info(relay)["epoch"] == epoch
    app.close()


# --------------------------------------------------------------------------- #
# 7. no_leader_wait
# --------------------------------------------------------------------------- #


def test_no_leader_wait_holds_a_new_session_until_the_primary_is_back(
    make_cluster, ha_relay, say
):
    c = make_cluster()
    pg1 = c.primary
    relay = ha_relay(c, no_leader_wait="5s")
    pg1.stop("immediate")
    wait_for(lambda: show_info(relay)["write_leader"] is None, timeout=5, interval=0.05,
             what="pgrelay to see no write leader")

    result = {}

    def session():
        t = time.monotonic()
        try:
            with RawClient(relay.port, timeout=15) as cl:
                cl.send_startup()
                msgs = cl.read_until("ZE")
                result["login"] = msgs
                if msgs and msgs[-1][0] == "Z":
                    result["row"] = data_rows(
                        cl.simple_query("SELECT inet_server_port(), pg_is_in_recovery()")
                    )
        except Exception as e:  # reported below
            result["exc"] = repr(e)
        result["elapsed"] = time.monotonic() - t

    th = threading.Thread(target=session, daemon=True)
    t0 = time.monotonic()
    th.start()
    time.sleep(1.0)
    assert th.is_alive(), f"the session did not wait for a leader: {result}"
    pg1.start()
    th.join(10)
    assert not th.is_alive()
    say(f"no_leader_wait: held session completed after {result.get('elapsed', -1):.3f}s"
        f" (primary restarted {time.monotonic() - t0:.3f}s ago)")
    assert "exc" not in result, result
    assert error_fields(result["login"]) is None, error_fields(result["login"])
    assert result["row"] == [(str(pg1.port), "f")], result
    assert result["elapsed"] < 5.5, result


# --------------------------------------------------------------------------- #
# 8. on_leader_change = close_all
# --------------------------------------------------------------------------- #


def test_close_all_closes_a_session_inside_a_transaction_at_once(make_cluster, ha_relay, say):
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    relay = ha_relay(c, on_leader_change="close_all", leader_change_grace="30s")
    tx = raw_login(relay.port)
    msgs = tx.simple_query("BEGIN; SELECT 1")
    assert tx_status(msgs) == "T", msgs
    idle = raw_login(relay.port)

    t0 = promote_then_set_leader(relay, pg2)
    f = closing_error(tx, timeout=5)
    dt = time.monotonic() - t0
    say(f"close_all: session inside a transaction closed {dt:.3f}s after set leader")
    assert_closed_for_leader_change(f)
    assert dt < 2.0, f"closed only after {dt:.3f}s (leader_change_grace is 30s)"
    f = closing_error(idle, timeout=2)
    assert f.get("C") == "57P01", f
    assert write_port_of_new_session(relay) == (pg2.port, False)


# --------------------------------------------------------------------------- #
# 9. read_fallback: no replica qualifies
# --------------------------------------------------------------------------- #


def read_port_of_new_session(relay):
    with read_conn(relay) as cn:
        return cn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()


def read_login(relay, timeout=5.0):
    """Log in on the read port; the messages up to ReadyForQuery or the ErrorResponse."""
    with RawClient(relay.read_port, timeout=timeout) as cl:
        cl.send_startup()
        return cl.read_until("ZE")


@pytest.mark.parametrize("fallback", ["leader", "none"])
def test_read_fallback_when_no_replica_qualifies(make_cluster, ha_relay, say, fallback):
    """Both replicas paused past max_replica_lag_bytes: read sessions go to the leader
    (read_fallback = leader) or get FATAL 57P03 (read_fallback = none), pgrelay.ini(5)."""
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE walgen (id int, pad text)")
    relay = ha_relay(c, read_fallback=fallback, max_replica_lag_bytes=100000)
    port, rec = read_port_of_new_session(relay)
    assert port in (pg2.port, pg3.port) and rec is True, (port, rec)

    for r in (pg2, pg3):
        r.pause_replay()
    pg1.query("INSERT INTO walgen SELECT g, repeat('x', 100) FROM generate_series(1, 5000) g")
    wait_for(lambda: not any(n["readable"] for n in show_nodes(relay).values()), timeout=10,
             interval=0.05, what="both paused replicas unreadable (lag past 100000 bytes)")
    nodes = show_nodes(relay)
    assert nodes["pg2"]["health"] == nodes["pg3"]["health"] == "up", nodes

    if fallback == "leader":
        held = [read_conn(relay) for _ in range(3)]
        rows = [cn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
                for cn in held]
        say(f"read_fallback = leader: 3 read sessions went to {rows} (pg1={pg1.port})")
        assert rows == [(pg1.port, False)] * 3, rows
        assert show_nodes(relay)["pg1"]["read_sessions"] == 3, show_nodes(relay)
        for cn in held:
            cn.close()
    else:
        for _ in range(3):
            msgs = read_login(relay)
            f = error_fields(msgs)
            assert f is not None and msgs[-1][0] == "E", f"a read session was let in: {msgs!r}"
            assert f.get("S") == "FATAL" and f.get("C") == "57P03", f
            assert "no replica" in f.get("M", ""), f
        say(f"read_fallback = none: FATAL {f.get('C')} {f.get('M')!r}")
        assert show_nodes(relay)["pg1"]["read_sessions"] == 0, show_nodes(relay)
        # the write port is not affected
        assert write_port_of_new_session(relay) == (pg1.port, False)

    # replicas that catch up qualify again, whatever the fallback
    for r in (pg2, pg3):
        r.resume_replay()
    wait_for(lambda: (n := show_nodes(relay))["pg2"]["readable"] and n["pg3"]["readable"],
             timeout=15, interval=0.05, what="both replicas readable after resume")
    for _ in range(2):
        port, rec = read_port_of_new_session(relay)
        assert port in (pg2.port, pg3.port) and rec is True, (port, rec)


# --------------------------------------------------------------------------- #
# 10. max_replica_lag_seconds
# --------------------------------------------------------------------------- #


class Ticker(threading.Thread):
    """Commits a small transaction on the primary every ``pause`` seconds (direct, not
    through pgrelay), so that a replica that replays keeps a recent last-replayed commit."""

    def __init__(self, node, pause=0.05):
        super().__init__(daemon=True)
        self.node = node
        self.pause = pause
        self.stop_flag = threading.Event()
        self.commits = 0
        self.error = None

    def run(self):
        try:
            with self.node.connect() as cn:
                while not self.stop_flag.is_set():
                    cn.execute("INSERT INTO ticks VALUES (clock_timestamp())")
                    self.commits += 1
                    time.sleep(self.pause)
        except psycopg.Error as e:
            self.error = e

    def stop(self):
        self.stop_flag.set()
        self.join(10)


def test_max_replica_lag_seconds_takes_a_paused_replica_out_until_it_resumes(
    make_cluster, ha_relay, say
):
    """A replica whose replay is paused while the primary keeps committing is unfit for reads
    once its last replayed transaction is older than max_replica_lag_seconds (here 2s, with
    the byte limit at its default 16 MB, far from reached): no new read sessions, its idle
    read sessions closed; after pg_wal_replay_resume() it qualifies again."""
    limit = 2.0
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE ticks (at timestamptz)")
    ticker = Ticker(pg1)
    ticker.start()  # before pgrelay starts: no replica ever looks idle-then-behind
    try:
        relay = ha_relay(c, read_fallback="none", max_replica_lag_seconds="2s")
        held = [raw_login(relay.read_port) for _ in range(2)]
        by_port = {int(raw_scalar(s, "SELECT inet_server_port()")): s for s in held}
        assert set(by_port) == {pg2.port, pg3.port}, by_port

        c.wait_caught_up(pg3)
        t_pause = time.monotonic()
        pg3.pause_replay()
        seen = []  # (seconds after the pause, pg3 readable, pg3 lag_ms, pg2 readable)

        def pg3_out():
            n = show_nodes(relay)
            seen.append((time.monotonic() - t_pause, n["pg3"]["readable"], n["pg3"]["lag_ms"],
                         n["pg2"]["readable"]))
            return not n["pg3"]["readable"] and n

        nodes = wait_for(pg3_out, timeout=15, interval=0.05,
                         what="pg3 unreadable with replay paused past max_replica_lag_seconds")
        t_out = seen[-1][0]
        last_in = max((t for t, r, _, _ in seen if r), default=None)
        say(f"lag seconds: pg3 unreadable {t_out:.3f}s after pg_wal_replay_pause()"
            f" (limit {limit}s; last seen readable at {last_in}) with lag_ms="
            f"{nodes['pg3']['lag_ms']} lag_bytes={nodes['pg3']['lag_bytes']};"
            f" {ticker.commits} commits so far")
        assert ticker.error is None, ticker.error
        # it is the time limit that took it out: not before ~2s, and not the byte limit
        assert t_out >= limit - 0.5, seen
        assert nodes["pg3"]["lag_ms"] >= limit * 1000, nodes["pg3"]
        assert 0 < nodes["pg3"]["lag_bytes"] < 16777216, nodes["pg3"]
        assert nodes["pg3"]["health"] == "up", nodes["pg3"]
        assert nodes["pg2"]["readable"] is True, nodes["pg2"]

        # its idle read session is closed; the one on pg2 goes on
        f = closing_error(by_port[pg3.port], timeout=5)
        assert f.get("C") == "57P01" and "pg3" in f.get("M", ""), f
        assert int(raw_scalar(by_port[pg2.port], "SELECT inet_server_port()")) == pg2.port
        # new read sessions all go to pg2
        extra = [read_conn(relay) for _ in range(4)]
        ports = [cn.execute("SELECT inet_server_port()").fetchone()[0] for cn in extra]
        assert ports == [pg2.port] * 4, ports

        # resumed: pg3 catches up and qualifies again; it has the fewest sessions
        t_resume = time.monotonic()
        pg3.resume_replay()
        wait_for(lambda: show_nodes(relay)["pg3"]["readable"], timeout=15, interval=0.05,
                 what="pg3 readable again after pg_wal_replay_resume()")
        say(f"pg3 readable again {time.monotonic() - t_resume:.3f}s after the resume")
        more = [read_conn(relay) for _ in range(2)]
        ports = [cn.execute("SELECT inet_server_port()").fetchone()[0] for cn in more]
        assert ports == [pg3.port] * 2, ports
        for cn in extra + more:
            cn.close()
        by_port[pg2.port].close()
    finally:
        ticker.stop()
    assert ticker.error is None, ticker.error


def test_replicas_that_keep_up_stay_readable_through_a_long_write_after_an_idle_spell(
    make_cluster, ha_relay, say
):
    """The primary is idle for longer than max_replica_lag_seconds (nothing to replay, so no
    lag), then one long transaction writes WAL for a while. The replicas stream and replay it
    as it comes (their real lag, measured directly, stays small), so they stay readable and
    their read sessions stay open: the age of their last replayed commit is not lag."""
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE walgen (id int, pad text)")
    relay = ha_relay(c, max_replica_lag_seconds="2s")
    wait_replicas_readable(relay)
    held = [raw_login(relay.read_port) for _ in range(4)]
    ports = sorted(int(raw_scalar(s, "SELECT inet_server_port()")) for s in held)
    assert ports == sorted([pg2.port, pg2.port, pg3.port, pg3.port]), ports
    time.sleep(2.5)  # idle: the last commit the replicas replayed gets older than 2s

    unreadable = collections.Counter()
    real_lag = {"pg2": 0, "pg3": 0}
    with pg1.connect() as w, pg2.connect() as d2, pg3.connect() as d3:
        w.execute("BEGIN")
        t0 = time.monotonic()
        while time.monotonic() < t0 + 2.0:
            w.execute("INSERT INTO walgen SELECT g, repeat('x', 100) FROM generate_series(1, 50) g")
            # real lag: WAL the primary has flushed (so could send) that a replica has not
            # replayed yet, in bytes
            lsn = pg1.scalar("SELECT pg_current_wal_flush_lsn()")
            for name, d in (("pg2", d2), ("pg3", d3)):
                lag = d.execute("SELECT pg_wal_lsn_diff(%s::pg_lsn, pg_last_wal_replay_lsn())",
                                (str(lsn),)).fetchone()[0]
                real_lag[name] = max(real_lag[name], int(lag))
            for name, n in show_nodes(relay).items():
                if name != "pg1" and not n["readable"]:
                    unreadable[(name, n["lag_ms"], n["lag_bytes"])] += 1
            time.sleep(0.02)
        w.execute("COMMIT")
    closed = []
    for s in held:
        msgs = s.simple_query("SELECT 1")
        if error_fields(msgs):
            closed.append(error_fields(msgs).get("M"))
        s.close()
    say(f"long write after idle: max real replay lag pg2={real_lag['pg2']}"
        f" pg3={real_lag['pg3']} bytes; unreadable seen {sum(unreadable.values())} times"
        f" {dict(list(unreadable.items())[:4])}; read sessions closed: {len(closed)}")
    assert max(real_lag.values()) < 1000000, real_lag  # the replicas do keep up
    assert not unreadable, f"replicas that keep up were marked unreadable: {dict(unreadable)}"
    assert not closed, f"read sessions on replicas that keep up were closed: {closed}"


# --------------------------------------------------------------------------- #
# 11. a replica goes down
# --------------------------------------------------------------------------- #


def test_a_replica_that_goes_down_loses_its_read_sessions_and_gets_no_new_ones(
    make_cluster, ha_relay, say
):
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    relay = ha_relay(c, read_fallback="none", leader_change_grace="30s")
    wait_replicas_readable(relay)
    held = [raw_login(relay.read_port) for _ in range(4)]
    by_node = collections.defaultdict(list)
    for s in held:
        by_node[int(raw_scalar(s, "SELECT inet_server_port()"))].append(s)
    assert len(by_node[pg2.port]) == 2 and len(by_node[pg3.port]) == 2, dict(by_node)
    pg3_idle, pg3_tx = by_node[pg3.port]
    msgs = pg3_tx.simple_query("BEGIN; SELECT 1")
    assert tx_status(msgs) == "T", msgs

    t0 = time.monotonic()
    pg3.stop("immediate")
    # both of its sessions end (the one inside a transaction too, grace or not)
    for s in (pg3_idle, pg3_tx):
        s.sock.settimeout(10)
        s.read_to_eof()
    t_closed = time.monotonic() - t0
    nodes = wait_for(lambda: (n := show_nodes(relay))["pg3"]["health"] == "down" and n,
                     timeout=10, interval=0.05, what="pg3 marked down")
    t_down = time.monotonic() - t0
    say(f"replica down: its read sessions closed {t_closed:.3f}s, show nodes says down"
        f" {t_down:.3f}s after pg_ctl stop -m immediate returned")
    assert nodes["pg3"]["readable"] is False, nodes["pg3"]
    assert nodes["pg3"]["read_sessions"] == 0, nodes["pg3"]

    # the sessions on pg2 are untouched; every new read session goes to pg2
    for s in by_node[pg2.port]:
        assert int(raw_scalar(s, "SELECT inet_server_port()")) == pg2.port
    extra = [read_conn(relay) for _ in range(4)]
    ports = [cn.execute("SELECT inet_server_port()").fetchone()[0] for cn in extra]
    assert ports == [pg2.port] * 4, ports
    assert show_nodes(relay)["pg2"]["read_sessions"] == 6, show_nodes(relay)

    # back up: it takes new read sessions again (it has the fewest)
    pg3.start()
    wait_for(lambda: show_nodes(relay)["pg3"]["readable"], timeout=15, interval=0.05,
             what="pg3 readable again after restart")
    assert read_port_of_new_session(relay) == (pg3.port, True)
    for cn in extra:
        cn.close()
    for s in by_node[pg2.port]:
        s.close()


# --------------------------------------------------------------------------- #
# 12. leader_change_grace
# --------------------------------------------------------------------------- #


def test_leader_change_grace_closes_a_transaction_that_never_ends(make_cluster, ha_relay, say):
    """After `set leader`, a session on the old leader idle inside a transaction may go on
    for leader_change_grace, then is closed (FATAL 57P01) and its transaction rolled back; so
    is one whose statement still runs then (cancelled on the node). A session that commits
    within the grace sees its COMMIT succeed, and is closed right after it."""
    grace = 1.5
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE g (who text)")
    c.wait_caught_up(pg2)
    # one worker: once its idle session is closed, that worker has seen the change
    relay = ha_relay(c, workers=1, leader_change_grace="1500ms")
    idle = raw_login(relay.port)
    stuck, committing, sleeping = (raw_login(relay.port) for _ in range(3))
    for s, who in ((stuck, "stuck"), (committing, "committing"), (sleeping, "sleeping")):
        msgs = s.simple_query(f"BEGIN; INSERT INTO g VALUES ('{who}')")
        assert error_fields(msgs) is None and tx_status(msgs) == "T", msgs
    t_set = promote_then_set_leader(relay, pg2)
    f = closing_error(idle, timeout=5)
    t_idle = time.monotonic()
    assert_closed_for_leader_change(f)

    # within the grace: the transactions go on, and one commits
    assert int(raw_scalar(stuck, "SELECT count(*) FROM g")) >= 1
    msgs = committing.simple_query("COMMIT")
    t_commit = time.monotonic()
    assert error_fields(msgs) is None, (msgs, f"COMMIT sent {t_commit - t_set:.3f}s after set")
    assert ("C", b"COMMIT\0") in msgs and tx_status(msgs) == "I", msgs
    f = closing_error(committing, timeout=2)
    t_committed_closed = time.monotonic()
    assert_closed_for_leader_change(f)
    sleeping.send_query("SELECT pg_sleep(60)")

    # the grace runs out: the open transaction and the running statement are closed
    fs = closing_error(stuck, timeout=grace + 5)
    t_stuck = time.monotonic()
    fz = closing_error(sleeping, timeout=5)
    t_sleeping = time.monotonic()
    say(f"leader_change_grace {grace}s: idle closed {t_idle - t_set:.3f}s after set leader,"
        f" committing session closed {t_committed_closed - t_set:.3f}s (after its COMMIT),"
        f" open transaction {t_stuck - t_set:.3f}s, running statement"
        f" {t_sleeping - t_set:.3f}s")
    for f in (fs, fz):
        assert f.get("S") == "FATAL" and f.get("C") == "57P01", f
        assert "write leader changed" in f.get("M", ""), f
    assert t_committed_closed - t_set < grace, "the committing session waited for the grace"
    assert t_stuck - t_set >= grace - 0.05, f"closed {t_stuck - t_set:.3f}s after set leader"
    assert t_stuck - t_idle <= grace + 3.0, f"closed {t_stuck - t_idle:.3f}s after the change"
    assert t_sleeping - t_stuck <= 1.0, "the session with a running statement outlived the grace"

    # on the old leader: the commit stayed, the others rolled back, their backends are gone
    def old_backends():
        return pg1.query("SELECT state, query FROM pg_stat_activity WHERE backend_type ="
                         " 'client backend' AND (state LIKE 'idle in transaction%'"
                         " OR query LIKE '%pg_sleep(60)%') AND pid <> pg_backend_pid()")

    wait_for(lambda: not old_backends(), timeout=5, interval=0.05,
             what="the closed sessions' backends on pg1 to end")
    assert pg1.query("SELECT who FROM g ORDER BY who") == [("committing",)]
    assert write_port_of_new_session(relay) == (pg2.port, False)


# --------------------------------------------------------------------------- #
# 13. set leader NODE force, and the leader history
# --------------------------------------------------------------------------- #


def check_history_entry(e):
    """An entry of show leader history json carries a recent time and a reason."""
    assert e.get("reason"), e
    t = datetime.datetime.strptime(e["time"], "%Y-%m-%d %H:%M:%S")
    assert abs((datetime.datetime.now() - t).total_seconds()) < 300, e


def test_set_leader_force_switches_to_a_node_in_recovery_and_is_recorded(
    make_cluster, ha_relay, say
):
    """`set leader NODE force` takes a node in recovery (refused without force); the forced
    choice holds while the node answers, ends when it goes down, and outlives its promotion.
    Each change is in `show leader history` with its time, epoch and reason."""
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    relay = ha_relay(c)
    epoch0 = show_info(relay)["epoch"]
    hist0 = leader_history(relay)  # the configured primary taken at start is not a change
    idle = raw_login(relay.port)

    out = admin(relay, "set leader pg2")
    assert out.startswith("error:") and "recovery" in out, out
    out = admin(relay, "set leader pg2 force")
    say(f"set leader pg2 force -> {out.strip()}")
    assert not out.startswith("error") and "pg2" in out, out
    info = wait_for(lambda: (i := show_info(relay))["write_leader"] == "pg2" and i, timeout=5,
                    interval=0.02, what="show info to name pg2 the write leader")
    assert info["epoch"] == epoch0 + 1, info
    hist = leader_history(relay)
    assert len(hist) == len(hist0) + 1 and hist[1:] == hist0, hist
    assert (hist[0]["from"], hist[0]["to"], hist[0]["epoch"]) == ("pg1", "pg2", epoch0 + 1), hist
    check_history_entry(hist[0])
    assert "set leader pg2 force" in hist[0]["reason"], hist[0]
    table = admin(relay, "show leader history")
    assert hist[0]["reason"] in table and hist[0]["time"] in table, table

    # sessions on pg1 are closed as for any change; new ones go to pg2, in recovery as it is
    f = closing_error(idle, timeout=5)
    assert f.get("C") == "57P01" and "write leader changed" in f.get("M", ""), f
    assert write_port_of_new_session(relay) == (pg2.port, True)
    # the forced choice holds while pg2 answers, although pg1 is a primary
    wait_probe_rounds(relay, rounds=5)
    info = show_info(relay)
    assert (info["write_leader"], info["epoch"]) == ("pg2", epoch0 + 1), info
    assert leader_history(relay) == hist

    # pg2 goes down: back to the automatic choice, pg1, recorded with its reason
    pg2.stop("immediate")
    info = wait_for(lambda: (i := show_info(relay))["write_leader"] == "pg1" and i, timeout=10,
                    interval=0.05, what="pg1 the write leader again once forced pg2 is down")
    assert info["epoch"] == epoch0 + 2, info
    hist = leader_history(relay)
    say(f"forced leader down -> history: {hist[0]}")
    assert len(hist) == len(hist0) + 2, hist
    assert (hist[0]["from"], hist[0]["to"], hist[0]["epoch"]) == ("pg2", "pg1", epoch0 + 2), hist
    check_history_entry(hist[0])
    assert "pg2" in hist[0]["reason"] and "administrator" not in hist[0]["reason"], hist[0]
    assert write_port_of_new_session(relay) == (pg1.port, False)

    # force pg3, then promote it by hand: it stays the leader under the same epoch
    out = admin(relay, "set leader pg3 force")
    assert not out.startswith("error"), out
    wait_for(lambda: show_info(relay)["write_leader"] == "pg3", timeout=5, interval=0.02,
             what="show info to name pg3 the write leader")
    pg3.promote()
    wait_log(relay, "SPLIT BRAIN", timeout=5)  # pg1 still runs as a primary
    with relay.connect() as w:
        w.execute("CREATE TABLE forced (n int)")
        row = w.execute("INSERT INTO forced VALUES (1)"
                        " RETURNING inet_server_port(), pg_is_in_recovery()").fetchone()
    assert row == (pg3.port, False), row
    info = show_info(relay)
    assert (info["write_leader"], info["epoch"]) == ("pg3", epoch0 + 3), info
    hist = leader_history(relay)
    assert len(hist) == len(hist0) + 3 and hist[0]["to"] == "pg3", hist
    check_history_entry(hist[0])


# --------------------------------------------------------------------------- #
# 14. a worker that cannot route a write session asks the agent to probe at once
# --------------------------------------------------------------------------- #

# Probes every 10 s (fall and rise as by default): only a probe asked for by a worker can find a
# promoted replica within seconds. log_level = debug for the agent's "probe requested by a
# worker" line.
SLOW_PROBES = {"health_interval": "10s", "fall": 3, "rise": 2}
SLOW_INTERVAL = 10.0
PROBE_REQUESTED = "probe requested by a worker"


def next_periodic_probe(relay):
    """The earliest time (time.monotonic()) at which the agent's next periodic probe may start,
    while nothing but its timer has probed yet: each probe took at most health_timeout (1 s)."""
    age = max(n["probe_age_ms"] for n in show_nodes(relay).values()) / 1000
    return time.monotonic() - age - 1.0 + SLOW_INTERVAL


def new_write_session(relay):
    """A new write session through pgrelay inserts one row: (port, in_recovery) of the node
    that took it, or the first line of the error."""
    try:
        with relay.connect(connect_timeout=3) as w:
            return w.execute("INSERT INTO poke DEFAULT VALUES"
                             " RETURNING inet_server_port(), pg_is_in_recovery()").fetchone()
    except psycopg.Error as e:
        return (str(e).strip().splitlines() or [type(e).__name__])[0]


def writes_reach(relay, node, failures, timeout):
    """Try new write sessions until one inserts on ``node``; the time it did (time.monotonic()).
    Errors go to ``failures``; a write anywhere else fails the test."""
    def on_node():
        r = new_write_session(relay)
        if isinstance(r, str):
            failures[re.sub(r"\d+", "N", r)[:100]] += 1
            return None
        assert r == (node.port, False), f"a write went to {r}, not the new primary {node.name}"
        return time.monotonic()

    try:
        return wait_for(on_node, timeout=timeout, interval=0.05,
                        what=f"a new write session to insert on {node.name}")
    except AssertionError as e:
        raise AssertionError(f"{e} (failed sessions: {dict(failures)})") from None


def leader_change_after_probe_request(log, leader_line):
    """The first line containing ``leader_line`` in ``log``, and whether a probe requested by a
    worker came before it."""
    lines = log.splitlines()
    at = next((i for i, line in enumerate(lines) if leader_line in line), None)
    assert at is not None, f"no {leader_line!r} in the log:\n{log}"
    return lines[at], any(PROBE_REQUESTED in line for line in lines[:at])


def promote_and_time_first_write(relay, node, failures, tick, leader_line):
    """pg_promote() ``node``, then new write sessions until one lands on it. Asserts what both
    probe-request tests rely on: the write came within 4 s and before the agent's next timed
    probe (``tick``), and a worker's probe request came before ``leader_line`` in the log.
    Returns (seconds pg_promote() took, seconds from its return to the first write, the
    leader-change log line)."""
    offset = len(relay.log())
    t_promote = time.monotonic()
    node.promote()
    t_promoted = time.monotonic()
    first = writes_reach(relay, node, failures, timeout=SLOW_INTERVAL + 5)
    log = relay.log()[offset:]
    change, requested = leader_change_after_probe_request(log, leader_line)
    assert first - t_promoted < 4.0, (
        f"writes reached the promoted node only {first - t_promoted:.3f}s after pg_promote()"
        f" (health_interval is {SLOW_INTERVAL:.0f}s)")
    assert first < tick, "the setup was too slow to tell a probe request from the interval"
    assert requested, f"no {PROBE_REQUESTED!r} before the leader change:\n{log}"
    return t_promoted - t_promote, first - t_promoted, change


def test_a_worker_that_cannot_reach_the_leader_makes_the_agent_probe_at_once(
    make_cluster, ha_relay, say
):
    """The primary dies and a replica is promoted between two of the agent's probes, 10 s
    apart. The first new session that cannot reach the dead leader asks the agent to probe
    now: writes go to the promoted node within a few seconds, not at the next interval."""
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE poke (n serial, port int DEFAULT inet_server_port())")
    c.wait_caught_up(pg2)
    relay = ha_relay(c, agent=SLOW_PROBES, log_level="debug")
    assert new_write_session(relay) == (pg1.port, False)
    tick = next_periodic_probe(relay)

    pg1.stop("immediate")
    # no session has tried pg1 since: the agent does not know it is gone
    assert show_info(relay)["write_leader"] == "pg1"
    failures = collections.Counter()
    took, waited, change = promote_and_time_first_write(relay, pg2, failures, tick,
                                                        "write leader: pg1 -> pg2")
    say(f"worker's probe request: pg_promote() took {took:.3f}s; first write on pg2"
        f" {waited:.3f}s after it returned; failed sessions: {dict(failures)}; {change.strip()}")
    assert "leader pg1 does not answer" in change and "pg2 is primary" in change, change
    assert show_info(relay)["write_leader"] == "pg2"


def test_with_no_write_leader_a_new_session_makes_the_agent_probe_at_once(
    make_cluster, ha_relay, say
):
    """The primary dies; the sessions that cannot reach it make the agent probe it until it is
    down (fall = 3 failed probes): no write leader, new sessions get 57P03 without reaching
    any node. A replica is then promoted: those sessions too ask for a probe, and writes go to
    the promoted node within a few seconds, not at the agent's next probe 10 s later."""
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE poke (n serial, port int DEFAULT inet_server_port())")
    c.wait_caught_up(pg2)
    relay = ha_relay(c, agent=SLOW_PROBES, log_level="debug")
    assert new_write_session(relay) == (pg1.port, False)
    tick = next_periodic_probe(relay)

    t_kill = time.monotonic()
    pg1.stop("immediate")
    failures = collections.Counter()

    def no_leader():
        failures[re.sub(r"\d+", "N", str(new_write_session(relay)))[:100]] += 1
        return show_info(relay)["write_leader"] is None

    try:
        wait_for(no_leader, timeout=SLOW_INTERVAL - 2, interval=0.05,
                 what="no write leader once pg1 is gone")
    except AssertionError as e:
        raise AssertionError(f"{e} (sessions: {dict(failures)})") from None
    t_none = time.monotonic()
    assert t_none < tick, "the setup was too slow to tell probe requests from the interval"
    with RawClient(relay.port, timeout=5) as cl:
        cl.send_startup()
        f = error_fields(cl.read_until("ZE"))
    assert f and f.get("C") == "57P03" and "no write leader" in f.get("M", ""), f

    before = dict(failures)
    failures.clear()
    took, waited, change = promote_and_time_first_write(relay, pg2, failures, tick,
                                                        "write leader: (none) -> pg2")
    say(f"no leader: {t_none - t_kill:.3f}s after the kill (sessions: {before});"
        f" pg_promote() took {took:.3f}s; first write on pg2 {waited:.3f}s after it returned;"
        f" failed sessions: {dict(failures)}; {change.strip()}")
    assert "pg2 reports it is primary" in change, change
    # the sessions refused after the promotion were refused for want of a leader, never sent
    # to a node: none could have reached pg1, which is gone
    assert all("57P03" in k or "no write leader" in k for k in failures), failures


def test_a_session_held_for_a_leader_keeps_asking_the_agent_to_probe(make_cluster, ha_relay, say):
    """no_leader_wait holds a new session while there is no write leader. A replica promoted
    while it waits, with no other session arriving, is found within a second or so, because
    the held session keeps asking the agent to probe; not at the agent's next probe 10 s on."""
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE poke (n serial, port int DEFAULT inet_server_port())")
    relay = ha_relay(c, agent=SLOW_PROBES, log_level="debug", no_leader_wait="20s")
    assert new_write_session(relay) == (pg1.port, False)
    pg1.stop("immediate")
    # sessions that cannot reach pg1 make the agent probe it until it is down
    wait_for(lambda: new_write_session(relay) and show_info(relay)["write_leader"] is None,
             timeout=SLOW_INTERVAL - 2, interval=0.05, what="no write leader once pg1 is gone")
    tick = next_periodic_probe(relay)

    with RawClient(relay.port, timeout=SLOW_INTERVAL + 10) as held:
        held.send_startup()
        time.sleep(1.5)  # held, and past the probe its arrival asked for
        offset = len(relay.log())
        pg2.promote()
        t_promoted = time.monotonic()
        msgs = held.read_until("ZE")
        t_in = time.monotonic()
        assert msgs and msgs[-1][0] == "Z", msgs
        port = data_rows(held.simple_query("SELECT inet_server_port(), pg_is_in_recovery()"))
    log = relay.log()[offset:]
    change, requested = leader_change_after_probe_request(log, "write leader: (none) -> pg2")
    say(f"held session logged in on pg2 {t_in - t_promoted:.3f}s after pg_promote() returned;"
        f" next periodic probe due {tick - t_promoted:.3f}s after it at the earliest")
    assert port == [(str(pg2.port), "f")], port
    assert t_in - t_promoted < 4.0, f"the held session waited {t_in - t_promoted:.3f}s"
    assert t_in < tick, "the setup was too slow to tell a probe request from the interval"
    assert requested, f"no {PROBE_REQUESTED!r} before the leader change:\n{log}"
