"""The orchestrations' store work stays off the event loop (issue 9, Deliver 2): while the
store holds one write of `maintenance on` or of a switchover (a test trigger makes it wait for
an advisory lock the test holds), /healthz, a view served from memory and another agent's
metrics are answered at once, and the orchestration acts on nothing it has not written yet:
no proxy gets a step's command before the step's record is in the store, and none gets the
new leader before it is saved. Once the store lets go, each completes. The operations view,
which reads the store, waits for it without holding anything else either."""

import os
import signal
import time

import psycopg

from conftest import wait_for
from control_helpers import (  # noqa: F401 - fixtures used by name
    ADMIN,
    API,
    TOKENS,
    Background,
    SimAgent,
    agents,
    control,
    control_factory,
    store,
    obs,
    store_rows,
    write_ini,
)
from test_control_store_offloop import StoreHold, others_answer_while, waits_on_lock


def switchover(control, promote):
    """POST switchover to pg2, held until it ends, in a thread."""
    return Background(control.port, "POST", API + "/deployments/prod/switchover",
                      {"node": "pg2", "promote": promote, "timeout_s": 60}, token=ADMIN,
                      timeout=90)


def two_agents_see_pg1_leading(control, agents, in_recovery=True):
    a = agents(control, "proxy-a")
    b = agents(control, "proxy-b")
    for agent in (a, b):
        answer = agent.metrics(epoch=2, leader="pg1",
                               nodes=[obs("pg1", lsn=4000), obs("pg2", in_recovery=in_recovery)])
    assert answer == {"leader": "pg1", "epoch": 2}, answer
    return a, b


def test_maintenance_on_whose_command_waits_on_the_store_holds_no_other_request(
        control, store, agents):
    agents(control, "proxy-slow")
    other = agents(control, "proxy-other")
    hold = StoreHold(store, events="INSERT")  # proxy-slow's row of the new command
    try:
        op = Background(control.port, "POST", API + "/deployments/prod/maintenance",
                        {"on": True, "timeout_s": 60}, token=ADMIN, timeout=90)
        wait_for(hold.waiting, timeout=10, what="maintenance on's command to wait in the store")
        worst = others_answer_while(control, other, op, "maintenance on's command")
        assert other.types() == [], "a command was delivered before it was in the store"
    finally:
        hold.release()
    status, body = op.result(timeout=30)
    assert status == 200 and body["ok"], body
    assert sorted(p["node_id"] for p in body["proxies"]) == ["proxy-other", "proxy-slow"]
    print(f"worst answer while maintenance on's command waited: {worst * 1000:.0f} ms")


def test_a_switchover_step_whose_record_waits_on_the_store_holds_no_other_request(
        control, store, agents):
    a, b = two_agents_see_pg1_leading(control, agents)
    hold = StoreHold(store, table="operations", events="UPDATE", when="NEW.step = 'fence'")
    try:
        op = switchover(control, promote=True)
        wait_for(hold.waiting, timeout=10, what="the fence step's record to wait in the store")
        worst = others_answer_while(control, a, op, "the fence step's record")
        # a step is recorded before it is acted on: no fence went out yet
        assert a.commands("fence") == [] and b.commands("fence") == [], "fence before its record"
        assert [c["type"] for c in a.commands()] == ["maintenance"], a.types()
    finally:
        hold.release()
    status, body = op.result(timeout=30)
    assert status == 200 and body["ok"] and body["leader"] == "pg2", body
    assert len(a.commands("fence") + b.commands("fence")) == 1
    print(f"worst answer while a step's record waited: {worst * 1000:.0f} ms")


def test_a_switchover_whose_new_leader_waits_on_the_store_holds_no_other_request(
        control, store, agents):
    a, b = two_agents_see_pg1_leading(control, agents, in_recovery=False)
    for agent in (a, b):  # pg2 promoted by other means: no promote step
        agent.metrics(epoch=2, leader="pg1", nodes=[obs("pg1"), obs("pg2")])
    hold = StoreHold(store, table="leadership", events="INSERT OR UPDATE",
                     when="NEW.leader = 'pg2'")
    try:
        op = switchover(control, promote=False)
        wait_for(hold.waiting, timeout=10, what="the new leader's save to wait in the store")
        worst = others_answer_while(control, a, op, "the new leader's save")
        # nobody is told a leader that is not saved: not the agents, not a metrics answer
        assert a.commands("set_leader") == [] and b.commands("set_leader") == []
        assert a.metrics(epoch=2, leader="pg1", nodes=[obs("pg1"), obs("pg2")]) == {
            "leader": "pg1", "epoch": 2}
    finally:
        hold.release()
    status, body = op.result(timeout=30)
    assert status == 200 and body["ok"] and body["leader"] == "pg2" and body["epoch"] == 3, body
    for agent in (a, b):
        assert [c["args"]["leader"] for c in agent.commands("set_leader")] == ["pg2"]
    print(f"worst answer while the new leader's save waited: {worst * 1000:.0f} ms")


