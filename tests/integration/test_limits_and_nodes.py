"""max_client_conn, unreachable nodes, and which node a session goes to."""

import psycopg
import pytest

from conftest import RawClient, error_fields, free_port, wait_for


def _raw_login_error(port):
    with RawClient(port) as raw:
        raw.send_startup()
        msgs = raw.read_until("ZE")
        if msgs and msgs[-1][0] == "E":
            assert raw.read_message() is None, "connection not closed after the error"
        return error_fields(msgs)


def test_client_over_max_client_conn_gets_53300(relay_factory):
    relay = relay_factory(max_client_conn=3)
    conns = [relay.connect() for _ in range(3)]
    try:
        for c in conns:
            assert c.execute("SELECT 1").fetchone() == (1,)
        fields = _raw_login_error(relay.port)
        assert fields is not None and fields["C"] == "53300", fields
        with pytest.raises(psycopg.OperationalError):
            relay.connect()
        # the admitted clients are unaffected
        for c in conns:
            assert c.execute("SELECT 2").fetchone() == (2,)
    finally:
        for c in conns:
            c.close()


def test_slot_is_freed_when_a_client_leaves(relay_factory):
    relay = relay_factory(max_client_conn=3)
    conns = [relay.connect() for _ in range(3)]
    try:
        assert _raw_login_error(relay.port)["C"] == "53300"
        conns.pop().close()

        def admitted():
            try:
                with relay.connect() as c:
                    return c.execute("SELECT 'in'").fetchone() == ("in",)
            except psycopg.OperationalError:
                return False

        wait_for(admitted, timeout=5, what="a freed slot to admit a new client")
    finally:
        for c in conns:
            c.close()


def test_max_client_conn_counts_clients_across_workers(relay_factory):
    # 2 workers share the limit: never more than 4 sessions in total
    relay = relay_factory(max_client_conn=4)
    conns, refused = [], 0
    try:
        for _ in range(10):
            try:
                c = relay.connect()
                c.execute("SELECT 1")
                conns.append(c)
            except psycopg.OperationalError:
                refused += 1
        assert (len(conns), refused) == (4, 6)
    finally:
        for c in conns:
            c.close()


def test_unreachable_node_gives_08006(relay_factory):
    dead_port = free_port()  # nothing listens here
    relay = relay_factory(
        nodes=[("pg1", {"host": "127.0.0.1", "port": dead_port, "role": "primary"})]
    )
    for _ in range(3):
        fields = _raw_login_error(relay.port)
        assert fields is not None and fields["C"] == "08006", fields
        assert fields["S"] in ("FATAL", "ERROR")
    with pytest.raises(psycopg.OperationalError):
        relay.connect()
    assert relay.proc.poll() is None, "pgrelay exited because the node is down"


def test_node_reached_through_unix_socket_directory(relay_factory, pg):
    relay = relay_factory(nodes=[("pg1", {"host": pg.sockdir, "port": pg.port, "role": "primary"})])
    with relay.connect() as c:
        # over the unix socket the server sees no client address
        assert c.execute("SELECT inet_client_addr() IS NULL, 42").fetchone() == (True, 42)


def test_sessions_go_to_the_primary_not_a_replica(relay_factory, pg):
    # the replica listed first is down: a session can only succeed via the primary
    relay = relay_factory(
        nodes=[
            ("replica1", {"host": "127.0.0.1", "port": free_port(), "role": "replica"}),
            ("primary1", {"host": "127.0.0.1", "port": pg.port, "role": "primary"}),
        ]
    )
    with relay.connect() as c:
        assert c.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
