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
import time

import pytest

from conftest import admin_json, free_port, wait_for
from control_helpers import FakeControl

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
    # The agent has called the fake: it runs (relay.agent_pid names the child from its fork
    # on, before the exec).
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
