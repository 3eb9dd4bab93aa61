"""pgrelay-control under test: start it on a free port, its store, simulated agents.

    def test_x(control, agents, store):
        a = agents(control, "proxy-a")            # a registered SimAgent polling for commands
        status, body = control.admin("POST", "/deployments/prod/maintenance", {"on": True})

store             a fresh database for one test's store (its libpq conninfo)
control_factory   ``control_factory(control={...}, lease={...}, deployments={...})`` starts a
                  pgrelay-control; each must exit 0 at teardown (unless the test killed it)
control           one pgrelay-control with the default ini (write_ini)
agents            ``agents(control, node_id, policy=ack_all, ...)``: registered, polling
                  SimAgents, stopped at teardown
SimAgent, obs, store_rows, Background (an HTTP call in a thread), ADMIN, TOKENS, API
"""

import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import psycopg
import pytest

from conftest import http_call as call, start_on_free_port
from loadgen import InThread

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONTROL_BIN = os.path.abspath(
    os.environ.get("PGRELAY_CONTROL_BIN", os.path.join(REPO, "bin", "pgrelay-control"))
)

ADMIN = "admin-token-for-tests"
TOKENS = {"prod": "prod-agent-token-1", "stage": "stage-agent-token-2"}
API = "/api/v1"


# --------------------------------------------------------------------------- #
# HTTP helpers
# --------------------------------------------------------------------------- #


def Background(*args, **kwargs):
    """call(...) in a thread (held operator requests, long polls); .result() waits."""
    return InThread(call, *args, **kwargs)


# --------------------------------------------------------------------------- #
# the control plane under test
# --------------------------------------------------------------------------- #

class Control:
    def __init__(self, workdir, port, conf, log_path, proc, store):
        self.workdir, self.port, self.conf, self.log_path, self.proc = (
            workdir, port, conf, log_path, proc)
        self.store = store  # libpq conninfo of its store
        self.killed = False

    @property
    def pid(self):
        return self.proc.pid

    def call(self, method, path, body=None, token=None, **kw):
        return call(self.port, method, path, body, token, **kw)

    def agent(self, method, path, body=None, deployment="prod", **kw):
        return self.call(method, API + "/agent" + path, body, TOKENS[deployment], **kw)

    def admin(self, method, path, body=None, **kw):
        return self.call(method, API + path, body, ADMIN, **kw)

    def proxies(self, deployment="prod"):
        status, body = self.admin("GET", f"/deployments/{deployment}/proxies")
        assert status == 200, body
        return {p["node_id"]: p for p in body}

    def metrics_lines(self):
        status, text = self.call("GET", "/metrics")
        assert status == 200, text
        return text.splitlines()

    def polling(self, node_id, deployment="prod"):
        """True while node_id's long poll is parked here (pgrelay_proxy_polling)."""
        line = f'pgrelay_proxy_polling{{deployment="{deployment}",node_id="{node_id}"}} 1'
        return line in self.metrics_lines()

    def ready(self):
        try:
            return self.call("GET", "/readyz", timeout=3)[0] == 200
        except OSError:
            return False

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def kill9(self):
        self.killed = True
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self, sig=signal.SIGTERM, timeout=15):
        """Stop and return the exit status (None when it had to be killed)."""
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            return None


