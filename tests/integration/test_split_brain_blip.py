"""Two primaries at once, and the leader misses a probe (pgrelay-agent(8), Leader rules).

While an old primary still runs beside the leader (a split brain, or the old leader during a
planned switchover's leader_change_grace), one probe of the leader that fails is not a reason to
send writes to the other primary: that would split the writes between two timelines. The leader
stays until it is down (fall probes in a row); only a replica promoted since the leader last
answered takes over at its first good probe (test_failover.py).

The missed probe is made, not waited for: the agent's probe backend on the leader is stopped
(SIGSTOP) until the agent logs the probe as failed (health_timeout), then resumed; the next
probe reconnects and succeeds.
"""

import os
import signal

import pytest

from cluster import Cluster, admin, destroy_relay, show_info, start_ha_relay, wait_probe_rounds
from conftest import wait_for

AGENT = {"health_interval": "200ms", "fall": 2, "rise": 1, "health_timeout": "1s"}


@pytest.fixture
def cluster():
    c = Cluster.create(replicas=1)
    yield c
    c.destroy()


@pytest.fixture
def relay(cluster):
    r = start_ha_relay(cluster, agent=AGENT, workers=1, no_leader_wait="0")
    yield r
    destroy_relay(r)


def probe_backend(node):
    """The pid of the agent's probe session on ``node``."""
    rows = node.query("SELECT pid FROM pg_stat_activity WHERE application_name = 'pgrelay-agent'")
    assert len(rows) == 1, rows
    return rows[0][0]


def miss_one_probe(relay, node):
    """Stop the agent's probe backend on ``node`` until the agent logs a failed probe."""
    offset = len(relay.log())
    pid = probe_backend(node)
    os.kill(pid, signal.SIGSTOP)
    try:
        wait_for(lambda: f"node {node.name}: probe failed" in relay.log()[offset:], timeout=10,
                 interval=0.02, what=f"a probe of {node.name} to fail")
    finally:
        os.kill(pid, signal.SIGCONT)
    return offset


def test_a_set_leader_that_misses_one_probe_keeps_the_writes_while_the_old_primary_runs(
        cluster, relay):
    pg1, pg2 = cluster.nodes
    pg2.promote()
    wait_for(lambda: "SPLIT BRAIN" in relay.log(), timeout=10, what="the split brain logged")
    out = admin(relay, "set leader pg2")
    assert not out.startswith("error"), out
    wait_probe_rounds(relay, 2)
    epoch = show_info(relay)["epoch"]
    assert show_info(relay)["write_leader"] == "pg2"

    offset = miss_one_probe(relay, pg2)
    wait_probe_rounds(relay, 3)  # good probes again; the agent decided after each
    changes = [ln for ln in relay.log()[offset:].splitlines() if "write leader:" in ln]
    assert not changes, changes
    assert (show_info(relay)["write_leader"], show_info(relay)["epoch"]) == ("pg2", epoch)
    with relay.connect() as c:
        assert c.execute("SHOW cluster_name").fetchone()[0] == "pg2"

    # down for good (fall probes): then the other primary takes the writes
    pg2.stop("immediate")
    wait_for(lambda: show_info(relay)["write_leader"] == "pg1", timeout=10, interval=0.05,
             what="pg1 to take the writes once pg2 is down")
    assert show_info(relay)["epoch"] == epoch + 1


def test_a_leader_that_misses_one_probe_beside_a_second_primary_stays(cluster, relay):
    pg1, pg2 = cluster.nodes
    pg2.promote()
    wait_for(lambda: "SPLIT BRAIN" in relay.log(), timeout=10, what="the split brain logged")
    epoch = show_info(relay)["epoch"]
    offset = miss_one_probe(relay, pg1)
    wait_probe_rounds(relay, 3)
    changes = [ln for ln in relay.log()[offset:].splitlines() if "write leader:" in ln]
    assert not changes, changes
    assert (show_info(relay)["write_leader"], show_info(relay)["epoch"]) == ("pg1", epoch)
