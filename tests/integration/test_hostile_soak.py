"""A hostile-client soak (issue 10 Deliver 3; DESIGN.md safety invariant 7).

For SOAK_SECONDS, several threads throw at one pgrelay what broken and malicious clients send:
noise, huge and negative lengths, truncated startup packets, unknown protocol versions,
SSL/GSS requests followed by garbage, random cancel requests, bytes that are not UTF-8 and
control characters in every startup field, garbage after a good login, and slowloris
connections; and, as a stats-level user, console lines no operator would type. Meanwhile a
canary session runs a statement every 50 ms and the console is polled (`show clients`,
`show stats`, both forms). Then: the canary never failed, no process was
restarted, every answer of the console was valid, a new session works, and the session slots
and the workers' descriptors are back where they started.
"""

import contextlib
import json
import os
import random
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import admin, admin_socket, pid_alive, wait_for

SOAK_SECONDS = 20
PROTOCOL_V3 = 196608
CANCEL_CODE, SSL_CODE, GSS_CODE = 80877102, 80877103, 80877104
HOSTILE_TEXT = [
    b"\xff\xfe\xfd",
    b"\x1b[2J\x1b]0;owned\x07",
    "é".encode() * 40,
    b"\xc3",
    b"a\rb\nc\td",
    "\u202e\u0085".encode(),
    b"x" * 300,
]


def packet(body):
    return struct.pack("!I", len(body) + 4) + body


def startup(params, code=PROTOCOL_V3):
    body = struct.pack("!I", code)
    for k, v in params:
        body += k + b"\0" + v + b"\0"
    return packet(body + b"\0")


class Hostile:
    """One kind of attack per method; each opens its own connection(s) and never raises."""

    def __init__(self, port, rng):
        self.port = port
        self.rng = rng
        self.sent = 0

    def _connect(self):
        s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return s

    def _send_then_drain(self, data, read=True):
        with contextlib.suppress(OSError), self._connect() as s:
            s.sendall(data)
            self.sent += 1
            if read:
                s.settimeout(1)
                while s.recv(65536):
                    pass

    def noise(self):
        self._send_then_drain(self.rng.randbytes(self.rng.randint(1, 2000)))

    def bad_length(self):
        length = self.rng.choice([0, 3, 7, 10001, 0x7FFFFFFF, 0xFFFFFFFF, 0x80000000])
        self._send_then_drain(struct.pack("!II", length, PROTOCOL_V3) + b"user\0x\0\0")

    def truncated(self):
        p = startup([(b"user", b"postgres"), (b"database", b"postgres")])
        self._send_then_drain(p[: self.rng.randint(1, len(p) - 1)], read=False)

    def unknown_version(self):
        code = self.rng.choice([0x00020000, 0x00040000, 0x00030063, 0x12345678, 0xFFFF0000])
        self._send_then_drain(startup([(b"user", b"postgres")], code=code))

    def ssl_then_garbage(self):
        with contextlib.suppress(OSError), self._connect() as s:
            s.sendall(struct.pack("!II", 8, self.rng.choice([SSL_CODE, GSS_CODE])))
            s.settimeout(1)
            s.recv(1)
            s.sendall(self.rng.randbytes(self.rng.randint(1, 600)))
            self.sent += 1
            while s.recv(65536):
                pass

    def cancel(self):
        body = struct.pack("!III", CANCEL_CODE, self.rng.getrandbits(32), self.rng.getrandbits(32))
        if self.rng.random() < 0.3:
            body += self.rng.randbytes(self.rng.randint(1, 8))  # a wrong length
        self._send_then_drain(packet(body))

    def hostile_fields(self):
        params = [(b"user", self.rng.choice([b"postgres"] + HOSTILE_TEXT)),
                  (b"database", self.rng.choice(HOSTILE_TEXT)),
                  (b"application_name", self.rng.choice(HOSTILE_TEXT)),
                  (self.rng.choice(HOSTILE_TEXT), self.rng.choice(HOSTILE_TEXT))]
        self._send_then_drain(startup(params))

    def garbage_after_login(self):
        with contextlib.suppress(OSError), self._connect() as s:
            s.sendall(startup([(b"user", b"postgres"), (b"database", b"postgres"),
                               (b"application_name", b"\x1b[31msoak\xff")]))
            s.settimeout(2)
            got = b""
            while b"Z\x00\x00\x00\x05" not in got:
                chunk = s.recv(65536)
                if not chunk:
                    return
                got += chunk
            kind = self.rng.randrange(3)
            if kind == 0:  # an impossible message length
                s.sendall(b"Q" + struct.pack("!I", self.rng.choice([0, 3, 0xFFFFFFFF])))
            elif kind == 1:  # a statement whose text is not UTF-8, then noise
                q = b"SELECT 1 /* \xff\x1b[2J */\0"
                s.sendall(b"Q" + struct.pack("!I", len(q) + 4) + q + self.rng.randbytes(50))
            else:  # a huge message announced, a little sent, then gone
                s.sendall(b"Q" + struct.pack("!I", 0x3FFFFFFF) + b"SELECT " * 100)
            self.sent += 1
            with contextlib.suppress(OSError):
                while s.recv(65536):
                    pass

    ATTACKS = ["noise", "bad_length", "truncated", "unknown_version", "ssl_then_garbage",
               "cancel", "hostile_fields", "garbage_after_login"]


