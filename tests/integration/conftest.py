"""Shared fixtures for the pgrelay integration suite.

Everything here runs against real processes: a throwaway PostgreSQL 15 cluster
(one per test session) and pgrelay binaries started from generated configs.

Fixtures
--------
pg              session-scoped PostgreSQL 15 (see PgCluster)
relay           module-scoped pgrelay (workers=2, max_client_conn=1000) in front of ``pg``
relay_factory   function-scoped factory: ``relay_factory(max_client_conn=3)`` starts a
                dedicated pgrelay with extra [pgrelay] keys (``env=`` for its environment);
                at teardown each must stop cleanly (Relay.stop)
daemons         ``daemons(conf, pidfile)``: pgrelay -d as an init script runs it (Daemon)

Helpers
-------
RawClient       minimal PostgreSQL v3 protocol client on a plain socket
wait_for        poll a condition with a timeout
free_port       a port below the ephemeral range, never handed to two pytest processes
start_on_free_port  start a daemon on such a port, again on another if it lost the port
wait_admin_ready    wait for a console that start_relay did not start
require         a prerequisite of the machine: skip without it, fail under CI
SCHED_SLACK     what a loaded machine may add to a promised deadline
loadgen.py      InThread (work in a background thread), Writer (writes in a loop)
"""

import contextlib
import errno
import fcntl
import http.client as httplib
import json
import os
import random
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import psycopg
import pytest

PG_BIN = "/usr/lib/postgresql/15/bin"
PGRELAY_BIN = os.environ.get(
    "PGRELAY_BIN",
    os.path.join(os.path.dirname(__file__), "..", "..", "bin", "pgrelay"),
)
PGRELAY_BIN = os.path.abspath(PGRELAY_BIN)

MD5_USER, MD5_PASSWORD = "md5user", "md5-secret-pw"
SCRAM_USER, SCRAM_PASSWORD = "scramuser", "scram-secret-pw"

DEFAULT_TEST_TIMEOUT = 120  # seconds; per-test watchdog (see pytest_runtest_call)

# Seconds a loaded machine (two CPUs shared by several test runs) may add to a promised
# deadline. A test of a timeout asserts "the timeout, and at most SCHED_SLACK more"; a bound
# that only checks that something does not hang is looser still.
SCHED_SLACK = 4.0


# --------------------------------------------------------------------------- #
# generic helpers
# --------------------------------------------------------------------------- #


SANITIZER_DIR = os.environ.get("PGRELAY_SANITIZER_DIR")


@pytest.fixture(autouse=True)
def no_sanitizer_reports():
    """Under `make SANITIZE=... test`: a sanitizer report written by any of our processes while
    a test ran fails that test, with the report."""
    yield
    if not SANITIZER_DIR or not os.path.isdir(SANITIZER_DIR):
        return
    reports = sorted(f for f in os.listdir(SANITIZER_DIR) if not f.endswith(".seen"))
    texts = []
    for name in reports:
        path = os.path.join(SANITIZER_DIR, name)
        with open(path, errors="replace") as f:
            texts.append(f"---- {name}\n{f.read()}")
        os.rename(path, path + ".seen")
    assert not texts, "sanitizer reports:\n" + "\n".join(texts)


def require(available, why):
    """A test's prerequisite of the machine (a program, a kernel feature): without it the test
    is skipped, except under CI (the CI environment variable set and not "0"/"false"), where
    a missing prerequisite is a failure, so that no check silently goes untested there."""
    if available:
        return
    if os.environ.get("CI", "").lower() not in ("", "0", "false", "no"):
        pytest.fail(f"missing prerequisite under CI: {why}")
    pytest.skip(why)


