"""Every pause has an end: a control plane that dies during a switchover does not leave the
fleet paused (invariant 4 of DESIGN.md; issue 8, Deliver 4)."""

import os
import signal
import subprocess
import time

from conftest import wait_for
from control_e2e_helpers import ADMIN_TOKEN, CTL_BIN, DEPLOYMENT, info
from fleet import Fleet, Watch, postmaster_pid

OP_TIMEOUT_S = 5
PAUSE_MARGIN_S = 5  # OPERATOR_PAUSE_MARGIN_S: a switchover's pause ends this long after its deadline


def start_switchover(fleet, *args):
    env = dict(os.environ, PGRELAYCTL_ENDPOINT=fleet.control.url, PGRELAYCTL_TOKEN=ADMIN_TOKEN,
               PGRELAYCTL_DEPLOYMENT=DEPLOYMENT)
    return subprocess.Popen([CTL_BIN, "-o", "json", "switchover", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_control_plane_killed_during_a_switchover_pause_leaves_no_proxy_paused(pg):
    """switchover --promote, held after its pause (test hook; the promote target is also slow
    to answer, SIGSTOP of its postmaster), then kill -9 of the control plane: nobody runs
    `maintenance off`, and both proxies accept and run new sessions again by the pause's end
    time (the operation's deadline plus the margin), which `show info` shows meanwhile."""
    started = time.monotonic()
    with Fleet.start(pg, hold="pause") as fleet:
        watch = Watch(fleet)
        target = postmaster_pid(fleet.cluster["pg2"])
        os.kill(target, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            ctl = start_switchover(fleet, "--node", "pg2", "--promote", "--timeout",
                                   str(OP_TIMEOUT_S))
            wait_for(lambda: all(info(r)["maintenance"] == "on" for r in fleet.proxies.values()),
                     timeout=OP_TIMEOUT_S, what="both proxies paused by the switchover")
            until = {n: info(r)["maintenance_until"] for n, r in fleet.proxies.items()}
            fleet.control.kill9()
            ctl.kill()
            ctl.wait(10)
            assert all(until.values()), f"a pause without an end time: {until}"
            for node_id, relay in fleet.proxies.items():
                assert not fleet.new_session_runs(relay, timeout=0.5), \
                    f"{node_id} was not paused"
            dead_man = OP_TIMEOUT_S + PAUSE_MARGIN_S
            wait_for(lambda: all(fleet.new_session_runs(r, timeout=0.5)
                                 for r in fleet.proxies.values()),
                     timeout=dead_man + 3, interval=0.2,
                     what="both proxies to resume by themselves at the pause's end")
            resumed_after = time.monotonic() - t0
            assert resumed_after <= dead_man + 3, resumed_after
            for node_id, relay in fleet.proxies.items():
                assert "maintenance timeout reached: resuming" in relay.log(), node_id
                assert info(relay)["maintenance"] == "off", node_id
        finally:
            os.kill(target, signal.SIGCONT)
        watch.check()
    print(f"scenario time {time.monotonic() - started:.1f}s, resumed {resumed_after:.1f}s "
          "after the switchover started")
