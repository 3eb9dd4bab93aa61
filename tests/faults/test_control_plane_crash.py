"""kill -9 of the control plane at each step of a switchover --promote (issue 8, Deliver 2
and 7): the next control plane (the same one restarted) finishes or rolls back the operation
from its record, at once: when the record says the promote succeeded (killed after the promote
or the switch step) it finishes it (the target is the leader, every proxy switches and
resumes, the old leader stays fenced); before that it rolls it back (every proxy resumes, the
old leader is unfenced). Writers run through both proxies all along: no
acknowledged write is lost, and the invariants hold throughout."""

import os
import subprocess
import time
import uuid

import pytest

from conftest import wait_for
from control_e2e_helpers import ADMIN_TOKEN, CTL_BIN, DEPLOYMENT, info
from fleet import Fleet, Watch, Writer, assert_no_acknowledged_write_lost, direct_write_fails


def start_switchover(fleet, timeout_s):
    env = dict(os.environ, PGRELAYCTL_ENDPOINT=fleet.control.url, PGRELAYCTL_TOKEN=ADMIN_TOKEN,
               PGRELAYCTL_DEPLOYMENT=DEPLOYMENT)
    return subprocess.Popen([CTL_BIN, "-o", "json", "switchover", "--node", "pg2", "--promote",
                             "--timeout", str(timeout_s)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("step", ["pause", "fence", "catch_up", "promote", "switch"])
def test_a_control_plane_killed_after_a_switchover_step_is_rolled_back_by_the_next(pg, step):
    started = time.monotonic()
    with Fleet.start(pg, hold=step) as fleet:
        pg1, pg2 = fleet.cluster["pg1"], fleet.cluster["pg2"]
        table = "crash_" + uuid.uuid4().hex[:8]
        with fleet.a.connect() as c:
            c.execute(f"CREATE TABLE {table} (proxy text, n int)")
        watch = Watch(fleet)
        writers = [Writer(r, table, n) for n, r in fleet.proxies.items()]
        try:
            wait_for(lambda: all(len(w.acked) > 3 for w in writers), timeout=10,
                     what="both writers to get going")
            offset = fleet.control.log_size()
            ctl = start_switchover(fleet, 30)
            wait_for(lambda: f"holds after its {step} step" in fleet.control.log_since(offset),
                     timeout=15, what=f"the switchover to reach its {step} step")
            fleet.control.kill9()
            ctl.kill()
            ctl.wait(10)
            t0 = time.monotonic()
            fleet.start_control()
            promoted = step in ("promote", "switch")
            # rolled back at once (well before the pause's dead-man end, 35 s away)
            wait_for(lambda: all(info(r)["maintenance"] == "off"
                                 for r in fleet.proxies.values()),
                     timeout=10, what="every proxy resumed by the new control plane")
            resumed = time.monotonic() - t0
            [op] = fleet.control.get(f"/deployments/{DEPLOYMENT}/operations")
            if promoted:  # the promote succeeded: finished (switch, resume), not rolled back
                assert op["state"] == "done", op
                assert "finished by" in op["outcome"] and "pg1 stays fenced" in op["outcome"], op
            else:
                assert op["state"] == "rolled_back", op
                assert "rolled back by" in op["outcome"], op
            leader = "pg2" if promoted else "pg1"
            wait_for(lambda: all(info(r)["write_leader"] == leader
                                 for r in fleet.proxies.values()),
                     timeout=15, what=f"both proxies routing to {leader}")
            wait_for(lambda: all(w.acked and w.acked[-1] > 0 and len(w.acked) > 3
                                 for w in writers), timeout=10, what="writes again")
            n_before = [len(w.acked) for w in writers]
            wait_for(lambda: all(len(w.acked) > n + 3 for w, n in zip(writers, n_before)),
                     timeout=10, what="writes going on after the rollback")
        finally:
            for w in writers:
                w.finish()
        watch.check()
        if promoted:
            assert not pg2.in_recovery()
            assert "not currently accepting connections" in direct_write_fails(pg1, table)
            assert_no_acknowledged_write_lost(pg2, table, writers)
        else:
            assert pg2.in_recovery(), "promoted although the operation was rolled back"
            wait_for(lambda: pg1.answers(), timeout=10, what="pg1 unfenced")
            assert_no_acknowledged_write_lost(pg1, table, writers)
    print(f"scenario {step}: time {time.monotonic() - started:.1f}s, resumed {resumed:.1f}s "
          "after the restart")