def wait_for(cond, timeout=10.0, interval=0.05, what="condition"):
    """Poll ``cond()`` until it returns a truthy value; return that value.

    Raises AssertionError naming ``what`` if it is still falsy after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# Test ports come from below the kernel's ephemeral range (ip_local_port_range, 32768-60999 on
# Debian), so that no client socket can take one between free_port() and the daemon's bind. A
# counter in PORT_STATE, under an exclusive lock, hands each port out once per cycle to every
# pytest process on this machine (several run at the same time).
PORT_FIRST, PORT_LAST = 20000, 32767
PORT_STATE = "/tmp/pgrelay-test-ports"


def _port_bindable(port):
    """Nothing is bound to ``port`` on IPv4 or IPv6 (a TIME_WAIT socket counts as bound)."""
    for family, addr in ((socket.AF_INET, "127.0.0.1"), (socket.AF_INET, "0.0.0.0"),
                         (socket.AF_INET6, "::")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                if family == socket.AF_INET6:
                    s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                s.bind((addr, port))
        except OSError as e:
            if e.errno == errno.EADDRNOTAVAIL and family == socket.AF_INET6:
                continue  # no IPv6 on this machine
            return False
    return True


def free_port():
    """A TCP port below the ephemeral range, free right now, that no other caller of free_port
    on this machine got in the last cycle of the range."""
    span = PORT_LAST - PORT_FIRST + 1
    fd = os.open(PORT_STATE, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            following = int(os.pread(fd, 32, 0).decode() or "x")
        except ValueError:
            following = PORT_FIRST + random.randrange(span)
        for _ in range(span):
            port = following if PORT_FIRST <= following <= PORT_LAST else PORT_FIRST
            following = PORT_FIRST + (port - PORT_FIRST + 1) % span
            if _port_bindable(port):
                os.ftruncate(fd, 0)
                os.pwrite(fd, str(following).encode(), 0)
                return port
        raise AssertionError(f"no free TCP port in {PORT_FIRST}-{PORT_LAST}")
    finally:
        os.close(fd)


PORT_IN_USE = ("in use", "cannot listen", "could not bind")  # what a daemon says when it lost
                                                             # its port


def start_on_free_port(launch, ready, discard, what, attempts=3, timeout=15, port=None,
                       in_use=PORT_IN_USE, log=lambda handle: handle.log()):
    """Start a daemon that listens on a port of free_port()'s, and wait until it is ready.

    ``launch(port, attempt)`` starts it and returns a handle with ``.proc`` (its Popen);
    ``log(handle)`` is what this start logged (default ``handle.log()``); ``ready(handle)`` says when it serves; ``discard(handle)`` kills a start that
    failed. A start that ended saying its port was taken (``in_use``, case-insensitive) is
    tried again on another port, or on ``port`` again (after a moment) when the daemon must
    come back where its peers expect it. Fails the test with the log otherwise."""
    for attempt in range(attempts):
        chosen = port if port is not None else free_port()
        handle = launch(chosen, attempt)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and handle.proc.poll() is None:
            if ready(handle):
                return handle
            time.sleep(0.05)
        rc = handle.proc.poll()
        discard(handle)
        text = log(handle)
        if rc is not None and any(s in text.lower() for s in in_use) and attempt < attempts - 1:
            if port is not None:
                time.sleep(0.2)
            continue
        pytest.fail(f"{what} did not become ready on port {chosen} (exit {rc}):\n"
                    + text[-3000:])
    raise AssertionError("unreachable")


def port_accepts(port, host="127.0.0.1", timeout=0.5):
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def port_listening(port):
    """True if some socket LISTENs on 127.0.0.1:port or 0.0.0.0:port, or on port over IPv6.

    Checked in /proc/net/tcp rather than by connecting, so that readiness probes
    don't create client connections (they would count against max_client_conn)."""
    wanted = {f"0100007F:{port:04X}", f"00000000:{port:04X}"}
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] == "0A" and parts[1] in wanted:
                return True
    # IPv6 (listen_addr = ::1, ::, or * on a dual-stack socket): any local address
    with contextlib.suppress(OSError), open("/proc/net/tcp6") as f:
        next(f)
        for line in f:
            parts = line.split()
            if parts[3] == "0A" and parts[1].endswith(f":{port:04X}"):
                return True
    return False


