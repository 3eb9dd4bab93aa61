"""Following the write leader under faults (issue 11): what a user relies on when the leader
hangs, a replica is not streaming, or pgrelay has not probed anything yet.

Each test builds its own PostgreSQL 15 cluster (cluster.py: pg1 primary, streaming replicas)
and its own pgrelay in front of it, with a fast agent (health_interval 200ms, fall 2, rise 1,
health_timeout 1s):

  * a leader deposed by a failover (hung: every process SIGSTOPped, a replica promoted) has
    its sessions closed at once, also one with a COMMIT in flight: that COMMIT is never
    acknowledged when the old leader wakes up; leader_change_grace is for planned switchovers;
  * a replica that is not streaming (no WAL receiver), with nothing replayed since it started
    (pg_last_xact_replay_timestamp() NULL), is not readable and gets no read session;
  * pgrelay does not send a write session anywhere before a probe confirmed the leader: a
    configured "primary" that is in fact a replica never gets a write, even while another
    node is slow to answer its first probe.
"""

import contextlib
import os
import select
import signal
import socket
import threading
import time

import psycopg
import pytest

from cluster import (
    Cluster,
    admin,
    destroy_relay,
    log_lines,
    show_nodes,
    start_ha_relay,
)
from conftest import RawClient, data_rows, error_fields, free_port, wait_for, child_pids

AGENT = {"health_interval": "200ms", "fall": 2, "rise": 1, "health_timeout": "1s"}

pytestmark = pytest.mark.deadline(120)


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
    """``ha_relay(cluster, agent={...}, **pgrelay_keys)``: pgrelay with its agent in front."""
    started = []

    def start(cluster, agent=None, **extra):
        extra.setdefault("read_listen_port", "auto")
        extra.setdefault("workers", 2)
        r = start_ha_relay(cluster, agent={**AGENT, **(agent or {})}, **extra)
        started.append(r)
        return r

    yield start
    for r in started:
        destroy_relay(r)


def raw_login(port, timeout=10.0, **params):
    c = RawClient(port, timeout=timeout)
    c.login(**params)
    return c


def raw_scalar(client, sql):
    msgs = client.simple_query(sql)
    err = error_fields(msgs)
    assert err is None, f"{sql}: {err}"
    return data_rows(msgs)[0][0]


def messages_until_close(client, timeout):
    """Every message until the peer closes (AssertionError if it does not within timeout)."""
    client.sock.settimeout(timeout)
    try:
        return client.read_to_eof()
    except (socket.timeout, TimeoutError):
        raise AssertionError(f"not closed within {timeout}s; got so far {client.buf!r}") from None


def postmaster_pid(node):
    with open(os.path.join(node.pgdata, "postmaster.pid")) as f:
        return int(f.readline())


@contextlib.contextmanager
def hung(node):
    """Every process of ``node`` stopped (SIGSTOP: the postmaster first, so it forks no more),
    continued on exit."""
    pm = postmaster_pid(node)
    os.kill(pm, signal.SIGSTOP)
    stopped = [pm]
    try:
        for pid in child_pids(pm):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        yield stopped
    finally:
        for pid in reversed(stopped):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


# --------------------------------------------------------------------------- #
# 1. a leader deposed by a failover: its sessions are closed at once
# --------------------------------------------------------------------------- #


def test_a_hung_leader_replaced_by_a_failover_has_its_sessions_closed_at_once(
    make_cluster, ha_relay
):
    """Every process of the leader stops; a replica is promoted. The session whose COMMIT is in
    flight on the hung leader is closed (FATAL 57P01, "failover") as soon as the agent moves
    the leader, not after leader_change_grace (60 s here); when the old leader wakes up, its
    COMMIT is not acknowledged to the client. New write sessions go to the promoted node."""
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    pg1.query("CREATE TABLE ft (who text)")
    c.wait_caught_up(pg2)
    relay = ha_relay(c, leader_change_grace="60s")
    inflight = raw_login(relay.port, application_name="inflight")
    idle_in_tx = raw_login(relay.port, application_name="idle_in_tx")
    for s in (inflight, idle_in_tx):
        msgs = s.simple_query("BEGIN; INSERT INTO ft VALUES ('x')")
        assert error_fields(msgs) is None, msgs

    with hung(pg1):
        inflight.send_query("COMMIT")
        t0 = time.monotonic()
        pg2.promote()
        msgs = messages_until_close(inflight, timeout=15)
        t_closed = time.monotonic() - t0
        f = error_fields(msgs)
        assert f and f.get("C") == "57P01" and "failover" in f.get("M", ""), msgs
        assert ("C", b"COMMIT\0") not in msgs, msgs
        f2 = error_fields(messages_until_close(idle_in_tx, timeout=5))
        assert f2 and f2.get("C") == "57P01", f2
        assert t_closed < 10, f"closed {t_closed:.2f}s after the promotion"
        with relay.connect(connect_timeout=10) as conn:
            port, rec = conn.execute("SELECT inet_server_port(), pg_is_in_recovery()").fetchone()
        assert (port, rec) == (pg2.port, False)
    # pg1 runs again: nothing it does now reaches the closed clients
    assert inflight.read_message() is None
    wait_for(pg1.answers, timeout=10, what="pg1 to answer again")


# --------------------------------------------------------------------------- #
# 4. no write session before a probe confirmed the leader
# --------------------------------------------------------------------------- #


@contextlib.contextmanager
def silent_node():
    """A TCP port that accepts connections and never says a word (a node whose first probe
    lasts health_timeout)."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(64)
    try:
        yield lsn.getsockname()[1]
    finally:
        lsn.close()


def test_no_write_session_goes_to_the_configured_primary_before_a_probe_confirms_it(
    make_cluster, ha_relay
):
    """pgrelay.ini names pg2 role = primary, but pg2 is a replica (the configured role is stale,
    as it often is under an HA manager); a third node takes 3 s to answer its first probe.
    A write sent the moment the port listens waits until the agent has confirmed the leader,
    and lands on pg1, the real primary: it never reaches pg2 (25006 read-only)."""
    c = make_cluster(replicas=1)
    pg1, pg2 = c.nodes
    pg1.query("CREATE TABLE w (at int)")
    c.wait_caught_up(pg2)
    with silent_node() as slow_port:
        nodes = [
            ("pg1", {"host": pg1.host, "port": pg1.port, "role": "replica"}),
            ("pg2", {"host": pg2.host, "port": pg2.port, "role": "primary"}),
            ("slow", {"host": "127.0.0.1", "port": slow_port, "role": "replica"}),
        ]
        relay = start_ha_relay(c, agent={**AGENT, "health_timeout": "3s"}, nodes=nodes,
                               wait=False, workers=1)
        try:
            from conftest import port_listening

            wait_for(lambda: port_listening(relay.port), timeout=15, interval=0.005,
                     what="pgrelay to listen")
            t0 = time.monotonic()
            with relay.connect(connect_timeout=10) as conn:
                port = conn.execute(
                    "INSERT INTO w VALUES (1) RETURNING inet_server_port()").fetchone()[0]
            took = time.monotonic() - t0
            assert port == pg1.port
            # confirmed by pg1's and pg2's first probes, not held for the silent node's 3 s
            assert took < 2.5, f"the write waited {took:.2f}s"
        finally:
            destroy_relay(relay)