def write_ini(path, port, store, control=None, lease=None, deployments=None):
    keys = {
        "listen_addr": "127.0.0.1",
        "listen_port": port,
        "store": store,
        "admin_tokens": f"other-admin-token, {ADMIN}",
        "proxy_timeout": "5s",
        "log_level": "debug",
        "auto_declare": "on",  # membership itself is tested in test_membership.py
    }
    keys.update(control or {})
    lines = ["[control]"] + [f"{k} = {v}" for k, v in keys.items()]
    if lease:
        lines += ["", "[lease]"] + [f"{k} = {v}" for k, v in lease.items()]
    for name, token in (TOKENS if deployments is None else deployments).items():
        lines += ["", f"[deployment.{name}]", f"token = {token}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def start_control(store, wait_ready=True, env=None, **ini):
    """pgrelay-control on a generated control.ini (``ini``: its sections); ``env``: variables
    added to its environment."""
    if not os.access(CONTROL_BIN, os.X_OK):
        pytest.fail(f"{CONTROL_BIN} is not built (make bin/pgrelay-control)")
    workdir = tempfile.mkdtemp(prefix="pgrelay-control-it-")

    def launch(port, attempt):
        conf = os.path.join(workdir, "control.ini")
        log_path = os.path.join(workdir, f"control-{attempt}.log")
        write_ini(conf, port, store, **ini)
        with open(log_path, "w") as logf:
            proc = subprocess.Popen([CONTROL_BIN, "-c", conf], stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT,
                                    env={**os.environ, **env} if env else None)
        return Control(workdir, port, conf, log_path, proc, store)

    def ready(c):
        try:
            status, _ = c.call("GET", "/healthz", timeout=2)
        except OSError:
            return False
        return status == 200 and (not wait_ready or c.ready())

    return start_on_free_port(launch, ready, lambda c: c.stop(), "pgrelay-control")


@pytest.fixture
def store(pg):
    """A fresh database for one test's store; its libpq conninfo."""
    name = "ctl_" + uuid.uuid4().hex[:12]
    pg.query(f"CREATE DATABASE {name}")
    conninfo = f"host={pg.host} port={pg.port} user=postgres dbname={name} connect_timeout=5"
    yield conninfo
    with contextlib.suppress(psycopg.Error):
        pg.query(f"DROP DATABASE {name} WITH (FORCE)")


@pytest.fixture
def control_factory(store):
    started = []

    def factory(**ini):
        c = start_control(store, **ini)
        started.append(c)
        return c

    yield factory
    problems = []
    for c in started:
        rc = c.stop()
        if not c.killed and rc != 0:
            problems.append(f"pgrelay-control pid {c.pid} exited with {rc}:\n{c.log()[-3000:]}")
        if "AddressSanitizer" in c.log() or "LeakSanitizer" in c.log():
            problems.append(f"sanitizer report:\n{c.log()[-6000:]}")
        with contextlib.suppress(ValueError):
            shutil.rmtree(c.workdir, ignore_errors=True)
    assert not problems, "\n".join(problems)


@pytest.fixture
def control(control_factory):
    return control_factory()


def store_rows(store, sql):
    with psycopg.connect(store, autocommit=True) as c:
        return c.execute(sql).fetchall()


# --------------------------------------------------------------------------- #
# simulated agents
# --------------------------------------------------------------------------- #


def ack_all(cmd):
    return True, f"{cmd['type']} done"


def never(cmd):
    return None


class SimAgent:
    """A pgrelay-agent stand-in. policy(cmd) -> None (never answer), (ok, detail) or
    (ok, detail, delay_s)."""

    def __init__(self, control, node_id, deployment="prod", policy=ack_all):
        self.control = control
        self.node_id = node_id
        self.deployment = deployment
        self.policy = policy
        self.received = []  # commands in the order they arrived (each id once)
        self.lock = threading.Lock()
        self.stopped = threading.Event()
        self.thread = None

    def post(self, path, body):
        body = dict(body, node_id=self.node_id)
        return self.control.agent("POST", path, body, self.deployment)

    def register(self, **extra):
        body = {"hostname": f"host-{self.node_id}", "version": "0.1.0",
                "listen": ["127.0.0.1:6432"], "config_version": 0, "epoch": 0,
                "leader": None, "maintenance": False}
        body.update(extra)
        status, answer = self.post("/register", body)
        assert status == 200, answer
        return answer

    def metrics(self, **fields):
        body = {"ts_ms": int(time.time() * 1000), "clients": 0, "statements": 0,
                "bytes_in": 0, "bytes_out": 0, "errors": 0, "maintenance": False}
        body.update(fields)
        status, answer = self.post("/metrics", body)
        assert status == 200, answer
        return answer

    def poll(self, wait_s=0, timeout=30):
        return self.control.agent(
            "GET", f"/commands?node_id={self.node_id}&wait_s={wait_s}", None, self.deployment,
            timeout=timeout)

    def ack(self, cmd_id, ok=True, detail="done"):
        return self.post(f"/commands/{cmd_id}/ack", {"ok": ok, "detail": detail})

    def _loop(self):
        seen = set()
        while not self.stopped.is_set():
            try:
                status, body = self.poll(wait_s=1)
            except OSError:
                time.sleep(0.1)
                continue
            if status != 200:
                time.sleep(0.1)
                continue
            for cmd in body["commands"]:
                if cmd["id"] in seen:
                    continue
                seen.add(cmd["id"])
                with self.lock:
                    self.received.append(cmd)
                answer = self.policy(cmd)
                if answer is None:
                    continue
                if len(answer) == 3 and answer[2]:
                    time.sleep(answer[2])
                with contextlib.suppress(OSError):
                    self.ack(cmd["id"], answer[0], answer[1])

    def start(self):
        self.thread = threading.Thread(target=self._loop, daemon=True)
        self.thread.start()
        return self

    def stop(self):
        self.stopped.set()
        if self.thread:
            self.thread.join(10)

    def types(self):
        with self.lock:
            return [c["type"] for c in self.received]

    def commands(self, type_=None):
        with self.lock:
            return [c for c in self.received if type_ is None or c["type"] == type_]


@pytest.fixture
def agents():
    """agents(control, node_id, ...) -> a registered, polling SimAgent; all stopped after."""
    made = []

    def make(control, node_id, policy=ack_all, deployment="prod", poll=True, **register):
        a = SimAgent(control, node_id, deployment, policy)
        a.register(**register)
        if poll:
            a.start()
        made.append(a)
        return a

    yield make
    for a in made:
        a.stop()


def obs(name, up=True, in_recovery=False, lsn=0, **extra):
    """One entry of a metrics call's "nodes"."""
    row = {"name": name, "host": "127.0.0.1", "port": 5432,
           "role": "replica" if in_recovery else "primary", "health": "up" if up else "down",
           "in_recovery": in_recovery, "lsn": lsn, "lag_bytes": 0, "write_sessions": 0,
           "read_sessions": 0}
    row.update(extra)
    return row


# --------------------------------------------------------------------------- #
# a fake control plane, for the agent's side
# --------------------------------------------------------------------------- #


REPORTER_PATHS = ("/api/v1/agent/register", "/api/v1/agent/metrics")


class FakeControl:
    """An HTTP server where the control plane should be, answering in one way (``mode``): healthy,
    or one of the bad ways of test_agent_control_faults.py; requests are recorded."""

    def __init__(self, mode):
        self.mode = mode
        self.requests = []  # (monotonic time, method, path without query, parsed body or None)
        self.commands_served = False
        self.stopping = threading.Event()
        fake = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _body(self):
                n = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(n) if n else b""
                try:
                    return json.loads(raw) if raw else None
                except ValueError:
                    return raw

            def _send(self, status, payload, ctype="application/json"):
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def _handle(self):
                body = self._body()
                path = self.path.split("?")[0]
                fake.requests.append((time.monotonic(), self.command, path, body))
                answer = fake.answer(self.command, path, body)
                if answer is None:  # hang: hold the request until the test ends
                    fake.stopping.wait(60)
                    self.close_connection = True
                    return
                self._send(*answer)

            do_GET = do_POST = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(self, method, path, body):
        """(status, payload[, content type]) for one request, or None to hang."""
        mode = self.mode
        if mode == "hang":
            return None
        if mode == "500":
            return (500, b"internal server error\n", "text/plain")
        if mode == "garbage":
            return (200, b'\x00\xff{"leader": "pg1", "epo', "application/json")
        if path == "/api/v1/agent/register":
            return (200, {"poll_wait_s": 25})
        if path == "/api/v1/agent/metrics" and mode == "healthy":
            return (200, {"leader": "pg1", "epoch": 1})
        if path == "/api/v1/agent/metrics":
            return (200, {
                "wrong_types": {"leader": 42, "epoch": "seven"},
                "negative_epoch": {"leader": "pg1", "epoch": -5},
                "huge_epoch": {"leader": "pg1", "epoch": 2 ** 62},
                "unknown_leader": {"leader": "ghost", "epoch": 99999},
            }[mode])
        if path == "/api/v1/agent/commands":
            if self.commands_served:
                self.stopping.wait(1.0)  # an empty long poll
                return (200, {"commands": []})
            self.commands_served = True
            return (200, {"commands": [
                {"type": "maintenance", "args": {"on": True}},  # no id: skipped
                {"id": "7", "type": "maintenance", "args": {"on": True}},  # id not a number
                {"id": 1, "type": "maintenance", "args": {"on": "yes please"}},
                {"id": 2, "type": "set_leader", "args": {"leader": "pg1", "epoch": -1}},
                {"id": 3, "type": "set_leader", "args": {"leader": "pg1", "epoch": 2 ** 62}},
                {"id": 4, "type": "format_disk", "args": {}},
                {"id": 5, "type": "config_commit", "args": {"version": 123}},
                {"id": 6, "type": "promote", "args": "pg1"},
            ]})
        if path.startswith("/api/v1/agent/commands/"):
            return (200, {})
        return (204, b"")

    def reporter_requests(self, since):
        return [r for r in self.requests if r[0] >= since and r[2] in REPORTER_PATHS]

    def acks(self):
        return {int(r[2].split("/")[5]): r[3] for r in self.requests
                if r[2].startswith("/api/v1/agent/commands/") and r[2].endswith("/ack")}

    def close(self):
        self.stopping.set()
        self.server.shutdown()
        self.server.server_close()
