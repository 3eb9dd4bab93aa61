"""The lease holder stopped (SIGSTOP) longer than its lease during a switchover, while a second
replica takes over (issue 8, Deliver 7): the new holder rolls the switchover back from its
record, the fleet resumes, and the old holder, continued, steps down and changes nothing."""

import os
import signal
import threading
import time

from conftest import wait_for
from control_e2e_helpers import DEPLOYMENT, info
from fleet import Fleet, Watch
from test_late_promote import assert_one_primary_for


def test_a_lease_holder_stopped_during_a_switchover_is_rolled_back_by_the_next(pg):
    started = time.monotonic()
    with Fleet.start(pg, hold="pause", leased=True) as fleet:
        a, b = fleet.control, fleet.control2
        watch = Watch(fleet)
        result = {}
        t = threading.Thread(target=lambda: result.setdefault(
            "r", fleet.ctl_json("switchover", "--node", "pg2", "--promote", "--timeout", "60")))
        offset = a.log_size()
        t.start()
        wait_for(lambda: "holds after its pause step" in a.log_since(offset), timeout=15,
                 what="the switchover held after its pause")
        os.kill(a.proc.pid, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            wait_for(b.holds_lease, timeout=10, what="the second replica to take the lease")
            wait_for(lambda: "rolled back by" in b.log_since(0), timeout=5,
                     what="the new holder to roll the switchover back")
            # an agent notices the stopped holder only when its long poll there times out
            # (poll wait 25 s + request_timeout), then takes the next endpoint: still well
            # before the pause's dead-man end (the switchover's 60 s deadline + 5 s)
            wait_for(lambda: all(info(r)["maintenance"] == "off"
                                 for r in fleet.proxies.values()),
                     timeout=40, what="every proxy resumed through the new holder")
            resumed = time.monotonic() - t0
            status, [op] = b.api("GET", f"/deployments/{DEPLOYMENT}/operations")
            assert status == 200 and op["state"] == "rolled_back", op
        finally:
            os.kill(a.proc.pid, signal.SIGCONT)
        wait_for(lambda: not a.holds_lease(), timeout=10, what="the old holder to step down")
        t.join(70)
        time.sleep(1.0)
        status, [after] = b.api("GET", f"/deployments/{DEPLOYMENT}/operations")
        assert (after["state"], after["outcome"], after["steps"]) == \
            (op["state"], op["outcome"], op["steps"]), "the old holder changed the record"
        assert_one_primary_for(fleet.cluster, 2)
        for relay in fleet.proxies.values():
            assert info(relay)["write_leader"] == "pg1"
        watch.check()
    print(f"scenario time {time.monotonic() - started:.1f}s, resumed {resumed:.1f}s after "
          "the holder stopped")
