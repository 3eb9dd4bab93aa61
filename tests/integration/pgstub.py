"""A tiny stand-in for a PostgreSQL server, for what a real one cannot be made to do: stall in
the middle of a message, or speak protocol 3.2 (a 32-byte cancel key, as PostgreSQL 18 does).

It trusts every login, answers every Query with one text column and then does what its mode
says, and records what it was sent (startup parameters, cancel requests) for the test.

stub_factory    fixture: ``stub_factory(**PgStub's keys)``, each stub closed at teardown
stub_relay      a pgrelay (relay_factory) whose one node is a stub"""

import socket
import struct
import threading

import pytest


def message(mtype, payload=b""):
    return mtype + struct.pack("!i", len(payload) + 4) + payload


def row_description(name=b"x"):
    # one text column: name, table oid, attnum, type oid 25, typlen -1, typmod -1, format 0
    return message(b"T", struct.pack("!h", 1) + name + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0))


def data_row(value):
    return message(b"D", struct.pack("!hi", 1, len(value)) + value)


def ready(status=b"I"):
    return message(b"Z", status)


class PgStub:
    """Listens on 127.0.0.1:port in a thread. ``mode`` says what a Query gets:

    - "answer": RowDescription, one DataRow "stub", CommandComplete, ReadyForQuery
    - "stall_mid_row": RowDescription, then the first half of a DataRow, then nothing
    - "stall_after_row": RowDescription and a whole DataRow, then nothing
    - "die_when_idle": after the login, once ``die`` (an Event) is set, the WARNING an idle
      session gets at PostgreSQL's immediate shutdown, then the connection closed

    ``protocol_minor`` 2 makes it answer like PostgreSQL 18 asked for protocol 3.2: a
    BackendKeyData with a 32-byte secret (to a client that asked for 3.0 it sends the 4-byte
    one, as a real server does); ``always_long_key`` makes it send the 32-byte one whatever
    was asked (a misbehaving server)."""

    def __init__(self, mode="answer", protocol_minor=0, always_long_key=False):
        self.mode = mode
        self.protocol_minor = protocol_minor
        self.always_long_key = always_long_key
        self.startups = []        # (protocol version, {param: value}) of each StartupMessage
        self.cancels = []         # raw bodies of CancelRequests (after the length)
        self.cancel_hold = None   # a threading.Event: cancel connections close once it is set
        self.secret = bytes(range(1, 33))
        self.pid = 4242
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.closed = threading.Event()
        self.die = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        self.closed.set()
        self.sock.close()
        for c in self.conns:
            try:
                c.close()
            except OSError:
                pass

    def _accept(self):
        while not self.closed.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.conns.append(c)
            threading.Thread(target=self._serve, args=(c,), daemon=True).start()

    @staticmethod
    def _read(c, n):
        buf = b""
        while len(buf) < n:
            chunk = c.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _serve(self, c):
        try:
            self._session(c)
        except (EOFError, OSError):
            pass

    def _session(self, c):
        (length,) = struct.unpack("!i", self._read(c, 4))
        body = self._read(c, length - 4)
        (code,) = struct.unpack("!i", body[:4])
        if code == 80877102:  # CancelRequest
            self.cancels.append(body[4:])
            if self.cancel_hold is not None:
                self.cancel_hold.wait(30)
            c.close()
            return
        parts = body[4:].split(b"\0")
        params = {parts[i].decode(): parts[i + 1].decode() for i in range(0, len(parts) - 2, 2)}
        self.startups.append((code, params))
        minor = code & 0xFFFF
        out = message(b"R", struct.pack("!i", 0))
        if minor > self.protocol_minor:
            # NegotiateProtocolVersion: the newest minor version we speak, no options refused
            out += message(b"v", struct.pack("!ii", (3 << 16) | self.protocol_minor, 0))
            minor = self.protocol_minor
        secret = self.secret if minor >= 2 or self.always_long_key else self.secret[:4]
        out += message(b"K", struct.pack("!i", self.pid) + secret)
        out += message(b"S", b"server_version\x0018.0\0") + ready()
        c.sendall(out)
        if self.mode == "die_when_idle":
            self.die.wait(30)
            c.sendall(message(b"N", b"SWARNING\0VWARNING\0C57P01\0Mterminating connection due "
                                    b"to immediate shutdown command\0\0"))
            c.shutdown(socket.SHUT_RDWR)
            c.close()
            return
        while True:
            mtype = self._read(c, 1)
            (length,) = struct.unpack("!i", self._read(c, 4))
            self._read(c, length - 4)
            if mtype == b"X":
                c.close()
                return
            if mtype != b"Q":
                continue
            row = data_row(b"stub" * 1000)
            if self.mode == "answer":
                c.sendall(row_description() + data_row(b"stub") + message(b"C", b"SELECT 1\0")
                          + ready())
            elif self.mode == "stall_mid_row":
                c.sendall(row_description() + row[: len(row) // 2])
            elif self.mode == "stall_after_row":
                c.sendall(row_description() + row)


@pytest.fixture
def stub_factory():
    stubs = []

    def make(**kw):
        stubs.append(PgStub(**kw))
        return stubs[-1]

    yield make
    for s in stubs:
        s.close()


def stub_relay(relay_factory, stub, **extra):
    """A pgrelay whose one node is the stub (no agent: the stub answers no health checks)."""
    return relay_factory(agent="off", nodes=[("stub", {"host": "127.0.0.1", "port": stub.port,
                                                        "role": "primary"})], **extra)
