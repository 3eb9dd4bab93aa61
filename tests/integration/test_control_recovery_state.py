"""A replica that loses the lease and takes it again recovers from what the store says, not from
what it remembered (issue 9): its recovery reads the store on the store worker, and until that
read is back nothing it knew of the operator's maintenance from its last activation is acted on.

Scenario of both tests: the replica holds the lease with maintenance on; "another holder" (the
test, writing the store) takes the lease and changes the maintenance; the replica notices,
steps down, takes the lease back, and its recovery's read of the maintenance waits on a lock
the test holds for longer than a renewal period. Then:

  * maintenance turned off by the other holder: no pause is sent after that (a renewal of the
    remembered maintenance would pause the fleet for a maintenance that no longer exists);
  * maintenance made open-ended by the other holder: it stays in the store (the end of the
    remembered, time-limited one may not delete it).
"""

import time

import psycopg

from conftest import wait_for
from control_helpers import (  # noqa: F401 - fixtures used by name
    agents,
    control_factory,
    store,
    store_rows,
)
from test_control_store_offloop import waits_on_lock

LEASE = {"enabled": "on", "lease_duration_secs": 3, "lease_interval_secs": 1,
         "release_timeout_secs": 2}


def lock_waits(store, table):
    """(pid, query start) of each statement on pgrelay.table waiting for a lock."""
    with psycopg.connect(store, autocommit=True) as c:
        return set(c.execute("SELECT pid, query_start FROM pg_stat_activity"
                             " WHERE wait_event_type = 'Lock' AND query LIKE %s"
                             " AND pid <> pg_backend_pid()", (f"%pgrelay.{table}%",)).fetchall())


def retake_with_recovery_held(control, store, other_holder, hold_s):
    """other_holder(conn) changes the store as another lease holder would; the replica loses
    the lease, takes it back, and its recovery's read of pgrelay.maintenance waits hold_s;
    returns the store's clock before the take-back."""
    with psycopg.connect(store, autocommit=True) as c:
        c.execute("UPDATE pgrelay.lease SET holder = 'another-replica', renew_time = now()")
        other_holder(c)
    wait_for(lambda: not control.ready(), timeout=10, what="the replica to lose the lease")
    [(before,)] = store_rows(store, "SELECT now()")
    locker = psycopg.connect(store)
    try:
        locker.execute("LOCK TABLE pgrelay.maintenance IN ACCESS EXCLUSIVE MODE")
        wait_for(lambda: waits_on_lock(store, "maintenance"), timeout=15,
                 what="the take-back's recovery to wait in the store")
        time.sleep(hold_s)  # renewal ticks come meanwhile (every third of pause_lease)
    finally:
        locker.rollback()
        locker.close()
    wait_for(control.ready, timeout=15, what="the replica to be ready again")
    time.sleep(1.5)  # renewal ticks after the recovery
    return before


def test_maintenance_turned_off_by_another_holder_is_not_renewed_after_a_take_back(
        control_factory, store, agents):
    control = control_factory(lease=LEASE, control={"pause_lease": "3s"})
    agents(control, "proxy-a")
    status, body = control.admin("POST", "/deployments/prod/maintenance",
                                 {"on": True, "timeout_s": 10})
    assert status == 200 and body["ok"], body
    before = retake_with_recovery_held(
        control, store, lambda c: c.execute("DELETE FROM pgrelay.maintenance"), hold_s=3.0)
    pauses = store_rows(store, "SELECT id, args FROM pgrelay.commands WHERE type = 'maintenance'"
                               f" AND created_at > '{before.isoformat()}' ORDER BY id")
    assert not any(args.get("on") for _, args in pauses), \
        f"pauses sent after the store said maintenance off: {pauses}"


