"""The client's first bytes: startup packets, SSL/GSS requests and malformed input."""

import socket
import struct
import threading
import time

import pytest

from conftest import (
    GSSENC_REQUEST_CODE,
    PROTOCOL_V3,
    SSL_REQUEST_CODE,
    RawClient,
    data_rows,
    error_fields,
    startup_packet,
    wait_for,
)


class BackgroundQueries:
    """A psycopg session running queries in a loop while a test misbehaves elsewhere."""

    def __init__(self, relay):
        self.conn = relay.connect()
        self.stop = threading.Event()
        self.count = 0
        self.errors = []
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        try:
            while not self.stop.is_set():
                n = self.count
                got = self.conn.execute("SELECT %s::int + 1", (n,)).fetchone()
                if got != (n + 1,):
                    self.errors.append(f"got {got!r} for {n}")
                self.count += 1
        except Exception as e:  # noqa: BLE001
            self.errors.append(repr(e))

    def finish(self):
        before = self.count
        wait_for(lambda: self.count > before + 5 or self.errors, timeout=10,
                 what="background queries to progress")
        self.stop.set()
        self.thread.join(10)
        self.conn.close()
        assert self.errors == []
        assert self.count > 0


def answer_to(port, packet):
    """What a server on port answers to packet before it closes: [] for a silent close."""
    with RawClient(port) as raw:
        try:
            raw.send(packet)
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed even before we finished sending
        return raw.read_to_eof()


BAD_LENGTHS = {
    # an HTTP request: "GET " read as a length of ~1.2 GB
    "http_request": b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",
    # length smaller than the 8-byte header
    "length_too_small": struct.pack("!i", 4) + b"\0\0\0\0",
    "negative_length": struct.pack("!i", -20) + b"\0" * 16,
    # startup packet whose declared length is over the 10000-byte limit
    "oversized_20000": struct.pack("!ii", 20000, PROTOCOL_V3) + b"user\0" + b"u" * 19000,
    # random bytes
    "random_bytes": bytes((i * 37 + 11) % 256 for i in range(200)),
    # a driver that queues Terminate before its startup packet: 'X' read as a length
    "terminate_first": b"X" + struct.pack("!i", 4) + startup_packet(),
}

# A good length around a bad layout: PostgreSQL answers FATAL 08P01 to each.
BAD_LAYOUTS = {
    "data_after_terminator": struct.pack("!ii", 25, PROTOCOL_V3) + b"user\0postgres\0\0xx",
    "name_without_value": struct.pack("!ii", 14, PROTOCOL_V3) + b"user\0\0",
}


@pytest.mark.parametrize("packet", list(BAD_LENGTHS.values()), ids=list(BAD_LENGTHS))
def test_a_bad_startup_length_is_logged_and_closed_silently_like_the_server(relay, pg, packet):
    bg = BackgroundQueries(relay)
    logged = relay.log().count("invalid length of startup packet")
    assert answer_to(pg.port, packet) == []  # what PostgreSQL does
    assert answer_to(relay.port, packet) == []
    wait_for(lambda: relay.log().count("invalid length of startup packet") > logged,
             what="the bad length in the log")
    bg.finish()
    with relay.connect() as c:
        assert c.execute("SELECT 'next client'").fetchone() == ("next client",)


@pytest.mark.parametrize("packet", list(BAD_LAYOUTS.values()), ids=list(BAD_LAYOUTS))
def test_a_malformed_startup_layout_gets_fatal_08P01_like_the_server(relay, pg, packet):
    for port in (pg.port, relay.port):
        msgs = answer_to(port, packet)
        assert [m[0] for m in msgs] == ["E"], (port, msgs)
        fields = error_fields(msgs)
        assert fields["C"] == "08P01" and fields["S"] == "FATAL", (port, fields)


def test_unsupported_protocol_version_gets_0A000(relay, pg):
    packet = struct.pack("!ii", 16, 0x12345678) + b"user\0x\0\0\0"
    for port in (pg.port, relay.port):
        msgs = answer_to(port, packet)
        assert [m[0] for m in msgs] == ["E"], (port, msgs)
        assert error_fields(msgs)["C"] == "0A000", (port, msgs)


def test_oversized_startup_packet_is_closed_without_an_answer(relay):
    assert answer_to(relay.port, struct.pack("!ii", 20000, PROTOCOL_V3)) == []


