"""A database node that misbehaves on purpose, for pgrelay-agent's probes: it speaks just
enough of the PostgreSQL protocol to pass a probe, and can be told to stop answering, answer
with a FATAL and close, send garbage, or close at once, at any moment (``stub.mode = ...``
applies to the connections it accepts from then on; ``drop()`` ends the ones it holds).

Modes:

- "primary": trusts every login and answers every Query with the one row the agent's probe
  query reads (a primary, not in recovery); SSLRequest and GSSENCRequest get 'N'
- "slow": as "primary", but each answer to a Query comes ``slow_seconds`` late (a busy node
  that is still healthy)
- "silent": accepts and reads, never answers (a node that hangs)
- "fatal": answers the startup packet with ErrorResponse FATAL 57P03 "the database system is
  shutting down", then closes (a node on its way down)
- "garbage": answers the startup packet with bytes that are no protocol message, then closes
- "close": closes each connection as soon as it is accepted
"""

import socket
import struct
import threading
import time

MODES = ("primary", "slow", "silent", "fatal", "garbage", "close")

SSL_REQUEST = 80877103
GSSENC_REQUEST = 80877104


def message(mtype, payload=b""):
    return mtype + struct.pack("!i", len(payload) + 4) + payload


def error_response(sqlstate, text):
    fields = b"SFATAL\0VFATAL\0C" + sqlstate + b"\0M" + text + b"\0\0"
    return message(b"E", fields)


def probe_answer():
    """The probe query's answer for a primary: six columns, one row."""
    names = [b"in_recovery", b"lsn", b"age", b"streaming", b"timeline", b"received"]
    desc = struct.pack("!h", len(names))
    for name in names:
        desc += name + b"\0" + struct.pack("!ihihih", 0, 0, 25, -1, -1, 0)
    values = [b"f", b"50331648", b"0", b"0", b"1", b"0"]
    row = struct.pack("!h", len(values))
    for v in values:
        row += struct.pack("!i", len(v)) + v
    return (message(b"T", desc) + message(b"D", row) + message(b"C", b"SELECT 1\0")
            + message(b"Z", b"I"))


class NodeStub:
    """Listens on 127.0.0.1:port (0: any free one) in a thread; see the module's doc."""

    def __init__(self, mode="primary", port=0):
        assert mode in MODES, mode
        self.mode = mode
        self.slow_seconds = 0.3
        self.accepted = 0
        self.queries = 0  # Query messages received
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", port))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.lock = threading.Lock()
        self.closed = threading.Event()
        threading.Thread(target=self._accept, daemon=True).start()

    def drop(self):
        """Close every connection it holds (as a node that goes away)."""
        with self.lock:
            conns, self.conns = self.conns, []
        for c in conns:
            try:
                # shutdown first: a close alone leaves the socket open while its thread is
                # blocked in recv (no FIN is sent)
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            try:
                c.close()
            except OSError:
                pass

    def close(self):
        self.closed.set()
        self.sock.close()
        self.drop()

    def _accept(self):
        while not self.closed.is_set():
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with self.lock:
                self.conns.append(c)
            threading.Thread(target=self._serve, args=(c, self.mode), daemon=True).start()

    @staticmethod
    def _read(c, n):
        buf = b""
        while len(buf) < n:
            chunk = c.recv(n - len(buf))
            if not chunk:
                raise EOFError
            buf += chunk
        return buf

    def _serve(self, c, mode):
        try:
            self._session(c, mode)
        except (EOFError, OSError):
            pass
        finally:
            try:
                c.close()
            except OSError:
                pass

    def _session(self, c, mode):
        if mode == "close":
            return
        while True:
            (length,) = struct.unpack("!i", self._read(c, 4))
            (code,) = struct.unpack("!i", self._read(c, 4))
            self._read(c, length - 8)
            if code not in (SSL_REQUEST, GSSENC_REQUEST):
                break
            c.sendall(b"N")
        if mode == "silent":
            while self._read(c, 1):
                pass
        if mode == "fatal":
            c.sendall(error_response(b"57P03", b"the database system is shutting down"))
            return
        if mode == "garbage":
            c.sendall(b"\x00\xffHTTP/1.1 400 Bad Request\r\n\r\n" * 4)
            return
        c.sendall(message(b"R", struct.pack("!i", 0))
                  + message(b"S", b"server_version\x0015.0\0")
                  + message(b"K", struct.pack("!ii", 4242, 1234)) + message(b"Z", b"I"))
        while True:
            mtype = self._read(c, 1)
            (length,) = struct.unpack("!i", self._read(c, 4))
            self._read(c, length - 4)
            if mtype == b"X":
                return
            if mtype == b"Q":
                self.queries += 1
                if mode == "slow":
                    time.sleep(self.slow_seconds)  # the node's slowness itself
                c.sendall(probe_answer())
