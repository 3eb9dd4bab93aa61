"""A node that closes a session while a statement runs, without an ErrorResponse of its own
(issue 11: every client error carries a SQLSTATE): the client gets FATAL 08006 through pgrelay,
not the bare EOF ("server closed the connection unexpectedly") a direct connection gives.

  * kill -9 of the session's backend while pg_sleep runs;
  * kill -9 of the node's postmaster while pg_sleep runs (the backend notices and exits
    without a word);
  * a backend the server itself terminates (pg_terminate_backend) sends its own FATAL 57P01,
    which reaches the client as it is, with no 08006 after it.

Each test has its own one-node cluster (a killed backend makes PostgreSQL restart every
session of the node) and its own pgrelay.
"""

import os
import signal

import pytest

from cluster import Cluster, destroy_relay, log_lines, start_ha_relay
from conftest import RawClient, error_fields, wait_for

pytestmark = pytest.mark.deadline(90)

SLEEP_SQL = "SELECT pg_sleep(60) /* mid-statement */"


@pytest.fixture
def node_and_relay():
    c = Cluster.create(replicas=0)
    relay = None
    try:
        relay = start_ha_relay(c, workers=1)
        yield c.primary, relay
    finally:
        if relay:
            destroy_relay(relay)
        c.destroy()


def sleeping_session(node, relay):
    """A session through pgrelay with pg_sleep running on the node; (client, backend pid)."""
    client = RawClient(relay.port, timeout=20)
    client.login()
    client.send_query(SLEEP_SQL)

    def backend():
        rows = node.query("SELECT pid FROM pg_stat_activity WHERE query = %s", (SLEEP_SQL,))
        return rows[0][0] if rows else None
    return client, wait_for(backend, timeout=10, what="the sleeping backend on the node")


def messages_until_close(client):
    try:
        return client.read_to_eof()
    except OSError:
        return []


def test_kill_9_of_the_backend_mid_statement_gives_08006(node_and_relay):
    node, relay = node_and_relay
    client, pid = sleeping_session(node, relay)
    os.kill(pid, signal.SIGKILL)
    msgs = messages_until_close(client)
    fields = error_fields(msgs)
    assert fields is not None, f"a bare close, no ErrorResponse: {msgs!r}"
    assert fields.get("C") == "08006", fields
    assert "during a statement" in fields.get("M", ""), fields
    assert log_lines(relay, "closed the connection during a statement")


def test_kill_9_of_the_postmaster_mid_statement_gives_08006(node_and_relay):
    node, relay = node_and_relay
    client, _ = sleeping_session(node, relay)
    with open(os.path.join(node.pgdata, "postmaster.pid")) as f:
        postmaster = int(f.readline())
    os.kill(postmaster, signal.SIGKILL)
    msgs = messages_until_close(client)
    fields = error_fields(msgs)
    assert fields is not None, f"a bare close, no ErrorResponse: {msgs!r}"
    assert fields.get("C") == "08006", fields


def test_a_backend_terminated_by_the_server_passes_its_own_57p01_alone(node_and_relay):
    node, relay = node_and_relay
    client, pid = sleeping_session(node, relay)
    node.query("SELECT pg_terminate_backend(%s)", (pid,))
    msgs = messages_until_close(client)
    errors = [m for m in msgs if m[0] == "E"]
    assert len(errors) == 1, msgs
    assert error_fields(msgs).get("C") == "57P01", msgs
    assert not log_lines(relay, "closed the connection during a statement")