def test_many_garbage_connections_in_parallel_do_not_disturb_a_session(relay):
    bg = BackgroundQueries(relay)

    packets = list(BAD_LENGTHS.values()) + list(BAD_LAYOUTS.values())
    wrong = []

    def garbage(i):
        packet = packets[i % len(packets)]
        try:
            msgs = answer_to(relay.port, packet)
        except Exception as e:  # noqa: BLE001 - a timeout or anything else is a failure
            wrong.append((packet, repr(e)))
            return
        expected = [] if packet in BAD_LENGTHS.values() else ["E"]
        if [m[0] for m in msgs] != expected:
            wrong.append((packet, msgs))

    threads = [threading.Thread(target=garbage, args=(i,)) for i in range(60)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    assert not any(t.is_alive() for t in threads)
    assert wrong == []
    bg.finish()


def test_startup_packet_sent_one_byte_at_a_time_still_logs_in(relay):
    with RawClient(relay.port) as raw:
        raw.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for b in startup_packet(application_name="byte-by-byte"):
            raw.send(bytes([b]))
            time.sleep(0.002)
        msgs = raw.read_until("ZE")
        types = [m[0] for m in msgs]
        assert types[0] == "R" and msgs[0][1][:4] == struct.pack("!i", 0), msgs  # AuthenticationOk
        assert "K" in types and types[-1] == "Z", types
        # a query split the same way is answered too
        payload = b"SELECT 'split'\0"
        for b in b"Q" + struct.pack("!i", len(payload) + 4) + payload:
            raw.send(bytes([b]))
        msgs = raw.read_until("Z")
        assert data_rows(msgs) == [("split",)]
        raw.send_terminate()
        assert raw.read_message() is None


def test_ssl_request_is_answered_N_then_plain_startup_works(relay):
    with RawClient(relay.port) as raw:
        raw.send(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        assert raw.read_byte() == b"N"
        raw.login()
        assert data_rows(raw.simple_query("SELECT 1")) == [("1",)]


def test_gssenc_request_is_answered_N_then_plain_startup_works(relay):
    with RawClient(relay.port) as raw:
        raw.send(struct.pack("!ii", 8, GSSENC_REQUEST_CODE))
        assert raw.read_byte() == b"N"
        raw.send(struct.pack("!ii", 8, SSL_REQUEST_CODE))
        assert raw.read_byte() == b"N"
        raw.login()
        assert data_rows(raw.simple_query("SELECT 2")) == [("2",)]


def test_silent_connections_do_not_block_other_clients(relay):
    silent = [socket.create_connection(("127.0.0.1", relay.port)) for _ in range(20)]
    partial = []
    for _ in range(10):
        s = socket.create_connection(("127.0.0.1", relay.port))
        s.sendall(startup_packet()[:6])  # half a startup packet, then nothing
        partial.append(s)
    try:
        t0 = time.monotonic()
        with relay.connect() as c:
            assert c.execute("SELECT 'not blocked'").fetchone() == ("not blocked",)
        assert time.monotonic() - t0 < 2
    finally:
        for s in silent + partial:
            s.close()


def test_client_login_timeout_closes_silent_connections(relay_factory):
    relay = relay_factory(client_login_timeout="1s")
    with RawClient(relay.port, timeout=10) as silent, RawClient(relay.port, timeout=10) as partial:
        partial.send(startup_packet()[:10])
        t0 = time.monotonic()
        silent.read_to_eof()
        partial.read_to_eof()
        assert time.monotonic() - t0 < 5
    # a client that logs in promptly is not affected
    with relay.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_newer_minor_version_and_protocol_options_are_negotiated_down_to_3_0(relay):
    """Protocol 3.9 with a _pq_ option: pgrelay answers NegotiateProtocolVersion ('v') as a
    server speaking only 3.0 would (PostgreSQL 15 itself gives the same answer), asks the node
    for 3.0, and the session then works at 3.0."""
    with RawClient(relay.port) as raw:
        body = struct.pack("!i", (3 << 16) | 9)
        for k, v in (("user", "postgres"), ("database", "postgres"), ("_pq_.frobnicate", "on")):
            body += k.encode() + b"\0" + v.encode() + b"\0"
        body += b"\0"
        raw.send(struct.pack("!i", len(body) + 4) + body)
        msgs = raw.read_until("ZE")
        assert msgs[-1][0] == "Z", msgs
        negotiation = [b for t, b in msgs if t == "v"]
        assert len(negotiation) == 1, msgs
        newest, n_options = struct.unpack("!ii", negotiation[0][:8])
        # the whole version number of 3.0: minor 0
        assert newest & 0xFFFF == 0 and n_options == 1, negotiation
        assert negotiation[0][8:].rstrip(b"\0") == b"_pq_.frobnicate", negotiation
        assert data_rows(raw.simple_query("SELECT 40 + 2")) == [("42",)]


@pytest.mark.parametrize("length", [2, -1, 0x7FFFFFF0])
def test_a_bad_message_length_mid_session_gets_08P01_and_spares_others(relay, length):
    bg = BackgroundQueries(relay)
    logged = relay.log().count("invalid message length")
    with RawClient(relay.port) as raw:
        raw.login()
        raw.send(b"Q" + struct.pack("!i", length))
        msgs = raw.read_to_eof()
    assert [m[0] for m in msgs] == ["E"], msgs
    fields = error_fields(msgs)
    assert fields["C"] == "08P01" and fields["S"] == "FATAL", fields
    wait_for(lambda: relay.log().count("invalid message length") > logged,
             what="this session's invalid length in the log")
    bg.finish()
