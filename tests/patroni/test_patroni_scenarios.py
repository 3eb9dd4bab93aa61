"""pgrelay in front of a real Patroni 3.0 cluster with etcd (issue 11, Deliver 2), side by side
with HAProxy checking Patroni's GET /primary, under a write load through each and a reader
through each read port, while Patroni moves the leader.

Invariants, checked for pgrelay in every scenario (HAProxy's figures are printed beside them):
  * every acknowledged write committed on the member etcd named leader at some instant
    between the server's clock just before the commit and the acknowledgement;
  * every acknowledged write is on the final leader, unless the timeline it was written on
    was left before it by the final leader's history (Patroni promoted a replica that had
    not received it: counted and printed as "discarded", not a failure);
  * every error a client got carries a SQLSTATE (an ErrorResponse, never a bare close);
  * the read port keeps serving: no stretch without a read longer than READ_OUTAGE_MAX
    while a replica that the scenario does not touch is streaming.

Each scenario prints one line per proxy: ``[patroni] SCENARIO PROXY {figures}``; with
PATRONI_FIGURES=FILE set they are appended to FILE as JSON lines too.
"""

import json
import os
import time

import pytest

from conftest import wait_for
from recorder import (
    LeaderPoller,
    ReadLoad,
    WriteLoad,
    carries_sqlstate,
    figures,
    missing_writes,
    outage,
    wrong_node_writes,
)

pytestmark = pytest.mark.deadline(240)

# The read port's longest stretch without a read while an untouched replica streams: the
# agent's probe interval and fall (200 ms x 2), a reconnect and scheduling on a loaded machine.
READ_OUTAGE_MAX = 2.0


class Run:
    """One scenario's loads through both proxies, and its checks."""

    def __init__(self, stack, name):
        self.stack = stack
        self.name = name
        self.leader = stack.reset()
        self.table = f"w_{name}"
        stack.member(self.leader).query(
            f"DROP TABLE IF EXISTS {self.table}; "
            f"CREATE TABLE {self.table} (src text, thread int, seq int, "
            "PRIMARY KEY (src, thread, seq))")
        self.ports = {m.pg_port: m.name for m in stack.members.values()}
        self.poller = LeaderPoller(stack).start()
        relay, hap = stack.relay, stack.haproxy
        self.writes = {"pgrelay": WriteLoad("pgrelay", relay.port, self.table),
                       "haproxy": WriteLoad("haproxy", hap.port, self.table)}
        self.reads = {"pgrelay": ReadLoad("pgrelay", relay.read_port),
                      "haproxy": ReadLoad("haproxy", hap.read_port)}
        for load in [*self.writes.values(), *self.reads.values()]:
            load.start()
        wait_for(lambda: all(len(w.acks) >= 10 for w in self.writes.values()),
                 timeout=30, what="writes through both proxies before the scenario")
        self.start = time.time()

    def member_port(self, name):
        return self.stack.member(name).pg_port

    def wait_writes_on(self, member, after, timeout=90):
        """Both proxies acknowledge writes on ``member`` after ``after``."""
        port = self.member_port(member)
        wait_for(lambda: all(any(a["acked"] > after and a["port"] == port for a in w.acks[-50:])
                             for w in self.writes.values()),
                 timeout=timeout, interval=0.1,
                 what=f"writes on {member} through pgrelay and HAProxy")

    def finish(self, touched=()):
        """Stop the loads, print the figures, check the invariants for pgrelay. ``touched``:
        members the scenario stopped, restarted or demoted (a read outage is allowed only
        when no other replica streamed)."""
        end = time.time()
        for load in [*self.writes.values(), *self.reads.values()]:
            load.stop()
        self.poller.stop()
        final = self.stack.wait_healthy(timeout=120)
        figs = {}
        for src in ("pgrelay", "haproxy"):
            f = figures(self.writes[src], self.reads[src], self.poller, self.ports, self.start,
                        end)
            lost, discarded = missing_writes([self.writes[src]], self.stack.member(final),
                                             self.table)
            f.update(lost_writes=len(lost), discarded_by_patroni=len(discarded))
            figs[src] = (f, lost)
            print(f"[patroni] {self.name} {src} {json.dumps(f)}")
            path = os.environ.get("PATRONI_FIGURES")
            if path:
                with open(path, "a") as out:
                    out.write(json.dumps(dict(f, scenario=self.name, proxy=src)) + "\n")
        print(f"[patroni] {self.name} etcd leader changes: "
              + ", ".join(f"{t - self.start:+.2f}s {who}" for t, who in self.poller.changes()))
        load = self.writes["pgrelay"]
        wrong = wrong_node_writes(load, self.poller, self.ports)
        assert not wrong, f"pgrelay acknowledged writes from a member etcd did not name: {wrong[:5]}"
        f, lost = figs["pgrelay"]
        assert not lost, f"acknowledged writes through pgrelay missing on {final}: {lost[:5]}"
        bare = [e for e in load.errors + self.reads["pgrelay"].errors if not carries_sqlstate(e)]
        assert not bare, f"pgrelay errors without a SQLSTATE: {bare[:5]}"
        untouched = set(self.ports.values()) - set(touched) - {self.leader}
        if untouched:
            read_gap = outage([t for t, _ in self.reads["pgrelay"].oks], self.start, end)
            assert read_gap <= READ_OUTAGE_MAX, (
                f"pgrelay's read port served nothing for {read_gap:.2f}s while "
                f"{sorted(untouched)} streamed; errors: {self.reads['pgrelay'].errors[:5]}")
        return figs


def other_members(stack, leader):
    return sorted(set(stack.members) - {leader})


def test_patronictl_switchover(stack):
    """A planned switchover: the leader's sessions end at their next safe point, writes go to
    the candidate as soon as it is a primary."""
    run = Run(stack, "switchover")
    candidate = other_members(stack, run.leader)[0]
    before = time.time()
    stack.patronictl("switchover", "--leader", run.leader, "--candidate", candidate, "--force")
    run.wait_writes_on(candidate, before)
    run.finish(touched=(candidate,))
