"""The configuration apply's store calls that run on the store worker, not on the event loop
(issue 9, Deliver 2): with the table they need locked by another session, the call waits
alone, and /healthz, a view served from memory and agents' metrics are answered at once:

  * an agent fetching the desired configuration (GET /api/v1/agent/config);
  * an apply's start (the current version read, the new version and its operation recorded);
  * a committed operation's record updated when its last pending proxy reports the version.
"""

import contextlib
import time

import psycopg

from conftest import wait_for
from test_control_api import (  # noqa: F401 - fixtures
    ADMIN,
    API,
    TOKENS,
    Background,
    SimAgent,
    agents,
    control,
    control_factory,
    store,
)

TEXT = "[pgrelay]\nlisten_port = 6432\n\n[node.pg1]\nhost = 10.0.0.1\nrole = primary\n"


@contextlib.contextmanager
def locked(store, table):
    """table locked by another session until the block ends."""
    locker = psycopg.connect(store)
    try:
        locker.execute(f"LOCK TABLE pgrelay.{table} IN ACCESS EXCLUSIVE MODE")
        yield
    finally:
        locker.commit()
        locker.close()


def wait_until_a_query_waits_on(store, table, what):
    def waits():
        with psycopg.connect(store, autocommit=True) as c:
            return c.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                             " wait_event_type = 'Lock' AND query LIKE %s",
                             (f"%{table}%",)).fetchone()[0] > 0
    wait_for(waits, timeout=10, what=f"{what} to wait on the lock")


def worst_answer(control, agent, metrics=None):
    """The slowest of ten rounds of /healthz, the proxies view and agent's metrics (seconds)."""
    worst = 0.0
    for _ in range(10):
        for ask in (lambda: control.call("GET", "/healthz", timeout=10),
                    lambda: control.admin("GET", "/deployments/prod/proxies", timeout=10),
                    lambda: agent.post("/metrics", dict(metrics or {},
                                                        ts_ms=int(time.time() * 1000)))):
            t = time.monotonic()
            status, _ = ask()
            worst = max(worst, time.monotonic() - t)
            assert status == 200
        time.sleep(0.1)
    return worst


def operation_state(control):
    status, ops = control.admin("GET", "/deployments/prod/operations")
    return ops[0]["state"]


def test_fetching_the_desired_configuration_while_the_store_is_locked_holds_no_other_request(
        control, agents, store):
    agents(control, "proxy-a")
    status, answer = control.admin("POST", "/deployments/prod/config", {"text": TEXT})
    assert status == 200 and answer["version"] == 1, answer
    other = SimAgent(control, "proxy-other")
    other.register()
    with locked(store, "config_versions"):
        fetch = Background(control.port, "GET", API + "/agent/config?node_id=proxy-a",
                           token=TOKENS["prod"], timeout=30)
        wait_until_a_query_waits_on(store, "config_versions", "the fetch's query")
        worst = worst_answer(control, other)
        assert worst < 1.0, f"a request waited {worst:.2f}s behind the fetch's store query"
        assert not fetch.done(), "the fetch did not wait for its store query"
    status, body = fetch.result()
    assert status == 200 and body == {"version": 1, "text": TEXT}, body
    print(f"worst answer while the fetch waited on the store: {worst * 1000:.0f} ms")


def test_an_apply_waiting_on_the_store_to_record_its_version_holds_no_other_request(
        control, agents, store):
    agents(control, "proxy-a")
    other = agents(control, "proxy-other")  # it takes the apply too
    with locked(store, "config_versions"):
        apply = Background(control.port, "POST", API + "/deployments/prod/config",
                           {"text": TEXT, "timeout_s": 10}, token=ADMIN, timeout=30)
        wait_until_a_query_waits_on(store, "config_versions", "the apply's query")
        worst = worst_answer(control, other)
        assert worst < 1.0, f"a request waited {worst:.2f}s behind the apply's store query"
        assert not apply.done(), "the apply did not wait for its store query"
        # another apply meanwhile is refused: one orchestration at a time
        status, body = control.admin("POST", "/deployments/prod/config", {"text": TEXT})
        assert status == 409, body
    status, answer = apply.result()
    assert status == 200 and answer["version"] == 1 and answer["state"] == "done", answer
    print(f"worst answer while the apply waited on the store: {worst * 1000:.0f} ms")


def test_recording_a_pending_proxys_arrival_while_the_store_is_locked_holds_no_other_request(
        control, agents, store):
    agents(control, "proxy-a")
    b = agents(control, "proxy-b",
               policy=lambda cmd: (False, "disk full") if cmd["type"] == "config_commit"
               else (True, "ok"))
    status, answer = control.admin("POST", "/deployments/prod/config", {"text": TEXT})
    assert status == 200 and answer["state"] == "committed", answer
    with locked(store, "operations"):
        b.metrics(config_version=1)
        wait_until_a_query_waits_on(store, "operations", "the record's update")
        worst = worst_answer(control, b, {"config_version": 1})
        assert worst < 1.0, f"a request waited {worst:.2f}s behind the record's update"
    wait_for(lambda: operation_state(control) == "done", what="the operation to be recorded done")
    print(f"worst answer while the record's update waited on the store: {worst * 1000:.0f} ms")


def test_a_commit_decision_waiting_on_the_store_holds_no_other_request(
        control_factory, agents, store, monkeypatch):
    """The decision (the version committed, the operation at its commit step) is written by the
    store worker: the apply holds after its prepare step (the test hook) while the test locks
    config_versions, then its decision waits alone."""
    monkeypatch.setenv("PGRELAY_CONTROL_TEST_HOLD", "prepare")
    monkeypatch.setenv("PGRELAY_CONTROL_TEST_HOLD_MS", "1500")
    control = control_factory()
    a = agents(control, "proxy-a")
    offset = len(control.log())
    apply = Background(control.port, "POST", API + "/deployments/prod/config",
                       {"text": TEXT, "timeout_s": 20}, token=ADMIN, timeout=40)
    wait_for(lambda: "holds after its prepare step" in control.log()[offset:], timeout=10,
             what="the apply to hold after its prepare step")
    with locked(store, "config_versions"):
        wait_until_a_query_waits_on(store, "config_versions", "the decision")
        worst = worst_answer(control, a)
        assert worst < 1.0, f"a request waited {worst:.2f}s behind the decision's store write"
        assert not apply.done(), "the apply did not wait for its decision"
    status, answer = apply.result()
    assert status == 200 and answer["state"] == "done", answer
    print(f"worst answer while the decision waited on the store: {worst * 1000:.0f} ms")