def _unix_socket_answers(path):
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(2)
            s.connect(path)
            s.sendall(b"show info\n")
            return s.recv(16) != b""
    except OSError:
        return False


def _is_agent(pid):
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"pgrelay-agent" in f.read().split(b"\0")[0]
    except OSError:
        return False


def child_pids(pid):
    """Pids whose parent is ``pid`` (scans /proc; the kernel has no /proc/*/children)."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # field 4 (ppid) follows the ")" closing the command name
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z" and int(fields[1]) == pid:
            out.append(int(entry))
    return sorted(out)


def pid_alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2] != "Z"


def _socket_inodes_of(pid):
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        m = re.fullmatch(r"socket:\[(\d+)\]", link)
        if m:
            inodes.add(int(m.group(1)))
    return inodes


def _tcp_inode(local_port, remote_port):
    """Inode of the IPv4 TCP socket 127.0.0.1:local_port <-> 127.0.0.1:remote_port."""
    with open("/proc/net/tcp") as f:
        next(f)
        for line in f:
            parts = line.split()
            lport = int(parts[1].split(":")[1], 16)
            rport = int(parts[2].split(":")[1], 16)
            if lport == local_port and rport == remote_port and int(parts[9]) != 0:
                return int(parts[9])
    return None


def owning_worker(relay, client_sock_port):
    """The pgrelay worker pid holding the accepted socket of the client whose
    local (ephemeral) port is ``client_sock_port``; None if not found."""
    inode = _tcp_inode(relay.port, client_sock_port)
    if inode is None:
        return None
    for w in relay.worker_pids():
        if inode in _socket_inodes_of(w):
            return w
    return None


def client_port(conn):
    """Local TCP port of a psycopg connection's socket."""
    s = socket.socket(fileno=os.dup(conn.pgconn.socket))
    try:
        return s.getsockname()[1]
    finally:
        s.close()


# --------------------------------------------------------------------------- #
# raw protocol client
# --------------------------------------------------------------------------- #

PROTOCOL_V3 = 196608
SSL_REQUEST_CODE = 80877103
GSSENC_REQUEST_CODE = 80877104
CANCEL_REQUEST_CODE = 80877102


def startup_packet(user="postgres", database="postgres", **params):
    body = struct.pack("!i", PROTOCOL_V3)
    for k, v in [("user", user), ("database", database), *params.items()]:
        body += k.encode() + b"\0" + str(v).encode() + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


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


# --------------------------------------------------------------------------- #
# PostgreSQL
# --------------------------------------------------------------------------- #


def _as_postgres(args, **kw):
    return subprocess.run(
        ["runuser", "-u", "postgres", "--", *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        **kw,
    )


class PgCluster:
    def __init__(self, datadir, port):
        self.datadir = datadir
        self.sockdir = datadir  # unix_socket_directories
        self.port = port
        self.host = "127.0.0.1"

    def conninfo(self, **kw):
        params = dict(
            host=self.host,
            port=self.port,
            user="postgres",
            dbname="postgres",
            sslmode="disable",
            gssencmode="disable",
            connect_timeout=10,
        )
        params.update(kw)
        return psycopg.conninfo.make_conninfo(**params)

    def connect(self, autocommit=True, **kw):
        """Direct connection to PostgreSQL (bypassing pgrelay)."""
        return psycopg.connect(self.conninfo(**kw), autocommit=autocommit)

    def query(self, sql, params=None):
        """Run one statement directly on PostgreSQL; its rows (None if it has none)."""
        with self.connect() as c:
            cur = c.execute(sql, params)
            return cur.fetchall() if cur.description is not None else None

    def backend_pids(self, application_name):
        rows = self.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s",
            (application_name,),
        )
        return [r[0] for r in rows]

    def active_query_pid(self, application_name, like="%pg_sleep%"):
        rows = self.query(
            "SELECT pid FROM pg_stat_activity WHERE application_name = %s"
            " AND state = 'active' AND query LIKE %s",
            (application_name, like),
        )
        return rows[0][0] if rows else None

    def pid_exists(self, pid):
        return bool(self.query("SELECT 1 FROM pg_stat_activity WHERE pid = %s", (pid,)))


