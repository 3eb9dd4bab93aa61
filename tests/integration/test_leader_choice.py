"""How the agent chooses a new write leader, and how workers follow it without the master's
poke (pgrelay-agent(8), LEADER CHOICE; pgrelay(8)).

Among several new candidates (nodes that answer and are not in recovery) the one configured
``role = primary`` wins, then the one with the highest WAL position. A worker re-reads the
routing table at every new session, so one that missed a poke still routes by the newest
table. ``x`` below is the configured primary that is gone at start (nothing listens on its
port), so that the agent must choose among the others at once.

(At start, with the configured primary already gone, the agent decides before its first round
of probes is complete, so the rules above apply to a leader that goes away later: that is what
these tests do.)
"""

import signal

import psycopg
import pytest

from cluster import Cluster
from conftest import admin_json, wait_for

AGENT = {"agent": {"monitor_user": "postgres", "health_interval": "200ms", "fall": "2"}}


@pytest.fixture(scope="module")
def other_pg():
    """A second, independent PostgreSQL primary (its own WAL): the leader that goes away."""
    cluster = Cluster.create(replicas=0)
    yield cluster.primary
    cluster.destroy()


@pytest.fixture(scope="module")
def third_pg():
    """A third one, for two candidates with WAL positions of their own."""
    cluster = Cluster.create(replicas=0)
    yield cluster.primary
    cluster.destroy()


def _leader(relay):
    return admin_json(relay, "show info")["write_leader"]


def _lsn(node_query):
    return node_query("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")[0][0]


def _advance_wal(node_query, past):
    """Write and switch WAL segments on a node until its position is 32 MB past ``past``."""
    node_query("CREATE TABLE IF NOT EXISTS wal_pusher (x int)")
    while _lsn(node_query) < past + 32 * 1024 * 1024:
        node_query("INSERT INTO wal_pusher VALUES (1)")
        node_query("SELECT pg_switch_wal()")


def _leader_x_goes_away(relay, x_server):
    """With every node probed and x the leader, stop x's server; return the next leader."""
    wait_for(lambda: all(n["health"] != "unknown" for n in admin_json(relay, "show nodes")),
             timeout=15, what="the agent's first round of probes")
    wait_for(lambda: "SPLIT BRAIN" in relay.log(), timeout=15,
             what="the agent to see the other primaries and keep x")
    assert _leader(relay) == "x"
    mark = len(relay.log())
    x_server.stop(mode="immediate")
    try:
        wait_for(lambda: "leader x does not answer" in relay.log()[mark:], timeout=15,
                 what="the agent to leave x")
        # The decision is logged just before the table is published.
        return wait_for(lambda: _leader(relay) != "x" and _leader(relay), timeout=5,
                        what="the new leader in show info")
    finally:
        x_server.start()


def test_among_new_candidates_the_configured_primary_wins(relay_factory, pg, other_pg):
    # a and b are the same server: only their role tells them apart; a comes first.
    relay = relay_factory(sections=AGENT, nodes=[
        ("x", {"host": "127.0.0.1", "port": other_pg.port, "role": "primary"}),
        ("a", {"host": "127.0.0.1", "port": pg.port, "role": "replica"}),
        ("b", {"host": "127.0.0.1", "port": pg.port, "role": "primary"}),
    ])
    assert _leader_x_goes_away(relay, other_pg) == "b", relay.log()


def test_then_the_highest_wal_position_wins(relay_factory, pg, other_pg, third_pg):
    # Whichever server is ahead is pushed further ahead, and listed last.
    lsn_pg, lsn_third = _lsn(pg.query), _lsn(third_pg.query)
    if lsn_pg > lsn_third:
        _advance_wal(pg.query, lsn_third)
        low, high = third_pg.port, pg.port
    else:
        _advance_wal(third_pg.query, lsn_pg)
        low, high = pg.port, third_pg.port
    relay = relay_factory(sections=AGENT, nodes=[
        ("x", {"host": "127.0.0.1", "port": other_pg.port, "role": "primary"}),
        ("low", {"host": "127.0.0.1", "port": low, "role": "replica"}),
        ("high", {"host": "127.0.0.1", "port": high, "role": "replica"}),
    ])
    assert _leader_x_goes_away(relay, other_pg) == "high", relay.log()


def test_a_worker_that_missed_the_poke_routes_a_new_session_by_the_new_table(
        relay_factory, pg, other_pg):
    relay = relay_factory(sections=AGENT, nodes=[
        ("x", {"host": "127.0.0.1", "port": other_pg.port, "role": "primary"}),
        ("a", {"host": "127.0.0.1", "port": pg.port, "role": "replica"}),
    ])
    wait_for(lambda: "SPLIT BRAIN" in relay.log(), timeout=15,
             what="the agent to see both primaries and keep x")
    assert _leader(relay) == "x"
    with relay.connect() as c:  # every worker routes to x now
        assert c.execute("SELECT inet_server_port()").fetchone()[0] == other_pg.port
    # The master relays the agent's poke to the workers: stopped, it relays none.
    relay.signal(signal.SIGSTOP)
    try:
        mark = len(relay.log())
        other_pg.stop(mode="immediate")
        wait_for(lambda: "leader x does not answer" in relay.log()[mark:], timeout=15,
                 what="the agent to switch from x to a")

        def lands_on_a():
            # The agent logs its decision just before it publishes the table: a session in
            # between still goes to x (refused). Once one lands on a, the table is out.
            try:
                with relay.connect() as c:
                    return c.execute("SELECT inet_server_port()").fetchone()[0] == pg.port
            except psycopg.OperationalError:
                return False

        wait_for(lands_on_a, timeout=10, what="a first new session on a")
        # Each worker accepts on its own: whichever takes these sessions was not poked.
        for _ in range(4):
            try:
                with relay.connect() as c:
                    port = c.execute("SELECT inet_server_port()").fetchone()[0]
            except psycopg.OperationalError as e:
                raise AssertionError(f"a new session was routed to the old leader: {e}") from None
            assert port == pg.port
    finally:
        relay.signal(signal.SIGCONT)
        other_pg.start()
