"""max_client_conn, unreachable nodes, and which node a session goes to."""

import socket
import struct
import threading
import time

import psycopg
import pytest

from conftest import SCHED_SLACK, RawClient, error_fields, free_port, owning_worker, wait_for


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
        # pgrelay(8): the session cannot go on, so FATAL (V: not localised)
        assert fields["S"] == "FATAL" and fields["V"] == "FATAL", fields
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


def _listener_that_never_answers():
    """A TCP port whose accept queue is full: a connect() to it hangs (the SYN is dropped)."""
    lsn = socket.socket()
    lsn.bind(("127.0.0.1", 0))
    lsn.listen(0)
    filler = socket.create_connection(lsn.getsockname(), timeout=2)
    return lsn, filler


def test_server_connect_timeout_gives_08006_in_time_and_frees_the_worker(relay_factory, pg):
    lsn, filler = _listener_that_never_answers()
    try:
        relay = relay_factory(
            server_connect_timeout="500ms",
            nodes=[("pg1", {"host": "127.0.0.1", "port": lsn.getsockname()[1],
                            "role": "primary"})],
        )
        for _ in range(2):
            t0 = time.monotonic()
            fields = _raw_login_error(relay.port)
            took = time.monotonic() - t0
            assert fields is not None and fields["C"] == "08006", fields
            assert "timed out" in fields["M"], fields
            # the configured 500 ms (with a loaded machine's slack), not the kernel's SYN
            # retries (about 2 min)
            assert 0.45 <= took < 0.5 + SCHED_SLACK, took
        assert relay.proc.poll() is None
        assert "timed out" in relay.log()
    finally:
        filler.close()
        lsn.close()


def _rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def test_a_client_that_stops_reading_makes_the_server_wait_not_pgrelay_buffer(relay_factory, pg):
    """200 MB of result to a client that reads nothing for a while: pgrelay stops reading from
    the node (the backend waits in ClientWrite) and its worker does not grow; when the client
    reads again every row arrives."""
    relay = relay_factory()
    rows, width = 200_000, 1000
    with relay.raw(timeout=60) as raw:
        raw.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)
        raw.login(application_name="slow-reader")
        worker = owning_worker(relay, raw.sock.getsockname()[1])
        assert worker, "no worker holds the session"
        before = _rss_kib(worker)
        raw.send_query(f"SELECT repeat('x', {width}) FROM generate_series(1, {rows})")

        def backend_blocked_on_client():
            got = pg.query("SELECT wait_event FROM pg_stat_activity "
                           "WHERE application_name = 'slow-reader' AND state = 'active'")
            return got == [("ClientWrite",)]

        wait_for(backend_blocked_on_client, timeout=20,
                 what="the backend to wait for the client (backpressure)")
        time.sleep(1.0)
        assert backend_blocked_on_client()
        grown = _rss_kib(worker) - before
        assert grown < 8 * 1024, f"worker grew by {grown} KiB holding a stalled result"

        # while this session is stalled, another client on the same proxy is served
        with relay.connect() as other:
            assert other.execute("SELECT 7").fetchone() == (7,)

        got = 0
        while True:
            msg = raw.read_message()
            assert msg is not None, "connection closed before the end of the result"
            if msg[0] == "D":
                got += 1
            elif msg[0] == "Z":
                break
            else:
                assert msg[0] in "TC", msg
        assert got == rows


class GarbageNode:
    """A TCP server where a node should be: it reads the startup packet, answers with
    ``reply``, and closes when the peer does."""

    def __init__(self, reply):
        self.reply = reply
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn:
                try:
                    conn.settimeout(5)
                    conn.recv(65536)
                    conn.sendall(self.reply)
                    while conn.recv(65536):
                        pass
                except OSError:
                    pass

    def close(self):
        self.sock.close()


@pytest.mark.parametrize("reply", [
    b"R" + struct.pack("!i", 2),  # a length below the header's own 4 bytes
    b"Z" + struct.pack("!i", -7) + b"I",  # a negative length
    b"E" + struct.pack("!i", 0x7FFFFFF0),  # far past the largest message accepted
], ids=["short", "negative", "huge"])
def test_a_node_that_speaks_garbage_gets_its_client_08P01_and_spares_others(
        relay_factory, pg, reply):
    bad = GarbageNode(reply)
    try:
        relay = relay_factory(agent="off", nodes=[
            ("pg1", {"host": "127.0.0.1", "port": pg.port, "role": "primary"}),
        ])
        liar = relay_factory(agent="off", nodes=[
            ("liar", {"host": "127.0.0.1", "port": bad.port, "role": "primary"}),
        ])
        with relay.connect() as good:
            for _ in range(3):
                fields = _raw_login_error(liar.port)
                assert fields is not None and fields["C"] == "08P01", fields
                assert good.execute("SELECT 'unharmed'").fetchone() == ("unharmed",)
        assert liar.proc.poll() is None
        assert "invalid message" in liar.log() and "liar" in liar.log(), liar.log_tail()
        with relay.connect() as c:
            assert c.execute("SELECT 2").fetchone() == (2,)
    finally:
        bad.close()
