"""Failover: the write leader dies, a replica is promoted, pgrelay finds it; the agent dies.

Each test builds its own PostgreSQL 15 cluster (pg1 primary, pg2 and pg3 streaming replicas;
see cluster.py) and its own pgrelay with health_interval = 200ms, fall = 2, rise = 1, a
read-only port, pg1 as role = primary and pg2/pg3 as role = replica (failover_helpers.py's
ha_relay). What is asserted is what a user relies on (pgrelay(8), pgrelay-agent(8),
pgrelay.ini(5)):

  * after the primary dies and a replica is promoted, writes through pgrelay work again
    within seconds, and no write ever reaches a node in recovery;
  * the agent can die without disturbing traffic or the epoch;
  * with health_interval = 10s, a promoted replica takes writes within seconds: a new session
    that cannot reach the dead leader, or finds no write leader, asks the agent to probe now.
"""

import collections
import re
import time

import psycopg
import pytest

import loadgen
from cluster import (  # noqa: F401,F811 (fixtures used by name)
    agent_kill9,
    leader_history,
    make_cluster,
    show_info,
    show_nodes,
    wait_probe_rounds,
)
from conftest import RawClient, data_rows, error_fields, pid_alive, wait_for
from failover_helpers import (  # noqa: F401,F811 (fixtures used by name)
    ha_relay,
    say,
    write_port_of_new_session,
)

pytestmark = pytest.mark.deadline(90)


# --------------------------------------------------------------------------- #
# a writer through the failover
# --------------------------------------------------------------------------- #


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
# failover
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
# agent killed
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
# a worker that cannot route a write session asks the agent to probe at once
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
