"""The configuration apply's agent route does not wait for the store on the event loop (issue
9, Deliver 2): an agent fetching the desired configuration (GET /api/v1/agent/config) while the
store's config_versions table is locked is held on the store worker, and /healthz, views and
other agents' metrics are answered at once."""

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


def test_fetching_the_desired_configuration_while_the_store_is_locked_holds_no_other_request(
        control, agents, store):
    agents(control, "proxy-a")
    status, answer = control.admin("POST", "/deployments/prod/config", {"text": TEXT})
    assert status == 200 and answer["version"] == 1, answer
    other = SimAgent(control, "proxy-other")
    other.register()
    locker = psycopg.connect(store)
    try:
        locker.execute("LOCK TABLE pgrelay.config_versions IN ACCESS EXCLUSIVE MODE")
        fetch = Background(control.port, "GET", API + "/agent/config?node_id=proxy-a",
                           token=TOKENS["prod"], timeout=30)

        def fetch_waits():
            with psycopg.connect(store, autocommit=True) as c:
                return c.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                 " wait_event_type = 'Lock' AND query LIKE '%config_versions%'"
                                 ).fetchone()[0] > 0

        wait_for(fetch_waits, timeout=10, what="the fetch's query to wait on the lock")
        worst = 0.0
        for _ in range(10):
            for ask in (lambda: control.call("GET", "/healthz", timeout=10),
                        lambda: control.admin("GET", "/deployments/prod/proxies", timeout=10),
                        lambda: other.post("/metrics", {"ts_ms": int(time.time() * 1000)})):
                t = time.monotonic()
                status, _ = ask()
                worst = max(worst, time.monotonic() - t)
                assert status == 200
            time.sleep(0.1)
        assert worst < 1.0, f"a request waited {worst:.2f}s behind the fetch's store query"
        assert not fetch.done(), "the fetch did not wait for its store query"
    finally:
        locker.commit()
        locker.close()
    status, body = fetch.result()
    assert status == 200 and body == {"version": 1, "text": TEXT}, body
    print(f"worst answer while the fetch waited on the store: {worst * 1000:.0f} ms")


def test_recording_a_pending_proxys_arrival_while_the_store_is_locked_holds_no_other_request(
        control, agents, store):
    """The committed operation's record is updated by the store worker when the last pending
    proxy reports the version: a locked operations table delays that write, nothing else."""
    agents(control, "proxy-a")
    b = agents(control, "proxy-b",
               policy=lambda cmd: (False, "disk full") if cmd["type"] == "config_commit"
               else (True, "ok"))
    status, answer = control.admin("POST", "/deployments/prod/config", {"text": TEXT})
    assert status == 200 and answer["state"] == "committed", answer
    locker = psycopg.connect(store)
    try:
        locker.execute("LOCK TABLE pgrelay.operations IN ACCESS EXCLUSIVE MODE")
        b.metrics(config_version=1)

        def write_waits():
            with psycopg.connect(store, autocommit=True) as c:
                return c.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                 " wait_event_type = 'Lock' AND query LIKE '%operations%'"
                                 ).fetchone()[0] > 0

        wait_for(write_waits, timeout=10, what="the record's update to wait on the lock")
        worst = 0.0
        for _ in range(10):
            for ask in (lambda: control.call("GET", "/healthz", timeout=10),
                        lambda: control.admin("GET", "/deployments/prod/proxies", timeout=10),
                        lambda: b.post("/metrics", {"ts_ms": int(time.time() * 1000),
                                                    "config_version": 1})):
                t = time.monotonic()
                status, _ = ask()
                worst = max(worst, time.monotonic() - t)
                assert status == 200
            time.sleep(0.1)
        assert worst < 1.0, f"a request waited {worst:.2f}s behind the record's update"
    finally:
        locker.commit()
        locker.close()

    def state():
        status, ops = control.admin("GET", "/deployments/prod/operations")
        return ops[0]["state"]
    wait_for(lambda: state() == "done", what="the operation to be recorded done")
    print(f"worst answer while the record's update waited on the store: {worst * 1000:.0f} ms")


def test_an_apply_waiting_on_the_store_to_record_its_version_holds_no_other_request(
        control, agents, store):
    """An apply reads the current version and records the new one (and its operation) on the
    store worker: with config_versions locked, it waits alone."""
    agents(control, "proxy-a")
    other = agents(control, "proxy-other")  # it takes the apply too
    locker = psycopg.connect(store)
    try:
        locker.execute("LOCK TABLE pgrelay.config_versions IN ACCESS EXCLUSIVE MODE")
        apply = Background(control.port, "POST", API + "/deployments/prod/config",
                           {"text": TEXT, "timeout_s": 10}, token=ADMIN, timeout=30)

        def apply_waits():
            with psycopg.connect(store, autocommit=True) as c:
                return c.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                 " wait_event_type = 'Lock' AND query LIKE '%config_versions%'"
                                 ).fetchone()[0] > 0

        wait_for(apply_waits, timeout=10, what="the apply's query to wait on the lock")
        worst = 0.0
        for _ in range(10):
            for ask in (lambda: control.call("GET", "/healthz", timeout=10),
                        lambda: control.admin("GET", "/deployments/prod/proxies", timeout=10),
                        lambda: other.post("/metrics", {"ts_ms": int(time.time() * 1000)})):
                t = time.monotonic()
                status, _ = ask()
                worst = max(worst, time.monotonic() - t)
                assert status == 200
            time.sleep(0.1)
        assert worst < 1.0, f"a request waited {worst:.2f}s behind the apply's store query"
        assert not apply.done(), "the apply did not wait for its store query"
        # another apply meanwhile is refused: one orchestration at a time
        status, body = control.admin("POST", "/deployments/prod/config", {"text": TEXT})
        assert status == 409, body
    finally:
        locker.commit()
        locker.close()
    status, answer = apply.result()
    assert status == 200 and answer["version"] == 1 and answer["state"] == "done", answer
    print(f"worst answer while the apply waited on the store: {worst * 1000:.0f} ms")
