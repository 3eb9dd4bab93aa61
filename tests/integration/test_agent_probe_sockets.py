"""pgrelay-agent's probe connections when nodes go away or misbehave: the agent stays idle (a
few percent of one core at most, never a loop on a socket or a timer) and goes on probing, so
that `show nodes` reports the node down and, when it answers again, up.

The nodes are NodeStub servers (nodestub.py: a node that hangs, answers a FATAL, sends garbage
or closes at will) and, for the destroy modes, a real PostgreSQL cluster (cluster.py)."""

import os
import shutil
import signal
import time

import pytest

from cluster import Cluster, start_ha_relay, stop_relay, wait_probe_rounds
from conftest import admin_json, start_relay, wait_for
from nodestub import NodeStub

IDLE_SHARE = 0.10  # of one core: the most an agent probing a few nodes may use
MEASURE_SECONDS = 3.0

AGENT = {
    "health_interval": "100ms",
    "health_timeout": "1s",
    "fall": "1",
    "rise": "1",
    "monitor_user": "postgres",
}


def cpu_seconds(pid):
    """user + system CPU time of a process so far (/proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def process_state(pid):
    """R, S, T (stopped)... from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def cpu_share(pid, seconds=MEASURE_SECONDS):
    """The share of one core the process used over the next ``seconds``."""
    used, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)  # a measurement window, not synchronisation
    return (cpu_seconds(pid) - used) / (time.monotonic() - start)


def assert_idle(relay, what):
    pid = relay.agent_pid()
    assert pid, "pgrelay-agent is not running"
    share = cpu_share(pid)
    assert share < IDLE_SHARE, (
        f"pgrelay-agent used {share:.0%} of a core over {MEASURE_SECONDS:.0f} s {what}")


def nodes(relay):
    return {n["name"]: n for n in admin_json(relay, "show nodes")}


def wait_health(relay, health, what, timeout=15):
    wait_for(lambda: all(n["health"] == health for n in nodes(relay).values()),
             timeout=timeout, what=f"every node {health} {what}")


def stub_relay(stubs, **agent):
    node_list = [(f"n{i}", {"host": "127.0.0.1", "port": s.port,
                            "role": "primary" if i == 0 else "replica"})
                 for i, s in enumerate(stubs)]
    return start_relay(None, nodes=node_list, sections={"agent": {**AGENT, **agent}})


@pytest.fixture
def stubs():
    made = []

    def make(count):
        new = [NodeStub("primary") for _ in range(count)]
        made.extend(new)
        return new

    yield make
    for s in made:
        s.close()


@pytest.mark.parametrize("mode", ["fatal", "garbage", "close", "silent"])
def test_node_turning_bad_under_an_idle_monitoring_connection(stubs, mode):
    """The agent holds an idle monitoring connection to each node between probes; the nodes
    close them and from then on answer as ``mode`` says."""
    nodes_ = stubs(2)
    relay = stub_relay(nodes_)
    try:
        wait_health(relay, "up", "before the fault")
        for s in nodes_:
            s.mode = mode
            s.drop()
        wait_health(relay, "down", f"once the nodes went {mode}")
        assert all(n["last_error"] for n in nodes(relay).values())
        assert_idle(relay, f"while the nodes are {mode}")
        for s in nodes_:
            s.mode = "primary"
        wait_health(relay, "up", "once the nodes answer again")
    finally:
        relay.stop()