def test_the_operations_view_waiting_on_the_store_holds_no_other_request(control, store, agents):
    other = agents(control, "proxy-other")
    locker = psycopg.connect(store)
    try:
        locker.execute("LOCK TABLE pgrelay.operations IN ACCESS EXCLUSIVE MODE")
        view = Background(control.port, "GET", API + "/deployments/prod/operations", token=ADMIN,
                          timeout=60)

        wait_for(lambda: waits_on_lock(store, "operations"), timeout=10,
                 what="the operations view to wait in the store")
        others_answer_while(control, other, view, "the operations view")
    finally:
        locker.rollback()
        locker.close()
    status, body = view.result(timeout=30)
    assert status == 200 and body == [], body


def test_a_leader_decision_waiting_on_the_store_holds_no_other_request(control, store, agents):
    """The automatic decision: the metrics calls of its deployment wait for the save (no answer
    names a leader the store does not hold), every other request is answered at once."""
    a = agents(control, "proxy-a")
    b = agents(control, "proxy-b")
    for agent in (a, b):
        answer = agent.metrics(epoch=2, leader="pg1",
                               nodes=[obs("pg1"), obs("pg2", in_recovery=True)])
    assert answer == {"leader": "pg1", "epoch": 2}, answer
    other = SimAgent(control, "stage-1", deployment="stage")
    other.register()
    hold = StoreHold(store, table="leadership", events="INSERT OR UPDATE",
                     when="NEW.leader = 'pg2'")
    failover = {"epoch": 2, "leader": "pg1", "ts_ms": 1,
                "nodes": [obs("pg1", up=False), obs("pg2")]}
    try:
        assert a.metrics(**failover) == {"leader": "pg1", "epoch": 2}  # one of two: no quorum
        decided = Background(control.port, "POST", API + "/agent/metrics",
                             dict(failover, node_id="proxy-b"), token=TOKENS["prod"], timeout=60)
        wait_for(hold.waiting, timeout=10, what="the leader decision to wait in the store")
        worst = others_answer_while(control, other, decided, "the leader decision")
        assert a.commands("set_leader") == [], "a leader announced before it was stored"
    finally:
        hold.release()
    status, body = decided.result(timeout=30)
    assert status == 200 and body["leader"] == "pg2" and body["epoch"] == 3, body
    print(f"worst answer while a leader decision waited: {worst * 1000:.0f} ms")


def test_a_proxy_deletion_waiting_on_the_store_holds_no_other_request_nor_joins_an_operation(
        control, store, agents):
    """While a deletion waits in the store, no orchestration starts (it would address the
    proxy that is leaving); once it is stored, the proxy is pending and takes no command."""
    slow = agents(control, "proxy-slow")
    other = agents(control, "proxy-other")
    hold = StoreHold(store, table="members", events="DELETE", when="OLD.node_id = 'proxy-slow'")
    try:
        gone = Background(control.port, "DELETE", API + "/deployments/prod/proxies/proxy-slow",
                          token=ADMIN, timeout=60)
        wait_for(hold.waiting, timeout=10, what="the deletion to wait in the store")
        others_answer_while(control, other, gone, "the deletion")
        status, body = control.admin("POST", "/deployments/prod/maintenance",
                                     {"on": True, "timeout_s": 5})
        assert status == 409 and "being deleted" in body["error"], body
    finally:
        hold.release()
    status, body = gone.result(timeout=30)
    assert status == 200 and body["deleted"] is True and body["declared"] is False, body
    assert store_rows(store, "SELECT node_id FROM pgrelay.members") == [("proxy-other",)]
    status, body = control.admin("POST", "/deployments/prod/maintenance",
                                 {"on": True, "timeout_s": 20})
    assert status == 200 and body["ok"], body
    assert [p["node_id"] for p in body["proxies"]] == ["proxy-other"]
    assert slow.commands("maintenance") == []


