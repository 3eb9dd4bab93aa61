"""pgrelay-control: the HTTP API of docs/protocol.md, against real processes.

Every test gets its own store (a fresh database in the session's PostgreSQL 15) and its own
bin/pgrelay-control (or $PGRELAY_CONTROL_BIN, e.g. the AddressSanitizer build) started from a
generated control.ini. Agents are simulated with Python HTTP clients (SimAgent): they register,
upload metrics and long-poll for commands in a thread, answering each command as the test's
policy says. What is asserted is what agents, operators and pgrelayctl rely on:

  * authentication: 401 (nothing recorded), 403, 400 for malformed requests, 404;
  * registration, telemetry (metrics, queries, schema, config) and their listings;
  * the long poll: at once when a command waits, after wait_s otherwise; redelivery until ack;
  * orchestration: maintenance and config apply complete only when every live proxy answered,
    409 on refusal, 504 on silence; switchover bumps the epoch and tells every proxy;
  * coordinated leadership from the proxies' node observations, epochs that only grow;
  * /healthz, /readyz, /metrics; leases between two replicas, take-over after kill -9;
  * garbage on the socket never hurts the server.
"""

import contextlib
import hashlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid

import psycopg
import pytest

from conftest import free_port, http_call as call, pid_alive, start_on_free_port, wait_for
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


def start_control(store, wait_ready=True, **ini):
    if not os.access(CONTROL_BIN, os.X_OK):
        pytest.fail(f"{CONTROL_BIN} is not built (make bin/pgrelay-control)")
    workdir = tempfile.mkdtemp(prefix="pgrelay-control-it-")

    def launch(port, attempt):
        conf = os.path.join(workdir, "control.ini")
        log_path = os.path.join(workdir, f"control-{attempt}.log")
        write_ini(conf, port, store, **ini)
        with open(log_path, "w") as logf:
            proc = subprocess.Popen([CONTROL_BIN, "-c", conf], stdin=subprocess.DEVNULL,
                                    stdout=logf, stderr=subprocess.STDOUT)
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
# command line and configuration
# --------------------------------------------------------------------------- #


def run_check(tmp_path, text):
    conf = tmp_path / "control.ini"
    conf.write_text(text)
    return subprocess.run([CONTROL_BIN, "-t", "-c", str(conf)], capture_output=True, text=True,
                          timeout=10)


def test_check_accepts_a_valid_file_with_durations_in_days(tmp_path):
    p = run_check(tmp_path, "[control]\nstore = dbname=x\nadmin_tokens = abcdefgh1\n"
                            "command_retention = 7d\ntelemetry_retention = 250ms\n"
                            "poll_wait_max = 2m\n[lease]\nenabled = on\n"
                            "[deployment.prod]\ntoken = prod-token-1\n")
    assert p.returncode == 1  # telemetry_retention below 1s
    assert "telemetry_retention" in p.stderr and ":5:" in p.stderr
    p = run_check(tmp_path, "[control]\nstore = dbname=x\nadmin_tokens = abcdefgh1\n"
                            "command_retention = 7d\ntelemetry_retention = 5m\n"
                            "[lease]\nenabled = on\n[deployment.prod]\ntoken = prod-token-1\n")
    assert p.returncode == 0, p.stderr
    assert "valid" in p.stdout


@pytest.mark.parametrize("text, where, words", [
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\nbogus = 1\n", ":4:", "unknown key"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\n[nope]\n", ":4:", "unknown section"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\nproxy_timeout = soon\n", ":4:",
     "not a duration"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\nlisten_port = 70000\n", ":4:",
     "out of range"),
    ("[control]\nadmin_tokens = abcdefgh1\n", "", "store"),
    ("[control]\nstore = x\n", "", "admin_tokens"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\n[deployment.a]\n", ":4:", "token"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\n[lease]\nlease_interval_secs = 20\n",
     ":4:", "lease_interval_secs"),
])
def test_check_names_file_and_line_of_each_problem(tmp_path, text, where, words):
    p = run_check(tmp_path, text)
    assert p.returncode == 1
    assert "control.ini" + where in p.stderr and words in p.stderr, p.stderr