@pytest.fixture(scope="session")
def pg():
    datadir = tempfile.mkdtemp(prefix="pgrelay-it-pg-")
    shutil.chown(datadir, "postgres", "postgres")
    os.chmod(datadir, 0o700)
    pgdata = os.path.join(datadir, "data")
    port = free_port()
    r = _as_postgres(
        [f"{PG_BIN}/initdb", "-D", pgdata, "--auth=trust", "-U", "postgres", "-E", "UTF8",
         "--locale=C", "--no-sync"]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    with open(os.path.join(pgdata, "postgresql.conf"), "a") as f:
        f.write(
            f"""
listen_addresses = '127.0.0.1'
port = {port}
unix_socket_directories = '{datadir}'
max_connections = 300
fsync = off
synchronous_commit = off
full_page_writes = off
shared_buffers = 128MB
max_wal_size = 2GB
log_min_messages = warning
"""
        )
    # password-checked roles first, everything else trusted
    hba = os.path.join(pgdata, "pg_hba.conf")
    with open(hba) as f:
        original = f.read()
    with open(hba, "w") as f:
        f.write(
            f"host all {MD5_USER} 127.0.0.1/32 md5\n"
            f"host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256\n"
            "host all all 127.0.0.1/32 trust\n"
            "local all all trust\n" + original
        )
    logfile = os.path.join(datadir, "postgres.log")
    r = _as_postgres(
        [f"{PG_BIN}/pg_ctl", "-D", pgdata, "-l", logfile, "-w", "-t", "60", "start"]
    )
    assert r.returncode == 0, r.stdout + r.stderr
    cluster = PgCluster(datadir, port)
    try:
        with cluster.connect() as c:
            c.execute("SET password_encryption = 'md5'")
            c.execute(f"CREATE ROLE {MD5_USER} LOGIN PASSWORD '{MD5_PASSWORD}'")
            c.execute("SET password_encryption = 'scram-sha-256'")
            c.execute(f"CREATE ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'")
        yield cluster
    finally:
        _as_postgres([f"{PG_BIN}/pg_ctl", "-D", pgdata, "-m", "immediate", "-w", "stop"])
        shutil.rmtree(datadir, ignore_errors=True)


# --------------------------------------------------------------------------- #
# pgrelay
# --------------------------------------------------------------------------- #

_LIVE_RELAYS = []  # relays not yet torn down; their logs go into failure reports


class Relay:
    """One running pgrelay master started from a generated config."""

    def __init__(self, workdir, port, conf_path, log_path, proc):
        self.workdir = workdir
        self.port = port
        self.conf_path = conf_path
        self.log_path = log_path
        self.proc = proc
        self.host = "127.0.0.1"

    @property
    def pid(self):
        return self.proc.pid

    def conninfo(self, **kw):
        params = dict(
            host=self.host,
            port=self.port,
            user="postgres",
            dbname="postgres",
            sslmode="disable",
            gssencmode="disable",
            connect_timeout=10,
        )
        params.update(kw)
        return psycopg.conninfo.make_conninfo(**params)

    def connect(self, autocommit=True, **kw):
        """psycopg connection through pgrelay."""
        return psycopg.connect(self.conninfo(**kw), autocommit=autocommit)

    def raw(self, timeout=10.0):
        return RawClient(self.port, timeout=timeout)

    def worker_pids(self):
        """The master's worker processes (its other child is pgrelay-agent)."""
        return [p for p in child_pids(self.pid) if not _is_agent(p)]

    def agent_pid(self):
        agents = [p for p in child_pids(self.pid) if _is_agent(p)]
        return agents[0] if agents else None

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def log_tail(self, n=60):
        try:
            return "".join(self.log().splitlines(True)[-n:])
        except OSError as e:
            return f"<no log: {e}>"

    def signal(self, sig):
        os.kill(self.pid, sig)

    def wait_exit(self, timeout):
        """Wait for the master to exit; return its exit status (AssertionError if not)."""
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"pgrelay master {self.pid} still running after {timeout}s"
            ) from None

    STOP_TIMEOUT = 10  # seconds from SIGINT to the master's exit: a fast shutdown of a test relay
                       # takes well under one; more is a shutdown hang

    def kill(self):
        """SIGKILL the master's whole process group (it runs in its own) and reap the master."""
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=5)

    def stop(self, check=True):
        """Fast shutdown (SIGINT). Unless the test already ended the master itself, the master
        must exit 0 within STOP_TIMEOUT seconds without killing children at its deadline, and
        leave no process of its group behind; else AssertionError (``check=False``: just make
        sure it is gone). The process group is SIGKILLed afterwards in any case."""
        problem = None
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.send_signal(signal.SIGINT)
            try:
                rc = self.proc.wait(timeout=self.STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problem = f"still running {self.STOP_TIMEOUT}s after SIGINT"
            else:
                if rc != 0:
                    problem = f"exited with status {rc} after SIGINT"
                elif "still running after the shutdown deadline" in self.log():
                    problem = "had to kill children at its shutdown deadline"
                elif _group_alive(self.proc.pid):
                    problem = "exited, but processes of its group are still running"
        self.kill()
        if problem and check:
            raise AssertionError(f"pgrelay master {self.pid} {problem}:\n{self.log_tail()}")


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def wait_admin_ready(relay_or_path, timeout=10):
    """Wait until the admin socket (a relay's, or a path) answers ``show info``; returns the
    argument. start_relay already does this: for relays started otherwise (daemon mode, by
    hand)."""
    path = relay_or_path if isinstance(relay_or_path, str) else admin_socket(relay_or_path)

    def answers_show_info():
        try:
            return "version" in admin(path, "show info", timeout=2)
        except OSError:
            return False

    wait_for(answers_show_info, timeout=timeout, what=f"admin socket {path} to answer")
    return relay_or_path


class Daemon:
    """pgrelay in daemon mode, as an init script runs it: ``run()`` must return (the daemon
    detaches), the pid comes from the pidfile, ``stop()`` is SIGTERM to that pid. The
    ``daemons`` fixture kills whatever is left at teardown."""

    STOP_TIMEOUT = 15  # seconds from SIGTERM to exit for a daemon without sessions

    def __init__(self, conf, pidfile):
        self.conf, self.pidfile = conf, pidfile
        self.seen = set()  # every master pid read from the pidfile, for the cleanup

    def run(self, *flags, timeout=15):
        """``pgrelay FLAGS`` (default ``-d -p PIDFILE -c CONF``); its CompletedProcess. The
        timeout fails a -d that does not return."""
        flags = flags or ("-d", "-p", self.pidfile, "-c", self.conf)
        return subprocess.run([PGRELAY_BIN, *flags], stdin=subprocess.DEVNULL,
                              capture_output=True, text=True, timeout=timeout)

    def pid(self):
        """The pid in the pidfile, or None."""
        try:
            with open(self.pidfile) as f:
                text = f.read().strip()
        except FileNotFoundError:
            return None
        if not text.isdigit():
            return None
        self.seen.add(int(text))
        return int(text)

    def wait_pid(self, timeout=10):
        return wait_for(self.pid, timeout=timeout, what=f"a pid in {self.pidfile}")

    def stop(self):
        """SIGTERM to the pid in the pidfile: the daemon and its children exit within
        STOP_TIMEOUT and the pidfile goes away."""
        pid = self.pid()
        assert pid and pid_alive(pid), f"no running daemon in {self.pidfile}"
        children = child_pids(pid)
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), timeout=self.STOP_TIMEOUT,
                 what=f"the daemon {pid} to exit on SIGTERM")
        wait_for(lambda: not any(pid_alive(c) for c in children), timeout=5,
                 what="its workers and agent to exit")
        wait_for(lambda: not os.path.exists(self.pidfile), timeout=5,
                 what=f"{self.pidfile} to be removed")

    def kill(self):
        for pid in self.seen:
            if pid_alive(pid):
                for p in [pid, *child_pids(pid)]:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)


