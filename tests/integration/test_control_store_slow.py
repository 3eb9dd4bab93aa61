"""A slow store delays no other request (issue 9, Deliver 2): an agent's long poll whose store
query waits (its table locked by another session) is held on the store worker, while
/healthz, a view served from memory and other agents' metrics are answered at once."""

import time

import psycopg

from conftest import wait_for
from test_control_api import (  # noqa: F401 - fixtures
    API,
    TOKENS,
    Background,
    SimAgent,
    agents,
    control,
    control_factory,
    store,
)


def test_a_long_poll_waiting_on_the_store_holds_no_other_request(control, store):
    slow = SimAgent(control, "proxy-slow")
    slow.register()
    other = SimAgent(control, "proxy-other")
    other.register()
    locker = psycopg.connect(store)
    try:
        # the poll reads its commands FOR UPDATE and marks them delivered: it waits here
        locker.execute("LOCK TABLE pgrelay.command_acks IN EXCLUSIVE MODE")
        poll = Background(control.port, "GET", API + "/agent/commands?node_id=proxy-slow&wait_s=0",
                          token=TOKENS["prod"], timeout=30)

        def poll_waits():
            with psycopg.connect(store, autocommit=True) as c:
                return c.execute("SELECT count(*) FROM pg_stat_activity WHERE"
                                 " wait_event_type = 'Lock' AND query LIKE '%command_acks%'"
                                 ).fetchone()[0] > 0

        wait_for(poll_waits, timeout=10, what="the poll's query to wait on the lock")
        worst = 0.0
        for _ in range(10):
            for ask in (lambda: control.call("GET", "/healthz", timeout=5),
                        lambda: control.admin("GET", "/deployments/prod/proxies", timeout=5),
                        lambda: other.post("/metrics", {"ts_ms": int(time.time() * 1000)})):
                t = time.monotonic()
                status, _ = ask()
                worst = max(worst, time.monotonic() - t)
                assert status == 200
            time.sleep(0.1)
        assert worst < 1.0, f"a request waited {worst:.2f}s behind the poll's store query"
        assert not poll.done(), "the poll did not wait for its store query"
    finally:
        locker.commit()
        locker.close()
    status, body = poll.result()
    assert status == 200 and body["commands"] == [], body
    print(f"worst answer while the poll waited on the store: {worst * 1000:.0f} ms")