def test_maintenance_made_open_ended_by_another_holder_stays_after_a_take_back(
        control_factory, store, agents):
    control = control_factory(lease=LEASE, control={"pause_lease": "3s"})
    agents(control, "proxy-a")
    status, body = control.admin("POST", "/deployments/prod/maintenance",
                                 {"on": True, "resume_after_s": 4, "timeout_s": 10})
    assert status == 200 and body["ok"], body
    retake_with_recovery_held(
        control, store, lambda c: c.execute("UPDATE pgrelay.maintenance SET until_ms = 0"),
        hold_s=1.8)
    assert store_rows(store, "SELECT deployment, until_ms FROM pgrelay.maintenance") == \
        [("prod", 0)], "the maintenance in the store was ended by one remembered from before"


def test_a_recovery_whose_read_fails_decides_nothing_until_it_reads_again(
        control_factory, store, agents):
    """Another replica paused the fleet for a switchover (step "pause") and stopped. The next
    holder's first read of what it left running fails: the store holds a lock on
    pgrelay.operations longer than a store call may last (5 s). Invariant: a recovery decides
    nothing on half a read; the replica stays recovering (orchestrations 503), reads again
    (leaving no statement of its own waiting on the lock), and once the store answers it rolls
    the switchover back: the operation ends in the store and the fleet's resume is queued. (Before, it went on without the operations: the one left
    running stayed "running" for ever and nobody resumed the proxies it had paused.)"""
    first = control_factory()
    agents(first, "proxy-a", poll=False)
    assert first.stop() == 0
    [(op_id,)] = store_rows(
        store, "INSERT INTO pgrelay.operations (deployment, kind, node, old_leader, runner, step,"
               " timeout_s) VALUES ('prod', 'switchover', 'pg2', 'pg1', 'another-replica',"
               " 'pause', 30) RETURNING id")
    [(before,)] = store_rows(store, "SELECT now()")
    # The state load reads pgrelay.proxies after its last statement on pgrelay.operations:
    # held there, the lock on pgrelay.operations is taken between the load and the recovery.
    gate, locker = psycopg.connect(store), psycopg.connect(store)
    try:
        gate.execute("LOCK TABLE pgrelay.proxies IN ACCESS EXCLUSIVE MODE")
        second = control_factory(wait_ready=False)
        wait_for(lambda: waits_on_lock(store, "proxies"), timeout=15,
                 what="the state load to wait in the store")
        locker.execute("LOCK TABLE pgrelay.operations IN ACCESS EXCLUSIVE MODE")
        gate.rollback()
        waiting = wait_for(lambda: lock_waits(store, "operations"), timeout=15,
                           what="the recovery's read to wait in the store")
        wait_for(lambda: "recovery: cannot read the operations left running" in second.log()
                 or second.ready(), timeout=30, what="the recovery's read to fail")

        def still_recovering():
            status, text = second.call("GET", "/readyz")
            assert status == 503 and "recovering" in text, (status, text)
            status, body = second.admin("POST", "/deployments/prod/maintenance",
                                        {"on": True, "timeout_s": 5})
            assert status == 503 and "recovering" in body["error"], body

        still_recovering()
        # it reads again; each read's wait ended in the store (lock_timeout): none is left
        # behind waiting on the lock, one more at every attempt
        again = wait_for(lambda: lock_waits(store, "operations") - waiting, timeout=30,
                         what="the recovery to read again")
        assert len(lock_waits(store, "operations")) <= 1, (waiting, again)
        still_recovering()
    finally:
        gate.rollback()
        locker.rollback()
        gate.close()
        locker.close()
    wait_for(second.ready, timeout=20, what="the replica to be ready once the store answers")
    wait_for(lambda: store_rows(store, "SELECT state FROM pgrelay.operations WHERE id = %s"
                                % op_id) == [("rolled_back",)],
             timeout=10, what="the switchover left running to be rolled back")
    resumes = store_rows(store, "SELECT args FROM pgrelay.commands WHERE type = 'maintenance'"
                                f" AND created_at > '{before.isoformat()}'")
    assert [args.get("on") for (args,) in resumes] == [False], resumes
    assert "recovery: cannot read the operations left running" in second.log()