@pytest.fixture
def daemons():
    """``daemons(conf, pidfile)`` -> a Daemon; every one is killed at teardown."""
    made = []

    def make(conf, pidfile):
        d = Daemon(str(conf), str(pidfile))
        made.append(d)
        return d

    yield make
    for d in made:
        d.kill()


def write_config(path, port, pg, extra=None, nodes=None, sections=None):
    """Write a pgrelay.ini. ``extra``: additional [pgrelay] keys. ``nodes``: list of
    (name, {key: value}) replacing the default single primary pointing at ``pg``.
    ``sections``: {"agent": {key: value}, "control": {...}}, written as they are."""
    settings = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "workers": 2,
        "log_level": "info",
        "admin_socket": os.path.join(os.path.dirname(os.path.abspath(path)), "admin.sock"),
    }
    settings.update(extra or {})
    if nodes is None:
        nodes = [("pg1", {"host": "127.0.0.1", "port": pg.port, "role": "primary"})]
    lines = ["[pgrelay]"]
    lines += [f"{k} = {v}" for k, v in settings.items()]
    for name, keys in (sections or {}).items():
        lines += ["", f"[{name}]"]
        lines += [f"{k} = {v}" for k, v in keys.items()]
    for name, keys in nodes:
        lines += ["", f"[node.{name}]"]
        lines += [f"{k} = {v}" for k, v in keys.items()]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def start_relay(pg, extra=None, nodes=None, wait=True, sections=None, flags=(), wrapper=(),
                env=None):
    """pgrelay in the foreground with a generated config: ``extra`` [pgrelay] keys, ``sections``
    other sections, ``flags`` more command-line flags, ``wrapper`` a command to run it under,
    ``env`` variables added to its environment."""
    if not os.access(PGRELAY_BIN, os.X_OK):
        pytest.fail(f"pgrelay binary not found at {PGRELAY_BIN} (run make)")
    workdir = tempfile.mkdtemp(prefix="pgrelay-it-")
    sock = (extra or {}).get("admin_socket", os.path.join(workdir, "admin.sock"))

    def launch(port, attempt):
        conf = os.path.join(workdir, "pgrelay.ini")
        log_path = os.path.join(workdir, f"pgrelay-{attempt}.log")
        write_config(conf, port, pg, extra, nodes, sections)
        with open(log_path, "w") as logf:
            proc = subprocess.Popen(
                [*wrapper, PGRELAY_BIN, "-c", conf, *flags],
                stdin=subprocess.DEVNULL,
                stdout=logf,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env={**os.environ, **(env or {})},
            )
        relay = Relay(workdir, port, conf, log_path, proc)
        _LIVE_RELAYS.append(relay)
        return relay

    if not wait:
        return launch(free_port(), 0)
    # Ready: the port listens and the admin socket (made just after it) answers.
    return start_on_free_port(
        launch,
        lambda r: port_listening(r.port) and (not sock or _unix_socket_answers(sock)),
        _discard_relay,
        "pgrelay",
    )


