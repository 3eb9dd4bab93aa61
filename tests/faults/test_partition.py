"""One proxy cut off from the control plane during a switchover (issue 8, Deliver 7): proxy-b
reaches the control plane at 127.0.0.3, and an nftables rule on the loopback drops what it
sends there once both proxies took the switchover's pause. Whatever the switchover then does
(it finishes through proxy-a, or it is rolled back), at no moment do two unpaused proxies
route writes to different nodes, the cut-off proxy resumes by itself at its pause's dead-man
end, and no acknowledged write is lost."""

import contextlib
import os
import subprocess
import time
import uuid

from conftest import wait_for
from control_e2e_helpers import ADMIN_TOKEN, CTL_BIN, DEPLOYMENT, info
from fleet import Fleet, Watch, Writer, _parse_time, assert_no_acknowledged_write_lost

CUT_HOST = "127.0.0.3"  # where proxy-b reaches the control plane
OP_TIMEOUT_S = 6
PAUSE_MARGIN_S = 5  # OPERATOR_PAUSE_MARGIN_S
SLACK_S = 3


def start_switchover(fleet, *args):
    env = dict(os.environ, PGRELAYCTL_ENDPOINT=fleet.control.url, PGRELAYCTL_TOKEN=ADMIN_TOKEN,
               PGRELAYCTL_DEPLOYMENT=DEPLOYMENT)
    return subprocess.Popen([CTL_BIN, "-o", "json", "switchover", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def nft(*args):
    subprocess.run(["nft", *args], check=True, capture_output=True, text=True)


@contextlib.contextmanager
def partition(port):
    """Drop every packet sent to CUT_HOST:port while inside (its own nftables table, removed
    in every case)."""
    table = "pgrelay_faults_" + uuid.uuid4().hex[:8]
    nft("add", "table", "ip", table)
    try:
        nft("add", "chain", "ip", table, "out",
            "{ type filter hook output priority 0 ; policy accept ; }")
        nft("add", "rule", "ip", table, "out", "ip", "daddr", CUT_HOST, "tcp", "dport",
            str(port), "drop")
        yield
    finally:
        nft("delete", "table", "ip", table)


def test_a_proxy_cut_off_during_a_switchover_resumes_at_its_dead_man_end(pg):
    started = time.monotonic()
    with Fleet.start(pg, control_settings={"listen_addr": "0.0.0.0"},
                     control_hosts={"proxy-b": CUT_HOST}) as fleet:
        pg1, pg2 = fleet.cluster["pg1"], fleet.cluster["pg2"]
        table = "cut_" + uuid.uuid4().hex[:8]
        with fleet.a.connect() as c:
            c.execute(f"CREATE TABLE {table} (proxy text, n int)")
        watch = Watch(fleet)
        writers = [Writer(r, table, n) for n, r in fleet.proxies.items()]
        try:
            wait_for(lambda: all(len(w.acked) > 3 for w in writers), timeout=10,
                     what="both writers to get going")
            ctl = start_switchover(fleet, "--node", "pg2", "--promote", "--timeout",
                                   str(OP_TIMEOUT_S))
            wait_for(lambda: info(fleet.b)["maintenance"] == "on", timeout=OP_TIMEOUT_S,
                     interval=0.01, what="proxy-b paused by the switchover")
            with partition(fleet.control.port):
                t0 = time.monotonic()
                until_b = info(fleet.b)["maintenance_until"]
                out, err = ctl.communicate(timeout=OP_TIMEOUT_S + 10)
                # proxy-b hears nothing more: it resumes at its pause's end (the switchover's
                # deadline plus the margin), no later
                wait_for(lambda: info(fleet.b)["maintenance"] == "off",
                         timeout=OP_TIMEOUT_S + PAUSE_MARGIN_S + SLACK_S, interval=0.1,
                         what="proxy-b to resume by itself at its dead-man end")
                resumed_b = time.monotonic() - t0
                assert "maintenance timeout reached: resuming" in fleet.b.log()
                assert until_b and time.time() <= _parse_time(until_b) + SLACK_S, until_b
                [op] = fleet.control.get(f"/deployments/{DEPLOYMENT}/operations")
                promoted = op["promote_sent"]
                leader = "pg2" if promoted else "pg1"
                wait_for(lambda: all(info(r)["write_leader"] == leader
                                     for r in fleet.proxies.values()),
                         timeout=15, what=f"both proxies routing to {leader}")
                n_before = [len(w.acked) for w in writers]
                wait_for(lambda: all(len(w.acked) > n + 3 for w, n in zip(writers, n_before)),
                         timeout=15, what="writes through both proxies again")
        finally:
            for w in writers:
                w.finish()
        watch.check()
        assert_no_acknowledged_write_lost(pg2 if promoted else pg1, table, writers)
        if not promoted:
            assert pg2.in_recovery()
    print(f"scenario time {time.monotonic() - started:.1f}s; switchover {op['state']} "
          f"({op['outcome']}); ctl said {out.strip()[:200]!r} {err.strip()[:200]!r}; proxy-b "
          f"resumed {resumed_b:.1f}s after the cut")
