"""The read port: sessions spread over the replicas that keep up, lag, fallback, a replica down.

Each test builds its own PostgreSQL 15 cluster (pg1 primary, pg2 and pg3 streaming replicas;
see cluster.py) and its own pgrelay with health_interval = 200ms, fall = 2, rise = 1, a
read-only port, pg1 as role = primary and pg2/pg3 as role = replica (failover_helpers.py's
ha_relay). What is asserted is what a user relies on (pgrelay(8), pgrelay-agent(8),
pgrelay.ini(5)):

  * the read port spreads sessions over the replicas and avoids a lagging one;
  * with no replica fit for reads, read_fallback = leader sends read sessions to the leader,
    none refuses them with FATAL 57P03;
  * max_replica_lag_seconds takes a paused replica out (and back after resume), but not
    replicas that keep up through a long write after an idle spell;
  * a replica that goes down loses its read sessions, new ones go to the other replica.
"""

import collections
import time

import pytest

import loadgen
from cluster import make_cluster, show_nodes  # noqa: F401,F811 (fixtures used by name)
from conftest import RawClient, error_fields, wait_for
from failover_helpers import (  # noqa: F401,F811 (fixtures used by name)
    closing_error,
    ha_relay,
    nothing_arrives,
    raw_login,
    raw_scalar,
    read_conn,
    say,
    tx_status,
    wait_replicas_readable,
    write_port_of_new_session,
)

pytestmark = pytest.mark.deadline(90)


# --------------------------------------------------------------------------- #
# read port
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
    lag, measured directly, stays far below the limit: each batch waits until both replicas
    have replayed it (a loaded machine then slows the load down instead of letting the
    replicas fall behind the bound, which rightly closes their sessions: it did once at load
    25, real lag 128 kB)."""
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

    replicas = [pg2.connect(), pg3.connect()]  # the load thread's own

    def insert_100_rows(conn, seq):
        conn.execute("INSERT INTO walgen SELECT g, repeat('x', 100) FROM generate_series(1, 100) g")
        lsn = conn.execute("SELECT pg_current_wal_lsn()").fetchone()[0]
        # the next batch once both replicas have this one: the real lag stays one batch
        while not loader.stop_flag.is_set() and not all(
                r.execute("SELECT pg_last_wal_replay_lsn() >= %s::pg_lsn", (str(lsn),))
                .fetchone()[0] for r in replicas):
            time.sleep(0.005)

    [(start,)] = pg1.query("SELECT pg_current_wal_lsn()")
    loader = loadgen.Writer(relay, insert_100_rows, interval=0.02)
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
    loader.stop()
    for r in replicas:
        r.close()
    [(wal_bytes,)] = pg1.query("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), %s::pg_lsn)",
                               (str(start),))
    rate = float(wal_bytes) / (time.monotonic() - t0)
    assert loader.ok and not loader.errors, f"the write load failed: {loader.errors[:3]}"
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
# read_fallback: no replica qualifies
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
# max_replica_lag_seconds
# --------------------------------------------------------------------------- #


class Ticker(loadgen.Writer):
    """Commits a small transaction on the primary every ``pause`` seconds (direct, not
    through pgrelay), so that a replica that replays keeps a recent last-replayed commit."""

    def __init__(self, node, pause=0.05):
        def tick(conn, seq):
            conn.execute("INSERT INTO ticks VALUES (clock_timestamp())")

        super().__init__(node, tick, interval=pause)

    @property
    def commits(self):
        return len(self.ok)

    @property
    def error(self):
        """The first error (seq, time, sqlstate, message), or None."""
        return self.errors[0] if self.errors else None


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
# a replica goes down
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