def _discard_relay(relay):
    relay.stop(check=False)
    with contextlib.suppress(ValueError):
        _LIVE_RELAYS.remove(relay)


def _teardown_relays(relays):
    """Stop every relay (each must shut down cleanly, see Relay.stop), then report the ones
    that did not."""
    problems = []
    for r in relays:
        try:
            r.stop()
        except AssertionError as e:
            problems.append(str(e))
        with contextlib.suppress(ValueError):
            _LIVE_RELAYS.remove(r)
        shutil.rmtree(r.workdir, ignore_errors=True)
    assert not problems, "\n\n".join(problems)


class RelayFactory:
    def __init__(self, pg):
        self.pg = pg
        self.started = []

    def __call__(self, nodes=None, wait=True, sections=None, flags=(), wrapper=(), env=None,
                 **extra):
        r = start_relay(self.pg, extra, nodes, wait, sections, flags, wrapper, env)
        self.started.append(r)
        return r

    def close(self):
        _teardown_relays(self.started)


@pytest.fixture
def relay_factory(pg):
    """Start dedicated pgrelays: ``relay_factory(max_client_conn=3, shutdown_timeout='10s')``."""
    factory = RelayFactory(pg)
    yield factory
    factory.close()


@pytest.fixture(scope="module")
def relay(pg):
    """A pgrelay shared by the tests of one module (workers=2, max_client_conn=1000)."""
    factory = RelayFactory(pg)
    r = factory(max_client_conn=1000)
    yield r
    factory.close()