def slowloris(port, stop, held, n=10):
    """n connections that dribble a startup packet, one byte at a time, until stop."""
    p = startup([(b"user", b"postgres"), (b"database", b"postgres")])
    socks = []
    try:
        for _ in range(n):
            with contextlib.suppress(OSError):
                socks.append([socket.create_connection(("127.0.0.1", port), timeout=2), 0])
        held.append(len(socks))
        while not stop.is_set():
            for entry in socks:
                s, sent = entry
                if sent < len(p) - 1:  # never the last byte
                    with contextlib.suppress(OSError):
                        s.sendall(p[sent:sent + 1])
                        entry[1] += 1
            stop.wait(0.2)
    finally:
        for s, _ in socks:
            s.close()


# Run as a stats-level user for `seconds`: console lines no operator would type (noise,
# escapes, NUL, overlong lines, half lines, prompt mode never read), so that none can be a
# command that changes anything. Prints how many connections it made.
_CONSOLE_NOISE = """
import os, random, socket, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
rng = random.Random(7)
lines = [b"show \\x1b[2J clients", b"show info\\x00; show stats", b"\\xff\\xfe", b"x" * 5000,
         b"show clients json; " * 300, b"prompt", b"help", b"show nodes \\xe2\\x80\\xae",
         b"show", b";;;", b"kill client 1"]
n = 0
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(2)
        s.connect(path)
        line = rng.choice(lines) if rng.random() < 0.7 else rng.randbytes(rng.randint(1, 300))
        if rng.random() < 0.2:
            s.sendall(b"prompt\\n" + (line + b"\\n") * 50)  # and never read
        else:
            s.sendall(line + (b"\\n" if rng.random() < 0.8 else b""))
            if rng.random() < 0.5:
                s.shutdown(socket.SHUT_WR)
                while s.recv(65536):
                    pass
        s.close()
        n += 1
    except OSError:
        pass
    time.sleep(0.002)  # pacing, not synchronisation: a few hundred a second is hostile enough
print(n)
"""


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def stats_clients(relay):
    return json.loads(admin(relay, "show stats json")[:-2])["clients"]


