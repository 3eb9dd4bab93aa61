"""No write leader at all: 57P03 at once, or a wait of no_leader_wait; a slow leader is kept.

Each test builds its own PostgreSQL 15 cluster (pg1 primary, pg2 and pg3 streaming replicas;
see cluster.py) and its own pgrelay with health_interval = 200ms, fall = 2, rise = 1, a
read-only port, pg1 as role = primary and pg2/pg3 as role = replica (failover_helpers.py's
ha_relay). What is asserted is what a user relies on (pgrelay(8), pgrelay-agent(8),
pgrelay.ini(5)):

  * no leader => 57P03 (no_leader_wait = 0), and writes again once a primary is back;
  * a slow leader is kept while no other node is primary;
  * no_leader_wait holds a new session until the primary is back.
"""

import collections
import os
import signal
import time

import psycopg
import pytest

from cluster import make_cluster, show_info, show_nodes  # noqa: F401,F811 (fixtures used by name)
from conftest import RawClient, data_rows, error_fields, wait_for
from failover_helpers import (  # noqa: F401,F811 (fixtures used by name)
    ha_relay,
    say,
    wait_log,
    write_port_of_new_session,
)
from loadgen import InThread

pytestmark = pytest.mark.deadline(90)


# --------------------------------------------------------------------------- #
# no leader at all
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
# no_leader_wait
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

    t0 = time.monotonic()
    held = InThread(session)
    assert not held.finished_within(1.0), f"the session did not wait for a leader: {result}"
    pg1.start()
    held.join(10)
    say(f"no_leader_wait: held session completed after {result.get('elapsed', -1):.3f}s"
        f" (primary restarted {time.monotonic() - t0:.3f}s ago)")
    assert "exc" not in result, result
    assert error_fields(result["login"]) is None, error_fields(result["login"])
    assert result["row"] == [(str(pg1.port), "f")], result
    assert result["elapsed"] < 5.5, result
