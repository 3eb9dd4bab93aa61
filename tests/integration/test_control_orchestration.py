"""pgrelay-control: orchestration (maintenance, config apply, switchover).

Every test gets its own store (a fresh database in the session's PostgreSQL 15) and its own
bin/pgrelay-control (or $PGRELAY_CONTROL_BIN, e.g. the AddressSanitizer build) started from a
generated control.ini; agents are simulated with Python HTTP clients (SimAgent) that register,
upload metrics and long-poll for commands in a thread, answering each command as the test's
policy says (control_helpers.py). What is asserted is what agents, operators and pgrelayctl
rely on:

  * maintenance and config apply complete only when every live proxy answered, 409 on
    refusal or while another operation runs, 504 on silence; switchover bumps the epoch and
    tells every proxy; a failed promote is 409 and ends the maintenance; a config apply cut
    short by a crash is aborted by the next holder.
"""

import contextlib
import time

from conftest import wait_for
from control_helpers import (  # noqa: F401,F811 (fixtures used by name)
    ADMIN,
    API,
    Background,
    SimAgent,
    agents,
    control,
    control_factory,
    never,
    obs,
    store,
    store_rows,
)


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