def test_version_help_and_bad_flags():
    p = subprocess.run([CONTROL_BIN, "-V"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0 and p.stdout.startswith("pgrelay-control ")
    p = subprocess.run([CONTROL_BIN, "--help"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0
    for flag in ("--config", "--check", "--daemon", "--pidfile", "--verbose", "--quiet",
                 "--version", "--help"):
        assert flag in p.stdout
    p = subprocess.run([CONTROL_BIN, "--no-such-flag"], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 2


def test_daemon_mode_needs_a_logfile(tmp_path, store):
    conf = tmp_path / "control.ini"
    write_ini(conf, free_port(), store)
    p = subprocess.run([CONTROL_BIN, "-d", "-c", str(conf)], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 1 and "logfile" in p.stderr


# --------------------------------------------------------------------------- #
# health, authentication, malformed requests
# --------------------------------------------------------------------------- #


def test_healthz_readyz_and_schema_in_the_store(control, store):
    assert control.call("GET", "/healthz") == (200, "ok\n")
    assert control.call("GET", "/readyz") == (200, "ready\n")
    tables = {r[0] for r in store_rows(
        store, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'pgrelay'")}
    assert {"deployments", "proxies", "commands", "command_acks", "config_versions",
            "leadership", "lease", "schema_version"} <= tables
    assert {r[0] for r in store_rows(store, "SELECT name FROM pgrelay.deployments")} == {
        "prod", "stage"}


def test_missing_or_wrong_token_is_401_and_nothing_is_recorded(control, store):
    body = {"node_id": "intruder", "hostname": "x"}
    for headers in ({}, {"Authorization": "Bearer wrong-token-123"},
                    {"Authorization": "Basic " + TOKENS["prod"]},
                    {"Authorization": "Bearer"}):
        status, answer = call(control.port, "POST", API + "/agent/register", body,
                              headers=headers)
        assert status == 401 and "error" in answer, (headers, answer)
        status, answer = call(control.port, "POST", API + "/agent/metrics", body,
                              headers=headers)
        assert status == 401
    assert control.call("GET", API + "/deployments", token="wrong-token-123")[0] == 401
    assert control.call("GET", API + "/deployments")[0] == 401
    assert control.proxies() == {}
    assert store_rows(store, "SELECT count(*) FROM pgrelay.proxies") == [(0,)]


def test_deployment_token_on_operator_endpoint_is_403_and_admin_token_on_agent_is_403(control):
    status, answer = control.call("GET", API + "/deployments", token=TOKENS["prod"])
    assert status == 403 and "error" in answer
    status, _ = control.call("POST", API + "/deployments/prod/maintenance", {"on": True},
                             token=TOKENS["prod"])
    assert status == 403
    status, _ = control.call("POST", API + "/agent/register", {"node_id": "a"}, token=ADMIN)
    assert status == 403
    # the second admin token of the list works too
    assert control.call("GET", API + "/deployments", token="other-admin-token")[0] == 200


@pytest.mark.parametrize("path, raw", [
    ("/agent/register", b"{not json"),
    ("/agent/register", b"[1, 2]"),
    ("/agent/register", b""),
    ("/agent/register", b'{"hostname": "h"}'),
    ("/agent/register", b'{"node_id": 7}'),
    ("/agent/register", b'{"node_id": "has space"}'),
    ("/agent/register", b'{"node_id": "a", "listen": "127.0.0.1:6432"}'),
    ("/agent/metrics", b'{"node_id": "a", "clients": "many"}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": {"name": "pg1"}}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": [{"health": "up"}]}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": [{"name": "pg1", "in_recovery": "no"}]}'),
    ("/agent/metrics", b'{"node_id": "a", "epoch": -1}'),
    ("/agent/metrics", b'{"node_id": "a", "latency_us": -5}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": [{"name": "pg1", "statements_completed": 1.5}]}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": [{"name": "pg1", "bytes_out": "lots"}]}'),
    ("/agent/queries", b'{"node_id": "a"}'),
    ("/agent/queries", b'{"node_id": "a", "queries": [42]}'),
    ("/agent/config", b'{"node_id": "a", "config_version": 1}'),
    ("/agent/schema", b'{"node_id": "a", "tables": []}'),
    ("/agent/commands/1/ack", b'{"node_id": "a"}'),
    ("/agent/commands/1/ack", b'{"node_id": "a", "ok": "yes"}'),
    ("/agent/metrics", b'{"node_id": "a", "clients": 1e400}'),
    ("/agent/metrics", b'\xff\xfe{"node_id": "a"}'),
])
def test_malformed_agent_requests_are_400(control, path, raw):
    status, answer = control.call("POST", API + path, token=TOKENS["prod"], raw=raw)
    assert status == 400, answer
    assert isinstance(answer, dict) and answer["error"]
    assert control.proxies() == {}


def test_malformed_operator_requests_and_queries_are_400(control):
    for path, body in [("/deployments/prod/maintenance", {}),
                       ("/deployments/prod/maintenance", {"on": "yes"}),
                       ("/deployments/prod/maintenance", {"on": True, "timeout_s": 0}),
                       ("/deployments/prod/switchover", {"promote": True}),
                       ("/deployments/prod/switchover", {"node": 2}),
                       ("/deployments/prod/config", {"text": None}),
                       ("/deployments/prod/config", {"text": ["a"]})]:
        status, answer = control.admin("POST", path, body)
        assert status == 400, (path, body, answer)
    for query in ("", "?wait_s=1", "?node_id=a&wait_s=soon", "?node_id=a&wait_s=-1"):
        status, answer = control.agent("GET", "/commands" + query)
        assert status == 400, (query, answer)


def test_unknown_things_are_404_and_wrong_methods_405(control, agents):
    a = agents(control, "proxy-a", poll=False)
    assert control.admin("GET", "/deployments/nosuch/proxies")[0] == 404
    assert control.admin("POST", "/deployments/nosuch/maintenance", {"on": True})[0] == 404
    assert control.call("GET", "/nothing/here")[0] == 404
    assert a.ack(424242)[0] == 404
    assert a.ack("12abc")[0] == 404
    assert control.call("DELETE", API + "/deployments", token=ADMIN)[0] == 405
    assert control.call("GET", API + "/agent/register", token=TOKENS["prod"])[0] == 405
    a.metrics(nodes=[obs("pg1")])
    status, answer = control.admin("POST", "/deployments/prod/switchover", {"node": "pg9"})
    assert status == 404 and "pg9" in answer["error"]


# --------------------------------------------------------------------------- #
# registration and telemetry
# --------------------------------------------------------------------------- #


def test_register_two_agents_and_list_proxies(control, agents, store):
    answer = SimAgent(control, "proxy-a").register(hostname="db-proxy-1", epoch=7,
                                                   leader="pg1", config_version=3)
    assert answer["deployment"] == "prod" and answer["node_id"] == "proxy-a"
    assert 1 <= answer["poll_wait_s"] <= 60
    SimAgent(control, "proxy-b").register(hostname="db-proxy-2", maintenance=True)
    proxies = control.proxies()
    assert set(proxies) == {"proxy-a", "proxy-b"}
    a = proxies["proxy-a"]
    for key in ("node_id", "hostname", "version", "last_seen", "live", "epoch", "leader",
                "maintenance", "config_version", "listen"):
        assert key in a
    assert a["hostname"] == "db-proxy-1" and a["epoch"] == 7 and a["leader"] == "pg1"
    assert a["config_version"] == 3 and a["live"] is True and a["listen"] == ["127.0.0.1:6432"]
    assert abs(a["last_seen"] - time.time() * 1000) < 60000
    assert proxies["proxy-b"]["maintenance"] is True and proxies["proxy-b"]["leader"] is None
    # registering again updates the record
    SimAgent(control, "proxy-a").register(hostname="db-proxy-1b")
    assert control.proxies()["proxy-a"]["hostname"] == "db-proxy-1b"
    # the other deployment sees none of them
    assert control.proxies("stage") == {}
    status, deps = control.admin("GET", "/deployments")
    assert status == 200
    by_name = {d["name"]: d for d in deps}
    assert by_name["prod"]["proxies"] == 2 and by_name["prod"]["live"] == 2
    assert by_name["stage"]["proxies"] == 0
    assert sorted(r[0] for r in store_rows(store, "SELECT node_id FROM pgrelay.proxies")) == [
        "proxy-a", "proxy-b"]


def test_metrics_arrive_with_rates_and_show_on_metrics_endpoints(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    t0 = int(time.time() * 1000)
    a.metrics(ts_ms=t0, clients=10, statements=1000, bytes_in=100, bytes_out=500, errors=1,
              latency_us=4_000_000, statements_completed=900)
    # 100 statements ended in these 2 s, 25 s of latency between them: 250 ms on average
    answer = a.metrics(ts_ms=t0 + 2000, clients=12, statements=1400, bytes_in=300,
                       bytes_out=900, errors=1, epoch=4, config_version=2,
                       latency_us=29_000_000, statements_completed=1000)
    assert answer == {"leader": None, "epoch": 0}  # no observations: no opinion
    status, rows = control.admin("GET", "/deployments/prod/metrics")
    assert status == 200
    [row] = rows
    assert row["node_id"] == "proxy-a" and row["live"] is True
    assert row["sample"]["clients"] == 12 and row["sample"]["statements"] == 1400
    assert row["rates"]["statements"] == pytest.approx(200.0)
    assert row["rates"]["bytes_out"] == pytest.approx(200.0)
    assert row["rates"]["errors"] == pytest.approx(0.0)
    assert row["latency_ms"] == pytest.approx(250.0)
    assert row["nodes"] == []  # no observation of nodes
    proxy = control.proxies()["proxy-a"]
    assert proxy["epoch"] == 4 and proxy["config_version"] == 2

    status, text = control.call("GET", "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert "pgrelay_control_up 1" in lines
    assert 'pgrelay_control_proxies_live{deployment="prod"} 1' in lines
    assert 'pgrelay_control_proxies_live{deployment="stage"} 0' in lines
    assert 'pgrelay_proxy_clients{deployment="prod",node_id="proxy-a"} 12' in lines
    assert 'pgrelay_proxy_statements_total{deployment="prod",node_id="proxy-a"} 1400' in lines
    assert 'pgrelay_proxy_bytes_out_total{deployment="prod",node_id="proxy-a"} 900' in lines
    assert 'pgrelay_proxy_errors_total{deployment="prod",node_id="proxy-a"} 1' in lines
    assert 'pgrelay_proxy_epoch{deployment="prod",node_id="proxy-a"} 4' in lines
    assert 'pgrelay_proxy_maintenance{deployment="prod",node_id="proxy-a"} 0' in lines
    assert any(line.startswith('pgrelay_proxy_last_seen_seconds{deployment="prod",'
                               'node_id="proxy-a"} ') for line in lines)
    assert any(line.startswith("pgrelay_control_lease_held{") and line.endswith(" 1")
               for line in lines)
    assert "# TYPE pgrelay_proxy_statements_total counter" in lines
    # latency as Prometheus users expect it: a summary's _sum (seconds) and _count
    assert "# TYPE pgrelay_proxy_statement_latency_seconds summary" in lines
    assert ('pgrelay_proxy_statement_latency_seconds_sum{deployment="prod",node_id="proxy-a"} 29'
            in lines)
    assert ('pgrelay_proxy_statement_latency_seconds_count{deployment="prod",node_id="proxy-a"}'
            ' 1000' in lines)


def test_latency_is_null_until_a_statement_ends_and_after_a_counter_reset(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    t0 = int(time.time() * 1000)

    def row():
        status, rows = control.admin("GET", "/deployments/prod/metrics")
        assert status == 200
        [r] = rows
        return r

    a.metrics(ts_ms=t0, latency_us=1000, statements_completed=1)
    assert row()["latency_ms"] is None  # one sample: no interval yet
    a.metrics(ts_ms=t0 + 1000, latency_us=1000, statements_completed=1)
    assert row()["latency_ms"] is None  # no statement ended: no average, not 0
    a.metrics(ts_ms=t0 + 2000, latency_us=4000, statements_completed=3)
    assert row()["latency_ms"] == pytest.approx(1.5)
    a.metrics(ts_ms=t0 + 3000, latency_us=10, statements_completed=1)  # the proxy restarted
    assert row()["latency_ms"] is None


def test_per_node_counters_give_rates_and_latency_per_node(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    t0 = int(time.time() * 1000)
    a.metrics(ts_ms=t0, statements=100, latency_us=1_000_000, statements_completed=100, nodes=[
        obs("pg1", statements=90, bytes_in=1000, bytes_out=5000, errors=0,
            latency_us=900_000, statements_completed=90, write_sessions=3),
        obs("pg2", in_recovery=True, statements=10, bytes_in=100, bytes_out=200, errors=0,
            latency_us=100_000, statements_completed=10, read_sessions=1)])
    # in 4 s: pg1 ran 40 statements taking 8 s (200 ms each), pg2 nothing, one error on pg2
    a.metrics(ts_ms=t0 + 4000, statements=140, latency_us=9_000_000, statements_completed=140,
              nodes=[obs("pg1", statements=130, bytes_in=3000, bytes_out=9000, errors=0,
                         latency_us=8_900_000, statements_completed=130, write_sessions=5,
                         read_sessions=1),
                     obs("pg2", in_recovery=True, statements=10, bytes_in=100, bytes_out=200,
                         errors=1, latency_us=100_000, statements_completed=10)])
    status, rows = control.admin("GET", "/deployments/prod/metrics")
    assert status == 200
    [row] = rows
    assert row["latency_ms"] == pytest.approx(200.0)
    nodes = {n["name"]: n for n in row["nodes"]}
    assert set(nodes) == {"pg1", "pg2"}
    pg1, pg2 = nodes["pg1"], nodes["pg2"]
    assert pg1["sessions"] == 6 and pg2["sessions"] == 0
    assert pg1["latency_ms"] == pytest.approx(200.0)
    assert pg1["rates"] == pytest.approx(
        {"statements": 10.0, "bytes_in": 500.0, "bytes_out": 1000.0, "errors": 0.0})
    assert pg2["latency_ms"] is None  # nothing ended on pg2
    assert pg2["rates"]["statements"] == pytest.approx(0.0)
    assert pg2["rates"]["errors"] == pytest.approx(0.25)
    # the body is kept as sent
    [sent_pg1] = [n for n in row["sample"]["nodes"] if n["name"] == "pg1"]
    assert sent_pg1["latency_us"] == 8_900_000 and sent_pg1["statements_completed"] == 130

    status, text = control.call("GET", "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    labels = 'deployment="prod",node_id="proxy-a",node="pg1"'
    assert f"pgrelay_node_statements_total{{{labels}}} 130" in lines
    assert f"pgrelay_node_bytes_in_total{{{labels}}} 3000" in lines
    assert f"pgrelay_node_bytes_out_total{{{labels}}} 9000" in lines
    assert f"pgrelay_node_sessions{{{labels}}} 6" in lines
    values = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    assert float(values[f"pgrelay_node_statement_latency_seconds_sum{{{labels}}}"]) == \
        pytest.approx(8.9)
    assert f"pgrelay_node_statement_latency_seconds_count{{{labels}}} 130" in lines
    assert ('pgrelay_node_errors_total{deployment="prod",node_id="proxy-a",node="pg2"} 1'
            in lines)
    assert "# TYPE pgrelay_node_statement_latency_seconds summary" in lines
    assert "# TYPE pgrelay_node_errors_total counter" in lines

    # a node the proxy no longer reports (removed from its configuration) is no longer shown
    a.metrics(ts_ms=t0 + 5000, nodes=[obs("pg1", statements=131, latency_us=9_000_000,
                                          statements_completed=131)])
    status, rows = control.admin("GET", "/deployments/prod/metrics")
    assert [n["name"] for n in rows[0]["nodes"]] == ["pg1"]
    status, text = control.call("GET", "/metrics")
    assert 'node="pg2"' not in text and 'node="pg1"' in text


def test_queries_schema_and_config_uploads_are_shown(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    query = {"session": 17, "client": "10.1.2.3:51000", "application_name": "billing",
             "user": "app", "database": "shop", "node": "pg1", "state": "active",
             "duration_ms": 1520, "text": "SELECT * FROM orders WHERE id = $1"}
    before_ms = time.time() * 1000
    assert a.post("/queries", {"queries": [query]}) == (204, "")
    status, rows = control.admin("GET", "/deployments/prod/queries")
    assert status == 200 and len(rows) == 1, rows
    # as_of: when the proxy reported it (milliseconds since the Unix epoch)
    as_of = rows[0].pop("as_of")
    assert before_ms - 1000 <= as_of <= time.time() * 1000 + 1000, as_of
    assert rows == [dict(query, node_id="proxy-a")]
    bad = dict(query, application_name=7)
    status, answer = a.post("/queries", {"queries": [bad]})
    assert status == 400 and "application_name" in answer["error"], answer

    tables = [{"schema": "public", "name": "orders", "columns": [{"name": "id", "type": "bigint"}],
               "indexes": [{"name": "orders_pkey", "definition": "CREATE UNIQUE INDEX ..."}]}]
    assert a.post("/schema", {"database": "shop", "tables": tables}) == (204, "")
    status, rows = control.admin("GET", "/deployments/prod/schema")
    assert status == 200 and rows[0]["database"] == "shop" and rows[0]["tables"] == tables

    assert a.post("/config", {"config_version": 5, "config": {"listen_port": "6432"}}) == (204, "")
    assert control.proxies()["proxy-a"]["config_version"] == 5


def test_nodes_view_aggregates_every_proxys_observation(control):
    a, b = SimAgent(control, "proxy-a"), SimAgent(control, "proxy-b")
    a.register()
    b.register()
    a.metrics(nodes=[obs("pg1", lsn=100), obs("pg2", in_recovery=True, lag_bytes=10)])
    b.metrics(nodes=[obs("pg1", lsn=120), obs("pg2", up=False, in_recovery=True)])
    status, rows = control.admin("GET", "/deployments/prod/nodes")
    assert status == 200
    nodes = {r["name"]: r for r in rows}
    assert nodes["pg1"]["leader"] is True and nodes["pg2"]["leader"] is False
    assert nodes["pg1"]["health"] == {"proxy-a": "up", "proxy-b": "up"}
    assert nodes["pg2"]["health"] == {"proxy-a": "up", "proxy-b": "down"}
    assert nodes["pg1"]["host"] == "127.0.0.1" and nodes["pg1"]["port"] == 5432
    assert "lag_bytes" in nodes["pg2"] and "role" in nodes["pg2"]


# --------------------------------------------------------------------------- #
# the command long poll
# --------------------------------------------------------------------------- #


def test_long_poll_returns_an_empty_list_after_wait_s(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    # the answer also carries the deployment's leader and epoch (none yet here)
    idle = (200, {"commands": [], "leader": None, "epoch": 0})
    t = time.monotonic()
    assert a.poll(wait_s=0) == idle
    assert time.monotonic() - t < 0.5
    t = time.monotonic()
    assert a.poll(wait_s=1) == idle
    assert 0.9 <= time.monotonic() - t < 3


def test_long_poll_answers_at_once_when_a_command_is_queued_and_redelivers_until_acked(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    poll = Background(control.port, "GET", API + "/agent/commands?node_id=proxy-a&wait_s=30",
                      token=TOKENS["prod"], timeout=40)
    wait_for(lambda: control.polling("proxy-a"), what="the poll to be parked")
    assert not poll.done()
    op = Background(control.port, "POST", API + "/deployments/prod/reload", {"timeout_s": 20},
                    token=ADMIN, timeout=40)
    status, body = poll.result()
    assert status == 200 and poll.elapsed < 5
    [cmd] = body["commands"]
    assert cmd["type"] == "reload" and cmd["args"] == {} and isinstance(cmd["id"], int)
    # not acknowledged: a proxy that lost the answer gets it again
    assert a.poll(wait_s=0)[1]["commands"] == [cmd]
    assert not op.done()
    assert a.ack(cmd["id"], True, "reloaded") == (204, "")
    status, answer = op.result()
    assert status == 200 and answer["ok"] is True
    assert answer["proxies"] == [{"node_id": "proxy-a", "ok": True, "detail": "reloaded"}]
    assert a.poll(wait_s=0)[1]["commands"] == []
    assert a.ack(cmd["id"], True, "again") == (204, "")  # a repeated ack is harmless


def test_commands_survive_a_restart_of_the_control_plane(control_factory, store):
    c1 = control_factory()
    a = SimAgent(c1, "proxy-a")
    a.register()
    assert c1.admin("POST", "/deployments/prod/reload", {"timeout_s": 1})[0] == 504
    assert c1.stop() == 0
    c2 = control_factory()
    a.control = c2
    [cmd] = a.poll(wait_s=0)[1]["commands"]
    assert cmd["type"] == "reload"
    assert a.ack(cmd["id"]) == (204, "")
    assert "proxy-a" in c2.proxies()


# --------------------------------------------------------------------------- #
# orchestration
# --------------------------------------------------------------------------- #


def test_maintenance_on_completes_only_when_both_agents_acked(control, agents):
    a = agents(control, "proxy-a")
    b = agents(control, "proxy-b", policy=lambda cmd: (True, "paused", 1.0))
    t = time.monotonic()
    status, answer = control.admin("POST", "/deployments/prod/maintenance",
                                   {"on": True, "timeout_s": 10, "resume_after_s": 45})
    elapsed = time.monotonic() - t
    assert status == 200, answer
    assert answer["ok"] is True
    assert {p["node_id"]: p["ok"] for p in answer["proxies"]} == {"proxy-a": True,
                                                                   "proxy-b": True}
    assert elapsed >= 0.9  # it waited for proxy-b
    for agent in (a, b):
        [cmd] = agent.commands("maintenance")
        # the operator's end, sooner than pause_lease (60 s), as a delay and a wall-clock time
        assert cmd["args"]["on"] is True and cmd["args"]["resume_after_s"] == 45, cmd
        assert abs(cmd["args"]["until_ms"] / 1000 - time.time() - 45) < 5, cmd
    proxies = control.proxies()
    assert proxies["proxy-a"]["maintenance"] and proxies["proxy-b"]["maintenance"]
    status, answer = control.admin("POST", "/deployments/prod/maintenance", {"on": False})
    assert status == 200 and answer["ok"] is True
    assert not control.proxies()["proxy-a"]["maintenance"]


def test_maintenance_is_504_when_one_agent_never_acks(control, agents):
    agents(control, "proxy-a")
    silent = agents(control, "proxy-b", policy=never)
    t = time.monotonic()
    status, answer = control.admin("POST", "/deployments/prod/maintenance",
                                   {"on": True, "timeout_s": 2})
    assert status == 504, answer
    assert 1.8 <= time.monotonic() - t < 6
    by_node = {p["node_id"]: p for p in answer["proxies"]}
    assert by_node["proxy-a"]["ok"] is True and by_node["proxy-b"]["ok"] is False
    assert answer["ok"] is False and answer["error"]
    assert silent.types() == ["maintenance"]  # it did get the command


def test_a_second_operation_while_one_runs_is_409(control, agents):
    silent = agents(control, "proxy-a", policy=never)
    first = Background(control.port, "POST", API + "/deployments/prod/maintenance",
                       {"on": True, "timeout_s": 3}, token=ADMIN)
    wait_for(lambda: silent.types() == ["maintenance"], what="the maintenance to be under way")
    status, answer = control.admin("POST", "/deployments/prod/config", {"text": "[pgrelay]\n"})
    assert status == 409 and "maintenance" in answer["error"]
    # another deployment is not blocked
    assert control.admin("POST", "/deployments/stage/reload", {})[0] == 200
    assert first.result()[0] == 504


def test_maintenance_with_no_live_proxy_completes_at_once(control):
    status, answer = control.admin("POST", "/deployments/stage/maintenance", {"on": True})
    assert status == 200 and answer == {"ok": True, "proxies": []}


def test_config_apply_commits_when_both_prepare_ok(control, agents):
    a = agents(control, "proxy-a", config_version=3)
    b = agents(control, "proxy-b")
    text = "[pgrelay]\nlisten_port = 6432\n\n[node.pg1]\nhost = 10.0.0.1\nrole = primary\n"
    status, answer = control.admin("POST", "/deployments/prod/config",
                                   {"text": text, "timeout_s": 10})
    assert status == 200, answer
    assert answer["ok"] is True and answer["version"] == 4  # above every proxy's version
    for agent in (a, b):
        wait_for(lambda agent=agent: agent.types() == ["config_prepare", "config_commit"],
                 what="prepare then commit")
        prep, commit = agent.commands()
        # each command carries its operation (pgrelay.operations, kind config)
        assert prep["args"] == {"version": 4, "text": text, "operation": 1}
        assert commit["args"] == {"version": 4, "operation": 1}
    status, current = control.admin("GET", "/deployments/prod/config")
    assert status == 200
    assert current["version"] == 4 and current["text"] == text
    assert {p["node_id"]: p["config_version"] for p in current["proxies"]} == {
        "proxy-a": 4, "proxy-b": 4}
    # versions increase
    status, answer = control.admin("POST", "/deployments/prod/config", {"text": text + "\n"})
    assert status == 200 and answer["version"] == 5
    # the same text again makes no new version
    status, answer = control.admin("POST", "/deployments/prod/config", {"text": text + "\n"})
    assert status == 200 and answer["version"] == 5 and answer["unchanged"] is True


def test_config_apply_aborts_with_409_when_one_agent_refuses(control, agents):
    def refuse(cmd):
        if cmd["type"] == "config_prepare":
            return False, "listen_port needs a restart"
        return True, "ok"

    a = agents(control, "proxy-a")
    b = agents(control, "proxy-b", policy=refuse)
    status, answer = control.admin("POST", "/deployments/prod/config",
                                   {"text": "[pgrelay]\nlisten_port = 7000\n", "timeout_s": 10})
    assert status == 409, answer
    assert answer["ok"] is False and "proxy-b" in answer["error"]
    assert "listen_port needs a restart" in answer["error"]
    version = answer["version"]
    for agent in (a, b):
        wait_for(lambda agent=agent: "config_abort" in agent.types(), what="config_abort")
        assert "config_commit" not in agent.types()
        [abort] = agent.commands("config_abort")
        assert abort["args"] == {"version": version, "operation": answer["operation"]}
    status, current = control.admin("GET", "/deployments/prod/config")
    assert current["version"] == 0 and current["text"] is None
    # a refused apply does not use up its version number
    status, answer = control.admin("POST", "/deployments/prod/config",
                                   {"text": "[pgrelay]\nlisten_port = 7001\n", "timeout_s": 10})
    assert status == 409 and answer["version"] == version


def test_config_apply_is_504_and_aborts_when_one_agent_is_silent(control, agents):
    a = agents(control, "proxy-a")
    agents(control, "proxy-b", policy=never)
    status, answer = control.admin("POST", "/deployments/prod/config",
                                   {"text": "[pgrelay]\n", "timeout_s": 1})
    assert status == 504, answer
    wait_for(lambda: "config_abort" in a.types(), what="config_abort after the timeout")
    assert "config_commit" not in a.types()


def test_switchover_bumps_the_epoch_and_every_agent_gets_set_leader(control, agents):
    a = agents(control, "proxy-a")
    b = agents(control, "proxy-b")
    for agent in (a, b):
        answer = agent.metrics(epoch=5, leader="pg1",
                               nodes=[obs("pg1"), obs("pg2", in_recovery=True)])
    assert answer == {"leader": "pg1", "epoch": 5}
    # pg2 promoted by other means: a switchover without promote goes to a primary only
    for agent in (a, b):
        agent.metrics(epoch=5, leader="pg1", nodes=[obs("pg1"), obs("pg2")])
    status, answer = control.admin("POST", "/deployments/prod/switchover",
                                   {"node": "pg2", "promote": False, "timeout_s": 10})
    assert status == 200, answer
    assert answer["ok"] is True and answer["leader"] == "pg2" and answer["epoch"] == 6
    for agent in (a, b):
        [cmd] = agent.commands("set_leader")
        assert cmd["args"] == {"leader": "pg2", "epoch": 6, "operation": 1}
    # the agents now see pg2 as the primary: the decision holds
    assert a.metrics(epoch=6, leader="pg2", nodes=[obs("pg1", in_recovery=True), obs("pg2")]) == {
        "leader": "pg2", "epoch": 6}
    proxies = control.proxies()
    assert proxies["proxy-a"]["leader"] == "pg2" and proxies["proxy-b"]["epoch"] == 6


def test_switchover_with_promote_pauses_promotes_switches_and_resumes(control, agents):
    a = agents(control, "proxy-a")
    b = agents(control, "proxy-b")
    a.metrics(epoch=2, leader="pg1", nodes=[obs("pg1", lsn=4000), obs("pg2", in_recovery=True)])
    b.metrics(epoch=2, leader="pg1", nodes=[obs("pg1", lsn=5000), obs("pg2", in_recovery=True)])
    status, answer = control.admin("POST", "/deployments/prod/switchover",
                                   {"node": "pg2", "promote": True, "timeout_s": 10})
    assert status == 200, answer
    assert answer["leader"] == "pg2" and answer["epoch"] == 3 and answer["ok"] is True
    promotes = a.commands("promote") + b.commands("promote")
    assert len(promotes) == 1
    # every command of the switchover carries its operation's id
    assert promotes[0]["args"] == {"node": "pg2", "operation": 1}
    # the same proxy first fenced pg1 and waited for pg2 to replay it
    runner = a if a.commands("promote") else b
    assert [c["args"]["node"] for c in runner.commands("fence")] == ["pg1"]
    assert runner.commands("catch_up")[0]["args"]["old"] == "pg1"
    for agent in (a, b):
        types = [t for t in agent.types() if t not in ("fence", "catch_up", "promote")]
        assert types == ["maintenance", "set_leader", "maintenance"], agent.types()
        on, off = agent.commands("maintenance")
        # the pause ends by itself at the switchover's deadline plus 5 s (dead-man pause)
        assert on["args"]["on"] is True and 10 < on["args"]["resume_after_s"] <= 15, on
        assert abs(on["args"]["until_ms"] / 1000 - time.time() - 15) < 5, on
        assert off["args"] == {"on": False, "resume_after_s": 0, "operation": 1}
        assert agent.commands("set_leader")[0]["args"] == {"leader": "pg2", "epoch": 3,
                                                            "operation": 1}


def test_failed_promote_is_409_and_maintenance_ends(control, agents):
    def no_promote(cmd):
        if cmd["type"] == "promote":
            return False, "pg2 is not reachable"
        return True, "ok"

    a = agents(control, "proxy-a", policy=no_promote)
    a.metrics(epoch=2, leader="pg1", nodes=[obs("pg1"), obs("pg2", in_recovery=True)])
    status, answer = control.admin("POST", "/deployments/prod/switchover",
                                   {"node": "pg2", "promote": True, "timeout_s": 10})
    assert status == 409 and "not reachable" in answer["error"]
    # a promote was sent: pg1 stays fenced (no unfence), the fleet resumes
    wait_for(lambda: a.types() == ["maintenance", "fence", "catch_up", "promote", "maintenance"],
             what="resume")
    assert a.metrics(nodes=[obs("pg1"), obs("pg2", in_recovery=True)])["leader"] == "pg1"


def test_a_config_apply_cut_short_by_a_crash_is_aborted_by_the_next_holder(control_factory,
                                                                            store):
    c1 = control_factory()
    a = SimAgent(c1, "proxy-a")
    a.register()
    apply = Background(c1.port, "POST", API + "/deployments/prod/config",
                       {"text": "[pgrelay]\n", "timeout_s": 30}, token=ADMIN)
    wait_for(lambda: store_rows(store, "SELECT state FROM pgrelay.config_versions")
             == [("preparing",)], what="the version to be preparing")
    c1.kill9()
    with contextlib.suppress(OSError):
        apply.result()
    c2 = control_factory()
    a.control = c2
    # rolled back: the version is gone (its number is free again), the operation says so
    assert store_rows(store, "SELECT version, state FROM pgrelay.config_versions") == []
    assert store_rows(store, "SELECT kind, version, state FROM pgrelay.operations") == [
        ("config", 1, "rolled_back")]
    # the prepare is withdrawn, an abort is queued in its place
    assert [(c["type"], c["args"]) for c in a.poll(wait_s=0)[1]["commands"]] == [
        ("config_abort", {"version": 1, "operation": 1})]
    status, current = c2.admin("GET", "/deployments/prod/config")
    assert current["version"] == 0


# --------------------------------------------------------------------------- #
# coordinated leadership
# --------------------------------------------------------------------------- #


def test_leader_is_decided_by_the_majority_of_live_proxies(control, agents, store):
    a, b, c = (agents(control, n, poll=False) for n in ("proxy-a", "proxy-b", "proxy-c"))
    healthy = [obs("pg1", lsn=10), obs("pg2", in_recovery=True)]
    # seeded from the agents' own agreement, at their epoch
    for agent in (a, b, c):
        answer = agent.metrics(epoch=2, leader="pg1", nodes=healthy)
    assert answer == {"leader": "pg1", "epoch": 2}
    # one proxy alone losing pg1 changes nothing
    split = [obs("pg1", up=False), obs("pg2")]
    assert a.metrics(epoch=2, leader="pg1", nodes=split) == {"leader": "pg1", "epoch": 2}
    # a majority seeing pg2 as the primary moves the leader, with a new epoch
    assert b.metrics(epoch=2, leader="pg1", nodes=split) == {"leader": "pg2", "epoch": 3}
    assert c.metrics(epoch=2, leader="pg1", nodes=healthy) == {"leader": "pg2", "epoch": 3}
    assert store_rows(store, "SELECT leader, epoch FROM pgrelay.leadership"
                             " WHERE deployment = 'prod'") == [("pg2", 3)]
    # epochs never go down, and an agent's higher epoch is caught up with
    assert a.metrics(epoch=1, leader="pg2", nodes=split)["epoch"] == 3
    assert a.metrics(epoch=9, leader="pg2", nodes=split) == {"leader": "pg2", "epoch": 9}
    status, deps = control.admin("GET", "/deployments")
    [prod] = [d for d in deps if d["name"] == "prod"]
    assert prod["leader"] == "pg2" and prod["epoch"] == 9


def test_a_new_leader_answers_the_parked_polls_at_once(control, agents):
    """Agents learn a decision from their parked long poll, not at their next metrics call."""
    a, b, c = (agents(control, n, poll=False) for n in ("proxy-a", "proxy-b", "proxy-c"))
    healthy = [obs("pg1", lsn=10), obs("pg2", in_recovery=True)]
    for agent in (a, b, c):
        agent.metrics(epoch=2, leader="pg1", nodes=healthy)
    polls = {agent.node_id: Background(control.port, "GET",
                                       API + f"/agent/commands?node_id={agent.node_id}&wait_s=30",
                                       token=TOKENS["prod"], timeout=40)
             for agent in (a, c)}
    wait_for(lambda: control.polling("proxy-a") and control.polling("proxy-c"),
             what="both polls to be parked (they would wait 30 s)")
    assert not any(p.done() for p in polls.values()), "a poll was answered before any change"
    split = [obs("pg1", up=False), obs("pg2")]
    a.metrics(epoch=2, leader="pg1", nodes=split)
    assert b.metrics(epoch=2, leader="pg1", nodes=split) == {"leader": "pg2", "epoch": 3}
    for node_id, poll in polls.items():
        status, body = poll.result(timeout=5)  # not after its 30 s
        assert status == 200 and body == {"commands": [], "leader": "pg2", "epoch": 3}, node_id


def test_leader_is_seeded_from_the_majority_primary_when_agents_disagree(control, agents):
    a, b = agents(control, "proxy-a", poll=False), agents(control, "proxy-b", poll=False)
    nodes = [obs("pg1", in_recovery=True), obs("pg2")]
    # one of two declared proxies is no majority: no leader yet
    assert a.metrics(epoch=4, leader="pg1", nodes=nodes) == {"leader": None, "epoch": 0}
    assert b.metrics(epoch=4, leader="pg2", nodes=nodes) == {"leader": "pg2", "epoch": 5}


def test_leadership_survives_a_restart(control_factory):
    c1 = control_factory()
    a = SimAgent(c1, "proxy-a")
    a.register()
    a.metrics(epoch=3, leader="pg1", nodes=[obs("pg1")])
    assert c1.stop() == 0
    c2 = control_factory()
    a.control = c2
    assert a.metrics(nodes=[obs("pg1")]) == {"leader": "pg1", "epoch": 3}


# --------------------------------------------------------------------------- #
# leases
# --------------------------------------------------------------------------- #

LEASE = {"enabled": "on", "lease_duration_secs": 3, "lease_interval_secs": 1,
         "release_timeout_secs": 2}


def test_only_the_lease_holder_is_ready_and_kill9_hands_over(control_factory):
    first = control_factory(lease=LEASE)
    second = control_factory(lease=LEASE, wait_ready=False)
    wait_for(lambda: any(line.startswith("pgrelay_control_lease_holder{")
                         for line in second.metrics_lines()),
             what="the second replica to have read the lease")
    assert first.ready() and not second.ready()
    status, answer = second.call("GET", API + "/deployments", token=ADMIN)
    assert status == 503 and answer == {"error": "not the lease holder"}
    status, text = second.call("GET", "/readyz")
    assert status == 503 and "lease" in text
    assert second.call("GET", "/healthz")[0] == 200
    _, metrics = second.call("GET", "/metrics")
    assert "pgrelay_control_serving 0" in metrics.splitlines()
    assert any(line.startswith("pgrelay_control_lease_holder{") for line in metrics.splitlines())

    SimAgent(first, "proxy-a").register(hostname="before-failover")
    first.kill9()
    t = time.monotonic()
    wait_for(second.ready, timeout=LEASE["lease_duration_secs"] + LEASE["lease_interval_secs"] + 2,
             interval=0.1, what="the second replica to take the lease over")
    took = time.monotonic() - t
    assert took <= LEASE["lease_duration_secs"] + LEASE["lease_interval_secs"] + 1
    # the new holder knows what the old one stored
    assert second.proxies()["proxy-a"]["hostname"] == "before-failover"


def test_a_stopping_holder_gives_the_lease_up(control_factory):
    first = control_factory(lease=LEASE)
    second = control_factory(lease=LEASE, wait_ready=False)
    assert first.stop() == 0
    assert "released" in first.log()
    t = time.monotonic()
    wait_for(second.ready, timeout=4, interval=0.1, what="take-over after a release")
    assert time.monotonic() - t < LEASE["lease_duration_secs"]


# --------------------------------------------------------------------------- #
# reload, auto registration
# --------------------------------------------------------------------------- #


def test_sighup_adds_and_removes_deployments(control):
    deployments = {"prod": TOKENS["prod"], "qa": "qa-agent-token-3"}
    # the store needs a restart: the running one is kept, with a warning
    write_ini(control.conf, control.port, "host=elsewhere dbname=x", deployments=deployments)
    os.kill(control.pid, signal.SIGHUP)
    wait_for(lambda: control.call("POST", API + "/agent/register", {"node_id": "qa-1"},
                                  token="qa-agent-token-3")[0] == 200,
             what="the new deployment's token to work")
    assert "store changed; it takes effect only after a restart" in control.log()
    assert control.call("POST", API + "/agent/register", {"node_id": "x"},
                        token=TOKENS["stage"])[0] == 401
    assert control.agent("POST", "/register", {"node_id": "p-1"})[0] == 200
    # a broken file is refused and the running configuration kept
    with open(control.conf, "a") as f:
        f.write("[control]\nbogus = 1\n")
    os.kill(control.pid, signal.SIGHUP)
    wait_for(lambda: "configuration unchanged" in control.log(), what="the refused reload")
    assert control.call("GET", API + "/deployments", token=ADMIN)[0] == 200
    assert control.call("POST", API + "/agent/register", {"node_id": "qa-2"},
                        token="qa-agent-token-3")[0] == 200


def test_auto_register_creates_a_deployment_per_unknown_token(control_factory, store):
    c = control_factory(control={"auto_register": "on"})
    token = "brand-new-token-xyz"
    status, answer = c.call("POST", API + "/agent/register", {"node_id": "n1"}, token=token)
    assert status == 200, answer
    name = "auto-" + hashlib.sha256(token.encode()).hexdigest()[:12]
    assert answer["deployment"] == name
    assert "n1" in c.proxies(name)
    assert c.call("POST", API + "/agent/register", {"node_id": "n2"}, token=token)[0] == 200
    assert set(c.proxies(name)) == {"n1", "n2"}
    assert c.call("POST", API + "/agent/register", {"node_id": "n1"}, token="short")[0] == 401


# --------------------------------------------------------------------------- #
# robustness
# --------------------------------------------------------------------------- #


def raw_exchange(port, data, timeout=5, shutdown=True):
    """Send bytes; return whatever comes back before the server closes or timeout."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        with contextlib.suppress(OSError):
            s.sendall(data)
            if shutdown:
                s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(OSError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        return out
    finally:
        s.close()


def test_garbage_never_hurts_the_server(control, agents):
    rnd = random.Random(1234)
    a = agents(control, "proxy-a")
    # random bytes, with and without a request line
    for _ in range(20):
        raw_exchange(control.port, bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 3000))))
    raw_exchange(control.port, b"GET /healthz HTTP/1.1\r\n" + b"\xff" * 5000 + b"\r\n\r\n")
    # huge headers
    answer = raw_exchange(control.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                          + b"a" * 200000 + b"\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 200")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    raw_exchange(control.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    # a body larger than 4 MiB is 413 (refused on its Content-Length, before it is sent)
    answer = raw_exchange(control.port, b"POST /api/v1/agent/metrics HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 5000000\r\n\r\n{", shutdown=False)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    # truncated bodies and connections closed half-way
    raw_exchange(control.port, b"POST /api/v1/agent/metrics HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + TOKENS["prod"].encode()
                 + b"\r\nContent-Length: 1000\r\n\r\n{\"node_id\":")
    raw_exchange(control.port, b"POST /api/v1/agent/register HTTP/1.1\r\nHost: x\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n")
    # deeply nested and odd JSON
    for raw in (b"[" * 100000, b'{"node_id": "a", "nodes": [' + b"[" * 5000 + b"]",
                b'{"node_id": "a\\u0000b"}', b"null", b'"text"', b"{}" * 1000):
        status, answer = control.agent("POST", "/metrics", raw=raw)
        assert status == 400, (raw[:40], answer)
    # a long poll whose client goes away, then a command for it
    agents(control, "gone", poll=False)
    s = socket.create_connection(("127.0.0.1", control.port))
    s.sendall(b"GET /api/v1/agent/commands?node_id=gone&wait_s=30 HTTP/1.1\r\nHost: x\r\n"
              b"Authorization: Bearer " + TOKENS["prod"].encode() + b"\r\n\r\n")
    wait_for(lambda: control.polling("gone"), what="the poll of gone to be parked")
    s.close()
    wait_for(lambda: not control.polling("gone"), what="the hang-up to be noticed")
    status, answer = control.admin("POST", "/deployments/prod/maintenance",
                                   {"on": True, "timeout_s": 1})
    assert status == 504  # "gone" never answers; proxy-a does
    assert {p["node_id"]: p["ok"] for p in answer["proxies"]} == {"gone": False,
                                                                   "proxy-a": True}
    # many connections at once, each abandoned mid-request
    socks = [socket.create_connection(("127.0.0.1", control.port)) for _ in range(100)]
    for i, s in enumerate(socks):
        request = (b"POST /api/v1/agent/register HTTP/1.1\r\nContent-Length: 60\r\n"
                   b"Authorization: Bearer " + TOKENS["prod"].encode()
                   + b'\r\n\r\n{"node_id": "abandoned-%d"}' % i)
        s.sendall(request[: len(request) * i // len(socks)])
    for s in socks:
        s.close()
    # still serving, and still correct
    assert pid_alive(control.pid)
    assert control.call("GET", "/healthz") == (200, "ok\n")
    assert a.metrics(clients=1)["epoch"] == 0
    assert set(control.proxies()) == {"proxy-a", "gone"}


def test_clients_that_leave_held_requests_do_not_hurt(control, agents):
    silent = agents(control, "proxy-a", policy=never)
    # an operator gives up on a held request; the orchestration still ends by itself
    raw = json.dumps({"on": True, "timeout_s": 1}).encode()
    s = socket.create_connection(("127.0.0.1", control.port))
    s.sendall(b"POST /api/v1/deployments/prod/maintenance HTTP/1.1\r\nHost: x\r\n"
              b"Authorization: Bearer " + ADMIN.encode()
              + b"\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)
    wait_for(lambda: silent.types() == ["maintenance"], what="the maintenance to be under way")
    s.close()
    # a long poll whose client leaves before its wait ends
    agents(control, "leaver", poll=False)
    s = socket.create_connection(("127.0.0.1", control.port))
    s.sendall(b"GET /api/v1/agent/commands?node_id=leaver&wait_s=30 HTTP/1.1\r\nHost: x\r\n"
              b"Authorization: Bearer " + TOKENS["prod"].encode() + b"\r\n\r\n")
    wait_for(lambda: control.polling("leaver"), what="the poll of leaver to be parked")
    s.close()
    wait_for(lambda: not control.polling("leaver"), what="the hang-up to be noticed")
    assert control.call("GET", "/healthz") == (200, "ok\n")
    # the first orchestration is over: a new one may start
    status, _ = control.admin("POST", "/deployments/stage/maintenance", {"on": False})
    assert status == 200
    wait_for(lambda: control.admin("POST", "/deployments/prod/reload",
                                   {"timeout_s": 1})[0] == 504, what="prod to be free again")


def test_unreachable_store_means_not_ready_and_503_but_no_exit(tmp_path):
    dead = f"host=127.0.0.1 port={free_port()} user=postgres dbname=x connect_timeout=2"
    port = free_port()
    conf = tmp_path / "control.ini"
    write_ini(conf, port, dead)
    log_path = tmp_path / "control.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([CONTROL_BIN, "-c", str(conf)], stdout=logf,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _healthy(port), what="the process to answer /healthz")
        status, text = call(port, "GET", "/readyz")
        assert status == 503 and "store" in text
        status, answer = call(port, "GET", API + "/deployments", token=ADMIN)
        assert status == 503 and "store" in answer["error"]
        time.sleep(1.5)  # a few retries
        assert proc.poll() is None  # it keeps retrying instead of exiting
        assert log_path.read_text().count("not reachable") <= 2  # logged once, not per retry
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    assert "Sanitizer" not in log_path.read_text()


def _healthy(port):
    try:
        return call(port, "GET", "/healthz", timeout=2)[0] == 200
    except OSError:
        return False


def test_a_second_instance_with_the_same_pidfile_refuses(control_factory, tmp_path, store):
    pidfile = tmp_path / "control.pid"
    conf = tmp_path / "control.ini"
    port = free_port()
    write_ini(conf, port, store)
    first = subprocess.Popen([CONTROL_BIN, "-c", str(conf), "-p", str(pidfile)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port), what="the first instance")
        assert pidfile.read_text().strip() == str(first.pid)
        p = subprocess.run([CONTROL_BIN, "-c", str(conf), "-p", str(pidfile)],
                           capture_output=True, text=True, timeout=10)
        assert p.returncode == 1 and "already running" in p.stderr
    finally:
        first.terminate()
        assert first.wait(timeout=15) == 0
    assert not pidfile.exists()


# --------------------------------------------------------------------------- #
# the documentation follows the key table
# --------------------------------------------------------------------------- #

MAN = os.path.join(REPO, "man", "pgrelay-control.8")
SAMPLE = os.path.join(REPO, "etc", "control.ini")


def key_table():
    """(section, key, default or None) from control/cconfig.c's table, in order."""
    import re

    with open(os.path.join(REPO, "control", "cconfig.c")) as f:
        src = f.read()
    sections = {"CTL_KEY": "control", "LEASE_KEY": "lease", "DEP_KEY": "deployment"}
    rows = [(sections[m.group(1)], m.group(2), m.group(4))
            for m in re.finditer(r'\b(CTL_KEY|LEASE_KEY|DEP_KEY)\("(\w+)",\s*\w+,\s*(NULL|"([^"]*)")',
                                 src)]
    assert len(rows) >= 17, rows
    return rows


def test_man_page_documents_every_key_with_its_default_and_every_flag():
    with open(MAN) as f:
        man = f.read()
    for section, key, default in key_table():
        if default is None:
            assert f'.BR {key} " (required' in man, key
        elif default == "":
            assert f'.BR {key} " (default empty' in man, key
        else:
            assert f'.BR {key} " (default " {default}' in man, (key, default)
    help_text = subprocess.run([CONTROL_BIN, "--help"], capture_output=True, text=True,
                               timeout=10).stdout
    for flag in ("config", "check", "daemon", "pidfile", "verbose", "quiet", "version", "help"):
        assert f"\\-\\-{flag}" in man and f"--{flag}" in help_text, flag
    for word in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGQUIT", "EXIT STATUS", "protocol.md",
                 "/usr/share/doc/pgrelay/protocol.md", "LEASES"):
        assert word in man, word
    if shutil.which("groff"):
        p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", MAN], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0 and p.stderr == "", p.stderr


def test_sample_configuration_is_valid_and_shows_every_key_with_its_default():
    with open(SAMPLE) as f:
        sample = f.read()
    for section, key, default in key_table():
        if section == "deployment" or default is None:
            assert f"\n{key} = " in sample, key
        elif default == "":
            assert f"\n;{key} = " in sample, key
        else:
            assert f"\n{key} = {default}\n" in sample, (key, default)
    # its CHANGE-ME tokens are refused until replaced (issue 13 item 6; test_operating.py)
    p = subprocess.run([CONTROL_BIN, "-t", "-c", SAMPLE], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 1 and "placeholder" in p.stderr, p.stderr