def test_a_state_load_waiting_on_the_store_holds_no_other_request(control_factory, store):
    """A replica that becomes active (at start, or taking the lease over) loads the state by
    the store worker: while the store holds that read, /healthz answers at once and the
    replica says it is not ready; once the store lets go it is ready with the state."""
    first = control_factory()
    status, body = first.admin("POST", "/deployments/prod/proxies", {"node_id": "proxy-a"})
    assert status == 201, body
    assert first.stop() == 0
    locker = psycopg.connect(store)
    try:
        locker.execute("LOCK TABLE pgrelay.members IN ACCESS EXCLUSIVE MODE")
        second = control_factory(wait_ready=False)

        wait_for(lambda: waits_on_lock(store, "members"), timeout=10,
                 what="the state load to wait in the store")
        # longer than a store call may last (5 s) and the retry after it: a load on the
        # event loop would hold /healthz at some point of it
        until = time.monotonic() + 7.0
        while time.monotonic() < until:
            started = time.monotonic()
            status, _ = second.call("GET", "/healthz", timeout=10)
            waited = time.monotonic() - started
            assert status == 200 and waited < 1.0, f"/healthz: {status} after {waited:.2f}s"
            time.sleep(0.1)
        assert not second.ready(), "ready before its state was loaded"
    finally:
        locker.rollback()
        locker.close()
    wait_for(second.ready, timeout=15, what="the replica to be ready once the store lets go")
    assert second.proxies()["proxy-a"]["status"] == "declared"



def test_a_recovery_waiting_on_the_store_holds_no_other_request(control_factory, store, agents):
    """A replica that becomes active recovers what another one left running (its reads and
    writes by the store worker): while the store holds the recovery's read, /healthz and the
    agents are answered at once, /readyz says it is recovering and an orchestration is 503;
    once the store lets go, it is ready and orchestrations run."""
    first = control_factory()
    assert first.stop() == 0
    locker = psycopg.connect(store)
    try:
        locker.execute("LOCK TABLE pgrelay.maintenance IN ACCESS EXCLUSIVE MODE")
        second = control_factory(wait_ready=False)

        wait_for(lambda: waits_on_lock(store, "maintenance"), timeout=10,
                 what="the recovery's read to wait in the store")
        status, text = second.call("GET", "/readyz")
        assert status == 503 and "recovering" in text, (status, text)
        status, body = second.admin("POST", "/deployments/prod/maintenance",
                                    {"on": True, "timeout_s": 5})
        assert status == 503 and "recovering" in body["error"], body
        a = agents(second, "proxy-a")
        # longer than a store call may last (5 s: then the recovery reads everything again,
        # still recovering)
        until = time.monotonic() + 7.0
        while time.monotonic() < until:
            started = time.monotonic()
            status, _ = second.call("GET", "/healthz", timeout=10)
            assert status == 200, status
            assert a.metrics()["leader"] is None
            waited = time.monotonic() - started
            assert waited < 1.0, f"/healthz and a metrics call took {waited:.2f}s"
            time.sleep(0.1)
    finally:
        locker.rollback()
        locker.close()
    wait_for(second.ready, timeout=15, what="the replica to be ready once the store lets go")
    status, body = second.admin("POST", "/deployments/prod/maintenance",
                                {"on": True, "timeout_s": 10})
    assert status == 200 and body["ok"], body


def test_a_reload_whose_new_deployment_waits_on_the_store_holds_no_other_request(
        control, store):
    """SIGHUP with a new deployment: its row is written by the store worker; while the store
    holds it, /healthz answers at once and the new token is not accepted yet (a token works
    only once the store has it); then it is."""
    locker = psycopg.connect(store)
    try:
        locker.execute("LOCK TABLE pgrelay.deployments IN ACCESS EXCLUSIVE MODE")
        write_ini(control.conf, control.port, store,
                  deployments={"prod": TOKENS["prod"], "qa": "qa-agent-token-3"})
        os.kill(control.pid, signal.SIGHUP)

        wait_for(lambda: waits_on_lock(store, "deployments"), timeout=10,
                 what="the new deployment's row to wait in the store")
        for _ in range(10):
            started = time.monotonic()
            status, _ = control.call("GET", "/healthz", timeout=10)
            waited = time.monotonic() - started
            assert status == 200 and waited < 1.0, f"/healthz waited {waited:.2f}s"
        assert control.call("POST", API + "/agent/register", {"node_id": "qa-1"},
                            token="qa-agent-token-3")[0] == 401
    finally:
        locker.rollback()
        locker.close()
    wait_for(lambda: control.call("POST", API + "/agent/register", {"node_id": "qa-1"},
                                  token="qa-agent-token-3")[0] == 200,
             what="the new deployment's token to work once stored")

# --------------------------------------------------------------------------- #
# what a write on its way may not undo (found by review of the change above)
# --------------------------------------------------------------------------- #


