"""Processes and ports of the test suites: waiting, free ports, starting a daemon on one.

wait_for            poll a condition with a timeout
require             a prerequisite of the machine: skip without it, fail under CI
SCHED_SLACK         what a loaded machine may add to a promised deadline
free_port           a port below the ephemeral range, never handed to two pytest processes
on_a_free_port      the one start-and-retry: a start on such a port, again if it lost it
start_on_free_port  start a daemon on such a port and wait until it is ready
start_together_on_free_port  several daemons on one such port (a fleet's proxies)
port_listening, port_accepts, child_pids, process_tree, pid_alive, owning_worker, client_port
"""

import contextlib
import errno
import fcntl
import os
import random
import re
import socket
import subprocess
import time

import pytest


# Seconds a loaded machine (two CPUs shared by several test runs) may add to a promised
# deadline. A test of a timeout asserts "the timeout, and at most SCHED_SLACK more"; a bound
# that only checks that something does not hang is looser still.
SCHED_SLACK = 4.0


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


class PortTaken(AssertionError):
    """A start failed because its port was taken meanwhile (what it said is the message)."""


def port_taken(text, in_use=PORT_IN_USE):
    """``text`` (a log, an error) says that a port was taken (``in_use``, case-insensitive)."""
    return any(s in text.lower() for s in in_use)


def on_a_free_port(start, attempts=3, port=None, first=None, pause=0.2):
    """The one start-and-retry of the suites: ``start(port, attempt)`` on a port of
    free_port()'s, until it returns without raising PortTaken; returns what it returned.

    Each attempt gets another port, except when ``port`` is given: a daemon that must come back
    where its peers expect it tries that one again after ``pause`` seconds. ``first``: the port
    of the first attempt (one already written in a config). After ``attempts`` starts that
    lost their port, the last PortTaken is raised."""
    for attempt in range(attempts):
        if port is not None:
            chosen = port
        elif attempt == 0 and first is not None:
            chosen = first
        else:
            chosen = free_port()
        try:
            return start(chosen, attempt)
        except PortTaken:
            if attempt == attempts - 1:
                raise
            if port is not None:
                time.sleep(pause)
    raise AssertionError("unreachable")


def start_on_free_port(launch, ready, discard, what, attempts=3, timeout=15, port=None,
                       in_use=PORT_IN_USE, log=lambda handle: handle.log()):
    """Start a daemon that listens on a port of free_port()'s, and wait until it is ready.

    ``launch(port, attempt)`` starts it and returns a handle with ``.proc`` (its Popen);
    ``log(handle)`` is what this start logged (default ``handle.log()``); ``ready(handle)``
    says when it serves; ``discard(handle)`` kills a start that failed. A start that ended
    saying its port was taken (``in_use``, case-insensitive) is tried again on another port,
    or on ``port`` again (after a moment) when the daemon must come back where its peers
    expect it (on_a_free_port). Fails the test with the log otherwise."""

    def start(chosen, attempt):
        handle = launch(chosen, attempt)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and handle.proc.poll() is None:
            if ready(handle):
                return handle
            time.sleep(0.05)
        rc = handle.proc.poll()
        discard(handle)
        text = log(handle)
        if rc is not None and port_taken(text, in_use) and attempt < attempts - 1:
            raise PortTaken(text)
        pytest.fail(f"{what} did not become ready on port {chosen} (exit {rc}):\n"
                    + text[-3000:])

    return on_a_free_port(start, attempts, port)


def start_together_on_free_port(start_all, discard_all, attempts=3):
    """Several daemons that listen on one port of free_port()'s, each on its own address (the
    proxies of a fleet, see control_e2e_helpers.start_proxy): ``start_all(port)`` starts them
    all and returns what the caller wants back, raising AssertionError when one does not come
    up; ``discard_all()`` stops the ones that did. When the error says the port was taken, all
    start again on another port; any other failure fails at once."""

    def start(port, attempt):
        try:
            return start_all(port)
        except AssertionError as e:
            discard_all()
            if attempt < attempts - 1 and port_taken(str(e)):
                raise PortTaken(str(e)) from e
            raise

    return on_a_free_port(start, attempts)


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


def process_name(pid):
    """The kernel's name of a process (/proc/PID/comm), or None once it is gone. The master
    names each child at once after the fork: "pgrelay-worker", or "pgrelay-agent" (also the
    name of the program it then executes). A child still called "pgrelay" was just forked and
    is neither yet."""
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return None


def _is_agent(pid):
    return process_name(pid) == "pgrelay-agent"


def _is_worker(pid):
    return process_name(pid) == "pgrelay-worker"


def _children():
    """{parent pid: [pids]} of every process that is not a zombie (scans /proc; the kernel has
    no /proc/*/children)."""
    children = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        # field 3 (state) and 4 (ppid) follow the ")" closing the command name, which may
        # itself hold spaces and parentheses
        fields = stat[stat.rindex(")") + 2 :].split()
        if fields[0] != "Z":
            children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def child_pids(pid):
    """Pids whose parent is ``pid`` (zombies left out)."""
    return sorted(_children().get(pid, []))


def process_tree(pid):
    """``pid`` and all its descendants (zombies left out), each parent before its children."""
    children = _children()
    tree, todo = [], [pid]
    while todo:
        p = todo.pop()
        tree.append(p)
        todo.extend(children.get(p, []))
    return tree


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


def preload_shim_env(workdir, name, source):
    """Compile the C ``source`` into ``workdir``/``name``.so and return the environment that
    preloads it into a daemon (AddressSanitizer builds included)."""
    src, so = os.path.join(workdir, f"{name}.c"), os.path.join(workdir, f"{name}.so")
    with open(src, "w") as f:
        f.write(source)
    subprocess.run(["cc", "-shared", "-fPIC", "-o", so, src], check=True)
    os.chmod(workdir, 0o755)
    asan = os.environ.get("ASAN_OPTIONS", "")
    return {"LD_PRELOAD": so, "ASAN_OPTIONS": f"{asan}:verify_asan_link_order=0"}


def listeners(port):
    """{pid: command line} of every process holding a socket that LISTENs on ``port``
    (IPv4 or IPv6, any address)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as f:
            next(f)
            for line in f:
                parts = line.split()
                if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                    inodes.add(int(parts[9]))
    owners = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit() and inodes & _socket_inodes_of(int(entry)):
            with contextlib.suppress(OSError), open(f"/proc/{entry}/cmdline", "rb") as f:
                owners[int(entry)] = f.read().replace(b"\0", b" ").decode(errors="replace")
    return owners


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


def _group_alive(pgid):
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# what conftest offers (suite.py), private names that helpers import included
__all__ = ["SCHED_SLACK", "require", "wait_for", "PORT_FIRST", "PORT_LAST", "PORT_STATE",
           "_port_bindable", "free_port", "PORT_IN_USE", "PortTaken", "port_taken",
           "on_a_free_port", "start_on_free_port", "start_together_on_free_port", "port_accepts",
           "port_listening", "_unix_socket_answers", "process_name", "_is_agent", "_is_worker",
           "child_pids", "process_tree",
           "pid_alive",
           "_socket_inodes_of", "listeners", "preload_shim_env", "_tcp_inode", "owning_worker", "client_port", "_group_alive"]
