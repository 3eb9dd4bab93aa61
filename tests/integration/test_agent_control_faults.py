"""The agent against a control plane that misbehaves: it answers 500, garbage, wrong types, an
epoch that would break "epochs only grow", a leader that does not exist, nonsense commands, or
never answers at all.

What an operator relies on, whatever the control plane does: pgrelay keeps serving on the
leader it has, the agent stays up (no crash, no restart), the epoch does not move, the proxy
does not pause, failures are logged once per change of state rather than per attempt, and the
agent backs off instead of hammering the endpoint.
"""

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import admin_json, free_port, wait_for

REPORTER_PATHS = ("/api/v1/agent/register", "/api/v1/agent/metrics")


class FakeControl:
    """An HTTP server where the control plane should be, answering in one bad way (``mode``)."""

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


MODES = ["500", "garbage", "hang", "wrong_types", "negative_epoch", "huge_epoch",
         "unknown_leader"]
# modes in which every metrics call fails, so the reporter must back off
FAILING = {"500", "garbage", "hang", "wrong_types", "negative_epoch", "huge_epoch"}


@pytest.fixture
def fake_control(request):
    fake = FakeControl(request.param)
    yield fake
    fake.close()


@pytest.mark.parametrize("fake_control", MODES, indirect=True)
def test_a_misbehaving_control_plane_changes_nothing_on_the_proxy(relay_factory, fake_control):
    relay = relay_factory(sections={
        "agent": {"health_interval": "200ms"},
        "control": {"endpoint": fake_control.url, "token": "t0ken-for-a-fake",
                    "request_timeout": "1s", "metrics_interval": "100ms",
                    "active_queries_interval": "100ms", "control_grace_period": "1s"},
    })
    wait_for(lambda: admin_json(relay, "show info")["write_leader"] == "pg1", timeout=10,
             what="the agent to route to pg1")
    before = admin_json(relay, "show info")
    # The master logs "agent started" right after fork(); the child is the agent only once
    # it has exec'd, which under load can come after the first answer of the console.
    wait_for(lambda: fake_control.requests, timeout=10, what="the agent to call the fake")
    agent = wait_for(relay.agent_pid, timeout=10, what="the agent's process")
    window_start = time.monotonic()

    # the data path is untouched while the agent struggles
    deadline = window_start + 3.0
    n = 0
    while time.monotonic() < deadline:
        with relay.connect() as c:
            assert c.execute("SELECT %s::int + 1", (n,)).fetchone()[0] == n + 1
        n += 1
        time.sleep(0.05)
    window = time.monotonic() - window_start

    after = admin_json(relay, "show info")
    assert after["write_leader"] == "pg1", after
    assert after["epoch"] == before["epoch"], (before, after)
    assert after["maintenance"] == "off", after
    assert relay.agent_pid() == agent, "the agent was restarted:\n" + relay.log_tail()
    log = relay.log()
    assert not re.search(r"agent \(pid \d+\) (exited|was killed)", log), log

    if fake_control.mode in FAILING:
        # once per change of state, not per attempt
        warnings = [ln for ln in log.splitlines() if "control plane (reporter)" in ln]
        assert 1 <= len(warnings) <= 2, warnings
        # capped exponential backoff: without it, a 100 ms interval makes ~30 calls here
        calls = fake_control.reporter_requests(window_start)
        assert len(calls) <= 8, (len(calls), window)
    if fake_control.mode == "unknown_leader":
        assert "ghost" not in json.dumps(admin_json(relay, "show nodes"))
    if fake_control.mode in {"wrong_types", "negative_epoch", "huge_epoch", "unknown_leader"}:
        # nonsense commands are acknowledged as failed and change nothing
        acks = wait_for(lambda: len(fake_control.acks()) >= 6 and fake_control.acks(),
                        timeout=10, what="the agent to acknowledge the commands")
        assert set(acks) == {1, 2, 3, 4, 5, 6}, acks
        assert all(a["ok"] is False and a["detail"] for a in acks.values()), acks
        again = admin_json(relay, "show info")
        assert (again["write_leader"], again["epoch"], again["maintenance"]) == \
            ("pg1", before["epoch"], "off"), again


@pytest.mark.parametrize("fake_control", ["healthy"], indirect=True)
def test_the_agent_moves_past_a_dead_endpoint_to_the_next_one(relay_factory, fake_control):
    """endpoint = a dead URL, then a live one: the agent registers and reports through the live
    one, keeps to it, and the data path never notices."""
    dead = free_port()
    relay = relay_factory(sections={
        "agent": {"health_interval": "200ms"},
        "control": {"endpoint": f"http://127.0.0.1:{dead}, {fake_control.url}",
                    "token": "t0ken-for-a-fake", "request_timeout": "1s",
                    "metrics_interval": "100ms", "control_grace_period": "2s"},
    })
    wait_for(lambda: any(r[2] == "/api/v1/agent/register" for r in fake_control.requests),
             timeout=10, what="the agent to register through the second endpoint")
    t0 = time.monotonic()
    wait_for(lambda: len(fake_control.reporter_requests(t0)) >= 5, timeout=10,
             what="metrics every 100 ms through the second endpoint")
    with relay.connect() as c:
        assert c.execute("SELECT 'served'").fetchone() == ("served",)
    info = admin_json(relay, "show info")
    assert (info["write_leader"], info["epoch"]) == ("pg1", 1), info
    log = relay.log()
    assert "registered as" in log, log
    assert "control plane (reporter)" not in log, log  # it never saw the control plane as down


@pytest.mark.parametrize("fake_control", ["healthy"], indirect=True)
def test_the_configuration_upload_carries_no_secret(relay_factory, pg, fake_control):
    """The agent uploads its effective configuration, but no token and no password, the
    per-node monitor_password included."""
    secrets = ["agent-pw-" + "x" * 8, "node-pw-" + "y" * 8, "t0ken-for-a-fake"]
    relay_factory(
        nodes=[("pg1", {"host": "127.0.0.1", "port": pg.port, "role": "primary",
                        "monitor_password": secrets[1]})],
        sections={"agent": {"monitor_password": secrets[0]},
                  "control": {"endpoint": fake_control.url, "token": secrets[2],
                              "metrics_interval": "100ms"}})
    upload = wait_for(lambda: next((r[3] for r in fake_control.requests
                                    if r[2] == "/api/v1/agent/config"), None),
                      timeout=10, what="the configuration upload")
    keys = upload["config"]
    assert keys["node.pg1.port"] == str(pg.port) and "agent.health_interval" in keys, keys
    assert not [k for k in keys if "password" in k or k.endswith("token")], keys
    text = json.dumps(upload)
    assert not [s for s in secrets if s in text], text