@pytest.mark.deadline(90)
def test_hostile_clients_never_disturb_a_canary_the_console_or_the_processes(relay_factory):
    r = relay_factory(workers=2, max_client_conn=200, admin_socket_mode="0666",
                      stats_users="postgres")
    os.chmod(r.workdir, 0o711)  # the console noise runs as postgres
    wait_for(lambda: "version" in admin(r, "show info"), what="the admin socket")
    master = r.pid
    workers = sorted(r.worker_pids())
    assert len(workers) == 2, workers

    canary = r.connect()
    assert canary.execute("SELECT 1").fetchone() == (1,)
    wait_for(lambda: stats_clients(r) == 1, what="only the canary connected")
    fds_before = {p: fd_count(p) for p in workers}
    master_fds_before = fd_count(master)

    stop = threading.Event()
    failures = []
    canary_runs = [0]
    console_polls = [0]

    def canary_loop():
        while not stop.is_set():
            try:
                t0 = time.monotonic()
                assert canary.execute("SELECT 42").fetchone() == (42,)
                canary_runs[0] += 1
                if time.monotonic() - t0 > 10:  # loose: a hang, not a slow shared machine
                    failures.append(f"canary: a statement took {time.monotonic() - t0:.1f} s")
            except Exception as e:  # noqa: BLE001 - any failure of the canary is the finding
                failures.append(f"canary: {e!r}")
                return
            stop.wait(0.05)

    def console_loop():
        path = admin_socket(r)
        while not stop.is_set():
            for command in ("show clients", "show stats", "show clients json", "show stats json"):
                try:
                    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                        s.settimeout(10)
                        s.connect(path)
                        s.sendall(command.encode() + b"\n")
                        out = b""
                        while chunk := s.recv(65536):
                            out += chunk
                    text = out.decode("utf-8")
                    assert text.endswith("\n\n"), text
                    if command.endswith("json"):
                        json.loads(text[:-2])
                    bad = [c for c in text if (ord(c) < 32 and c != "\n") or 0x7F <= ord(c) <= 0x9F]
                    assert not bad, f"control characters in {command}: {bad!r}"
                except Exception as e:  # noqa: BLE001
                    failures.append(f"console {command}: {e!r}")
                    return
                console_polls[0] += 1
            stop.wait(0.1)

    attacks = []

    def attacker(seed):
        rng = random.Random(seed)
        h = Hostile(r.port, rng)
        while not stop.is_set():
            getattr(h, rng.choice(Hostile.ATTACKS))()
        attacks.append(h.sent)

    console_noise = subprocess.Popen(
        ["runuser", "-u", "postgres", "--", "/usr/bin/python3", "-c", _CONSOLE_NOISE,
         admin_socket(r), str(SOAK_SECONDS)],
        stdout=subprocess.PIPE, text=True)
    held = []
    threads = [threading.Thread(target=canary_loop, daemon=True),
               threading.Thread(target=console_loop, daemon=True),
               threading.Thread(target=slowloris, args=(r.port, stop, held), daemon=True)]
    threads += [threading.Thread(target=attacker, args=(seed,), daemon=True) for seed in range(4)]
    for t in threads:
        t.start()
    deadline = time.monotonic() + SOAK_SECONDS
    while time.monotonic() < deadline and not failures:
        time.sleep(0.2)
        if not pid_alive(master):
            failures.append("the master died")
    stop.set()
    for t in threads:
        t.join(timeout=15)
    assert not [t for t in threads if t.is_alive()], "a soak thread did not stop"
    noise_out, _ = console_noise.communicate(timeout=30)
    assert console_noise.returncode == 0, "the console noise maker failed"

    assert not failures, failures
    # at most 20 a second; a few a second proves it ran all along, even on a loaded machine
    assert canary_runs[0] >= SOAK_SECONDS * 2, f"the canary ran only {canary_runs[0]} statements"
    assert console_polls[0] >= SOAK_SECONDS, f"the console answered only {console_polls[0]} polls"
    assert held and held[0] > 0, "no slowloris connection was made"
    print(f"soak: {sum(attacks)} hostile connections, {held[0]} slowloris, "
          f"{noise_out.strip()} hostile console connections, "
          f"{canary_runs[0]} canary statements, {console_polls[0]} console answers")
    assert int(noise_out) >= SOAK_SECONDS * 5, f"only {noise_out.strip()} console connections"
    assert sum(attacks) >= SOAK_SECONDS * 10, f"only {sum(attacks)} hostile connections"

    # nobody restarted
    assert pid_alive(master)
    assert sorted(r.worker_pids()) == workers, "a worker was restarted"
    restarts = [w["restarts"] for w in json.loads(admin(r, "show workers json")[:-2])]
    assert restarts == [0, 0], restarts

    # a new session works, and the canary still does
    with r.connect() as c:
        assert c.execute("SELECT 'after the soak'").fetchone() == ("after the soak",)
    assert canary.execute("SELECT 1").fetchone() == (1,)

    # every slot and descriptor the attackers took is given back
    wait_for(lambda: stats_clients(r) == 1, timeout=15, what="session slots back to the canary's")
    wait_for(lambda: {p: fd_count(p) for p in workers} == fds_before, timeout=15,
             what=f"worker descriptors back to {fds_before}")
    wait_for(lambda: fd_count(master) == master_fds_before, timeout=15,
             what=f"the master's descriptors back to {master_fds_before}")
    canary.close()
