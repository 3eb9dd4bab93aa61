"""Planned leader changes and the sessions on the old leader: set leader, close_all, grace.

Each test builds its own PostgreSQL 15 cluster (pg1 primary, pg2 and pg3 streaming replicas;
see cluster.py) and its own pgrelay with health_interval = 200ms, fall = 2, rise = 1, a
read-only port, pg1 as role = primary and pg2/pg3 as role = replica (failover_helpers.py's
ha_relay). What is asserted is what a user relies on (pgrelay(8), pgrelay-agent(8),
pgrelay.ini(5)):

  * a planned switchover (promote + ``set leader``) moves new sessions, closes idle sessions
    on the old leader with FATAL 57P01 "write leader changed", and lets an open transaction
    commit first;
  * on_leader_change = close_all closes a session inside a transaction at once;
  * leader_change_grace: an open transaction on the old leader is closed when it runs out, a
    commit within it succeeds first;
  * set leader NODE force takes a node in recovery; show leader history records each change
    with its time, epoch and reason.
"""

import collections
import datetime
import re
import subprocess
import time

import pytest

from cluster import (  # noqa: F401,F811 (fixtures used by name)
    admin,
    leader_history,
    make_cluster,
    show_info,
    wait_probe_rounds,
)
from conftest import PG_BIN, error_fields, wait_for
from failover_helpers import (  # noqa: F401,F811 (fixtures used by name)
    assert_closed_for_leader_change,
    closing_error,
    ha_relay,
    nothing_arrives,
    promote_then_set_leader,
    raw_login,
    raw_scalar,
    say,
    tx_status,
    wait_log,
    write_port_of_new_session,
)

pytestmark = pytest.mark.deadline(90)


# --------------------------------------------------------------------------- #
# planned switchover under load
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
# on_leader_change = close_all
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
# leader_change_grace
# --------------------------------------------------------------------------- #


def test_leader_change_grace_closes_a_transaction_that_never_ends(make_cluster, ha_relay, say):
    """After `set leader`, a session on the old leader idle inside a transaction may go on
    for leader_change_grace, then is closed (FATAL 57P01) and its transaction rolled back; so
    is one whose statement still runs then (cancelled on the node). A session that commits
    within the grace sees its COMMIT succeed, and is closed right after it."""
    grace = 4.0  # the work the test does within it takes ~0.3 s, more on a loaded machine
    c = make_cluster()
    pg1, pg2, pg3 = c.nodes
    pg1.query("CREATE TABLE g (who text)")
    c.wait_caught_up(pg2)
    # one worker: once its idle session is closed, that worker has seen the change
    relay = ha_relay(c, workers=1, leader_change_grace=f"{int(grace * 1000)}ms")
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
    assert t_sleeping - t_stuck <= 2.0, "the session with a running statement outlived the grace"

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
# set leader NODE force, and the leader history
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
