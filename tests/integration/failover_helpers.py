"""Fixtures and helpers shared by the failover tests (test_failover_*.py, test_split_brain.py).

    def test_x(make_cluster, ha_relay, say):     # make_cluster: cluster.py
        c = make_cluster(sync_standby="pg2")
        relay = ha_relay(c, leader_change_grace="2s")   # agent on, read port, no_leader_wait 0

ha_relay        pgrelay with its agent in front of a cluster (AGENT: health_interval 200ms,
                fall 2, rise 1), no_leader_wait 0, destroyed at teardown;
                ha_relay_fixture(**keys) makes one with other defaults
say             print a measurement so that it shows even without -s
raw_login, raw_scalar, tx_status, nothing_arrives, closing_error: sessions on a RawClient
promote_then_set_leader, write_port_of_new_session, read_conn, wait_log, wait_replicas_readable
"""

import select
import time

import psycopg
import pytest

from cluster import admin, destroy_relay, log_lines, show_nodes, start_ha_relay
from conftest import RawClient, data_rows, error_fields, wait_for

AGENT = {"health_interval": "200ms", "fall": 2, "rise": 1, "health_timeout": "1s"}


def ha_relay_fixture(**defaults):
    """An ``ha_relay`` fixture: ``ha_relay(cluster, agent={...}, **pgrelay_keys)`` starts pgrelay
    with its agent (AGENT, overridden by ``agent``) in front of the cluster, with a read port
    and 2 workers, destroyed at teardown. ``defaults``: further [pgrelay] keys a test's own
    keys override."""

    @pytest.fixture
    def ha_relay():
        started = []

        def start(cluster, agent=None, **extra):
            extra.setdefault("read_listen_port", "auto")
            extra.setdefault("workers", 2)
            for key, value in defaults.items():
                extra.setdefault(key, value)
            r = start_ha_relay(cluster, agent={**AGENT, **(agent or {})}, **extra)
            started.append(r)
            return r

        yield start
        for r in started:
            destroy_relay(r)

    return ha_relay


# the failover tests see 57P03 at once (no_leader_wait's default holds a new session 5 s)
ha_relay = ha_relay_fixture(no_leader_wait="0")


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