@pytest.fixture
def conn(relay):
    """An autocommit psycopg connection through the module's pgrelay."""
    with relay.connect() as c:
        yield c


# --------------------------------------------------------------------------- #
# reporting and watchdog
# --------------------------------------------------------------------------- #


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "deadline(seconds): per-test watchdog (default %d s)" % DEFAULT_TEST_TIMEOUT
    )


class DeadlineExceeded(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Fail a test (instead of hanging the suite) when it exceeds its deadline."""
    marker = item.get_closest_marker("deadline")
    seconds = marker.args[0] if marker else DEFAULT_TEST_TIMEOUT

    def on_alarm(signum, frame):
        raise DeadlineExceeded(f"test exceeded its {seconds}s deadline")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for r in list(_LIVE_RELAYS):
            report.sections.append(
                (f"pgrelay log (port {r.port}, {r.log_path}) tail", r.log_tail())
            )


# --------------------------------------------------------------------------- #
# the admin console
# --------------------------------------------------------------------------- #


def admin_socket(relay):
    """The admin socket of a relay started with write_config's defaults."""
    return os.path.join(os.path.dirname(relay.conf_path), "admin.sock")


def admin(relay_or_path, line, timeout=10.0):
    """Send one command line, return everything pgrelay writes until it closes.

    Like ``echo line | socat - UNIX-CONNECT:sock``, except that our write side stays
    open: the answer being complete (EOF) proves pgrelay closes after one line."""
    path = relay_or_path if isinstance(relay_or_path, str) else admin_socket(relay_or_path)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks).decode()


def admin_json(relay, command):
    """``command json`` parsed; the answer is one JSON line followed by an empty line."""
    out = admin(relay, command + " json")
    assert out.endswith("\n\n"), f"answer to {command} json does not end with an empty line: {out!r}"
    body = out[:-2]
    assert "\n" not in body, f"{command} json is not one line: {out!r}"
    return json.loads(body)


def http_call(port, method, path, body=None, token=None, raw=None, headers=None, timeout=15):
    """One HTTP request to 127.0.0.1:port; returns (status, parsed JSON or text)."""
    conn = httplib.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        hdrs = {"Content-Type": "application/json"}
        if token is not None:
            hdrs["Authorization"] = f"Bearer {token}"
        hdrs.update(headers or {})
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        conn.request(method, path, body=data, headers=hdrs)
        r = conn.getresponse()
        payload = r.read()
        if payload and "json" in (r.getheader("Content-Type") or ""):
            return r.status, json.loads(payload)
        return r.status, payload.decode(errors="replace")
    finally:
        conn.close()
