"""pgrelay under test: started from a generated config, stopped cleanly; its console and HTTP.

relay           module-scoped pgrelay (workers=2, max_client_conn=1000) in front of ``pg``
relay_factory   function-scoped factory: ``relay_factory(max_client_conn=3)`` starts a
                dedicated pgrelay with extra [pgrelay] keys (``env=`` for its environment);
                at teardown each must stop cleanly (Relay.stop)
conn            an autocommit psycopg connection through ``relay``
daemons         ``daemons(conf, pidfile)``: pgrelay -d as an init script runs it (Daemon)
spawn_relay     start pgrelay on a config file written already (start_relay, cluster.py)
admin, admin_json, admin_socket, wait_admin_ready: the admin console
http_call       one HTTP request (the HTTP endpoint, pgrelay-control)
"""

import contextlib
import http.client as httplib
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile

import pytest

from pgserver import PgEndpoint
from procs import (
    _group_alive,
    _is_agent,
    _is_worker,
    _unix_socket_answers,
    child_pids,
    free_port,
    pid_alive,
    port_listening,
    start_on_free_port,
    wait_for,
)
from rawclient import RawClient


PGRELAY_BIN = os.environ.get(
    "PGRELAY_BIN",
    os.path.join(os.path.dirname(__file__), "..", "..", "bin", "pgrelay"),
)
PGRELAY_BIN = os.path.abspath(PGRELAY_BIN)


# --------------------------------------------------------------------------- #
# pgrelay
# --------------------------------------------------------------------------- #

_LIVE_RELAYS = []  # relays not yet torn down; their logs go into failure reports


class Relay(PgEndpoint):
    """One running pgrelay master started from a generated config; connect(): a psycopg
    connection through it."""

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

    def raw(self, timeout=10.0):
        return RawClient(self.port, timeout=timeout)

    def worker_pids(self):
        """The master's worker processes (its other child is pgrelay-agent; a child forked a
        moment ago and not yet named is neither)."""
        return [p for p in child_pids(self.pid) if _is_worker(p)]

    def children_named(self):
        """True once the master has children and each has named itself worker or agent."""
        children = child_pids(self.pid)
        return bool(children) and all(_is_worker(p) or _is_agent(p) for p in children)

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


def spawn_relay(workdir, port, conf, log_path, flags=(), wrapper=(), env=None):
    """``pgrelay -c conf`` in the foreground, in a session of its own, its output in
    ``log_path``, listed as live (its log goes into failure reports); waits for nothing.
    ``flags``: more command-line flags, ``wrapper``: a command to run it under, ``env``:
    variables added to its environment."""
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
        return spawn_relay(workdir, port, conf, log_path, flags, wrapper, env)

    if not wait:
        return launch(free_port(), 0)
    # Ready: the port listens, the admin socket (made just after it) answers, and the
    # children the master forked before its loop answered have named themselves.
    return start_on_free_port(
        launch,
        lambda r: (port_listening(r.port) and (not sock or _unix_socket_answers(sock))
                   and r.children_named()),
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


# what conftest offers (suite.py), private names that helpers import included
__all__ = ["PGRELAY_BIN", "_LIVE_RELAYS", "Relay", "wait_admin_ready", "Daemon", "daemons",
           "write_config", "spawn_relay", "start_relay", "_discard_relay", "_teardown_relays", "RelayFactory",
           "relay_factory", "relay", "conn", "admin_socket", "admin", "admin_json", "http_call"]