def test_reload_with_probe_events_pending_in_the_same_loop_turn(stubs):
    """A reload that reaches the agent in the same turn of its event loop as the sockets of
    probes in flight (the agent was stopped meanwhile: SIGSTOP, the master reloads, the hanging
    nodes close their connections, SIGCONT). The agent takes those probes' events off its loop
    before it rebuilds its node list. It once deleted them through copies of the nodes, which
    left an event linked in libevent's active queue: the agent then ran that probe's callback
    forever (epoll_ctl DEL/ADD on its socket, 60-100% of a core), probed no node again and
    ignored SIGINT."""
    nodes_ = stubs(6)
    hanging = nodes_[1:]
    relay = stub_relay(nodes_, health_timeout="2s")
    try:
        wait_health(relay, "up", "before the fault")
        for s in hanging:
            s.mode = "silent"
            s.drop()
        accepted = [s.accepted for s in hanging]
        wait_for(lambda: all(s.accepted > a for s, a in zip(hanging, accepted)),
                 what="a probe of every hanging node waiting for its answer")
        agent = relay.agent_pid()
        reloads = relay.log().count("reloaded")
        os.kill(agent, signal.SIGSTOP)
        try:
            wait_for(lambda: process_state(agent) == "T", what="pgrelay-agent stopped")
            relay.signal(signal.SIGHUP)
            wait_for(lambda: relay.log().count("reloaded") > reloads,
                     what="the master's reload")
            for s in hanging:
                s.drop()
        finally:
            os.kill(agent, signal.SIGCONT)
        wait_for(lambda: "configuration reloaded" in relay.log(), what="the agent's reload")
        assert_idle(relay, "after a reload with probe events pending")
        wait_for(lambda: all(n["health"] == ("up" if n["name"] == "n0" else "down")
                             for n in nodes(relay).values()),
                 what="the hanging nodes down (their probes time out), n0 up")
        for s in hanging:
            s.mode = "primary"
        wait_health(relay, "up", "once every node answers again (the agent still probes)")
    finally:
        relay.stop()


def test_reload_while_a_healthy_node_is_answering_a_probe(stubs):
    """SIGHUP while the probe query of a slow but healthy node is out: the next probe must
    not fail for it. It once reused the monitoring connection with that query still in
    flight, failed ("another command is already in progress") and, with fall = 1, reported
    the node down."""
    (node,) = stubs(1)
    node.mode = "slow"
    relay = stub_relay([node], health_timeout="3s")
    try:
        wait_health(relay, "up", "before the reloads")
        for round_ in range(5):
            queries = node.queries
            wait_for(lambda: node.queries > queries, what="a probe query out to the node")
            reloads = relay.log().count("configuration reloaded")
            relay.signal(signal.SIGHUP)
            wait_for(lambda: relay.log().count("configuration reloaded") > reloads,
                     what=f"the agent's reload {round_ + 1}")
        wait_probe_rounds(relay, rounds=2)
        assert "probe failed" not in relay.log()
        assert nodes(relay)["n0"]["health"] == "up"
    finally:
        relay.stop()


def postmaster_pid(node):
    with open(os.path.join(node.pgdata, "postmaster.pid")) as f:
        return int(f.readline())


@pytest.mark.parametrize("how", ["destroyed", "stopped_then_killed"])
def test_cluster_destroyed_under_the_agent(how):
    """The whole cluster goes while the agent probes it: "destroyed" as Cluster.destroy does
    (pg_ctl stop -m immediate, data directories removed), "stopped_then_killed" as a hung
    machine (SIGSTOP of every postmaster past health_timeout, then kill -9)."""
    cluster = Cluster.create(replicas=1)
    relay = None
    try:
        relay = start_ha_relay(cluster, agent=AGENT)
        if how == "destroyed":
            for node in cluster.nodes:
                node.stop("immediate")
                shutil.rmtree(node.pgdata)
        else:
            pids = [postmaster_pid(node) for node in cluster.nodes]
            for pid in pids:
                os.kill(pid, signal.SIGSTOP)
            wait_health(relay, "down", "while their postmasters are stopped")
            for pid in pids:
                os.kill(pid, signal.SIGKILL)
        wait_health(relay, "down", f"once the cluster was {how}")
        assert_idle(relay, f"once the cluster was {how}")
        wait_probe_rounds(relay)  # and it goes on probing
    finally:
        if relay:
            stop_relay(relay)
        cluster.destroy()
