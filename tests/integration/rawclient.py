"""A PostgreSQL v3 protocol client on a plain socket, and the parsing of what comes back.

RawClient       byte-level control: split packets, garbage, abrupt disconnects
startup_packet, startup_packet_for, parse_fields, error_fields, data_rows; the protocol's
request codes
"""

import contextlib
import socket
import struct


PROTOCOL_V3 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def startup_packet_for(code, params):
    """A startup packet: length, protocol ``code`` (major << 16 | minor), then ``params``
    ({name: value}, in their order) and the terminating NUL."""
    body = struct.pack("!i", code)
    for k, v in params.items():
        body += k.encode() + b"\0" + str(v).encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def startup_packet(user="postgres", database="postgres", **params):
    """A protocol 3.0 startup packet for ``user`` and ``database`` with more ``params``."""
    return startup_packet_for(PROTOCOL_V3, {"user": user, "database": database, **params})


def parse_fields(body):
    """Fields of an ErrorResponse / NoticeResponse body as {code_char: text}."""
    fields = {}
    for part in body.split(b"\0"):
        if part:
            fields[chr(part[0])] = part[1:].decode(errors="replace")
    return fields


class RawClient:
    """A PostgreSQL v3 protocol client on a plain TCP socket, for tests that need
    byte-level control (split packets, garbage, abrupt disconnects)."""

    def __init__(self, port, host="127.0.0.1", timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.buf = b""
        self.was_reset = False  # peer closed with RST rather than FIN

    # -- writing
    def send(self, data):
        self.sock.sendall(data)

    def send_startup(self, user="postgres", database="postgres", **params):
        self.send(startup_packet(user, database, **params))

    def send_query(self, sql):
        payload = sql.encode() + b"\0"
        self.send(b"Q" + struct.pack("!i", len(payload) + 4) + payload)

    def send_terminate(self):
        self.send(b"X" + struct.pack("!i", 4))

    # -- reading
    def _fill(self, n):
        while len(self.buf) < n:
            try:
                chunk = self.sock.recv(65536)
            except ConnectionResetError:
                # a peer closing with unread input sends RST; that is a close too
                self.was_reset = True
                return False
            if not chunk:
                return False
            self.buf += chunk
        return True

    def read_byte(self):
        """One raw byte (answer to SSLRequest/GSSENCRequest); None on EOF."""
        if not self._fill(1):
            return None
        b, self.buf = self.buf[:1], self.buf[1:]
        return b

    def read_message(self):
        """(type_char, body) of the next backend message, or None on EOF."""
        if not self._fill(5):
            return None
        mtype = chr(self.buf[0])
        (length,) = struct.unpack("!i", self.buf[1:5])
        if not self._fill(1 + length):
            return None
        body = self.buf[5 : 1 + length]
        self.buf = self.buf[1 + length :]
        return mtype, body

    def read_until(self, types, limit=10000):
        """Read messages until one whose type is in ``types`` (inclusive) or EOF.
        Returns the list of (type, body)."""
        msgs = []
        for _ in range(limit):
            msg = self.read_message()
            if msg is None:
                return msgs
            msgs.append(msg)
            if msg[0] in types:
                return msgs
        raise AssertionError("too many messages")

    def read_to_eof(self, max_msgs=100):
        """All messages until the peer closes the connection (raises on timeout)."""
        msgs = []
        for _ in range(max_msgs):
            msg = self.read_message()
            if msg is None:
                return msgs
            msgs.append(msg)
        raise AssertionError(f"connection not closed; got {msgs!r}")

    def login(self, user="postgres", database="postgres", **params):
        """Trust login; returns the messages up to and including ReadyForQuery."""
        self.send_startup(user, database, **params)
        msgs = self.read_until("ZE")
        assert msgs and msgs[-1][0] == "Z", f"login failed: {msgs!r}"
        return msgs

    def simple_query(self, sql):
        self.send_query(sql)
        return self.read_until("Z")

    def close(self, reset=False):
        if reset:  # RST instead of FIN
            self.sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        with contextlib.suppress(OSError):
            self.sock.close()


def error_fields(msgs):
    """Fields of the first ErrorResponse in ``msgs`` (None if there is none)."""
    for mtype, body in msgs:
        if mtype == "E":
            return parse_fields(body)
    return None


def data_rows(msgs):
    """Text values of the DataRow messages in ``msgs`` as a list of tuples."""
    rows = []
    for mtype, body in msgs:
        if mtype != "D":
            continue
        (ncols,) = struct.unpack("!h", body[:2])
        pos, row = 2, []
        for _ in range(ncols):
            (n,) = struct.unpack("!i", body[pos : pos + 4])
            pos += 4
            if n < 0:
                row.append(None)
            else:
                row.append(body[pos : pos + n].decode())
                pos += n
        rows.append(tuple(row))
    return rows


# what conftest offers (suite.py), private names that helpers import included
__all__ = ["PROTOCOL_V3", "SSL_REQUEST_CODE", "GSSENC_REQUEST_CODE", "CANCEL_REQUEST_CODE",
           "startup_packet", "startup_packet_for", "parse_fields", "RawClient", "error_fields",
           "data_rows"]