def test_maintenance_off_whose_save_outlasts_its_timeout_still_ends_the_maintenance(
        control_factory, store, agents):
    """The operator's timeout passes while `maintenance off` is in the store: the answer is 504,
    but what the store now says (off) is what this replica does: no renewal of the pause
    follows, and the proxies are told off."""
    control = control_factory(control={"pause_lease": "3s"})
    a = agents(control, "proxy-a")
    status, body = control.admin("POST", "/deployments/prod/maintenance",
                                 {"on": True, "timeout_s": 10})
    assert status == 200 and body["ok"], body
    hold = StoreHold(store, table="maintenance", events="DELETE", when="true")
    try:
        off = Background(control.port, "POST", API + "/deployments/prod/maintenance",
                         {"on": False, "timeout_s": 1}, token=ADMIN, timeout=30)
        wait_for(hold.waiting, timeout=10, what="maintenance off to wait in the store")
        time.sleep(2.0)  # past the operator's timeout
    finally:
        hold.release()
    status, body = off.result(timeout=30)
    assert status == 504 and [p["node_id"] for p in body["proxies"]] == ["proxy-a"], body
    assert store_rows(store, "SELECT deployment FROM pgrelay.maintenance") == []
    wait_for(lambda: a.commands("maintenance")[-1]["args"]["on"] is False,
             what="maintenance off to reach the proxy")
    n = len(a.commands("maintenance"))
    time.sleep(2.5)  # more than a renewal period (a third of pause_lease)
    assert [c["args"] for c in a.commands("maintenance")[n:]] == [], "renewed after off"


def test_maintenance_on_again_while_the_last_one_ends_stays_on_in_the_store(
        control_factory, store, agents):
    """The operator's end of a maintenance passes while `maintenance on` is in the store: the
    end (a renewal's work) may not be written after it and turn it off."""
    control = control_factory(control={"pause_lease": "3s"})
    agents(control, "proxy-a")
    status, body = control.admin("POST", "/deployments/prod/maintenance",
                                 {"on": True, "resume_after_s": 2, "timeout_s": 10})
    assert status == 200 and body["ok"], body
    hold = StoreHold(store, table="maintenance", events="INSERT OR UPDATE", when="true")
    try:
        again = Background(control.port, "POST", API + "/deployments/prod/maintenance",
                           {"on": True, "timeout_s": 20}, token=ADMIN, timeout=30)
        wait_for(hold.waiting, timeout=10, what="maintenance on to wait in the store")
        time.sleep(3.5)  # the first one's end passes, renewal ticks come
    finally:
        hold.release()
    status, body = again.result(timeout=30)
    assert status == 200 and body["ok"], body
    time.sleep(1.5)  # a renewal tick after the answer
    assert store_rows(store, "SELECT deployment FROM pgrelay.maintenance") == [("prod",)]


def test_a_proxy_change_while_its_last_one_is_being_stored_is_409(control, store, agents):
    """Options set behind a deletion would declare the proxy again in the store; two option
    changes at once would lose one: the second change of a proxy waits for the first."""
    agents(control, "proxy-slow")
    hold = StoreHold(store, table="members", events="DELETE", when="OLD.node_id = 'proxy-slow'")
    try:
        gone = Background(control.port, "DELETE", API + "/deployments/prod/proxies/proxy-slow",
                          token=ADMIN, timeout=30)
        wait_for(hold.waiting, timeout=10, what="the deletion to wait in the store")
        status, body = control.admin("POST", "/deployments/prod/proxies/proxy-slow/options",
                                     {"options": {"read_only": True}})
        assert status == 409 and "being stored" in body["error"], body
    finally:
        hold.release()
    assert gone.result(timeout=30)[0] == 200
    assert store_rows(store, "SELECT node_id FROM pgrelay.members") == []

    agents(control, "proxy-a")
    hold = StoreHold(store, table="members", events="UPDATE", when="OLD.node_id = 'proxy-a'")
    try:
        one = Background(control.port, "POST", API + "/deployments/prod/proxies/proxy-a/options",
                         {"options": {"read_only": True}}, token=ADMIN, timeout=30)
        wait_for(hold.waiting, timeout=10, what="the first change to wait in the store")
        status, body = control.admin("POST", "/deployments/prod/proxies/proxy-a/options",
                                     {"options": {"maintenance_exempt": True}})
        assert status == 409, body
    finally:
        hold.release()
    assert one.result(timeout=30)[0] == 200
    [(options,)] = store_rows(store, "SELECT options FROM pgrelay.members"
                                     " WHERE node_id = 'proxy-a'")
    assert options.get("read_only") is True, options
