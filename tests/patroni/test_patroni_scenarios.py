"""pgrelay in front of a real Patroni 3.0 cluster with etcd (issue 11, Deliver 2 and 3), side by
side with HAProxy checking Patroni's GET /primary, under a write load through each and a reader
through each read port, while Patroni moves the leader. Two pgrelays run: ``pgrelay`` with the
agent's probes alone (ha_source = none, the default) and ``pgrelay_ha`` with ha_source =
patroni (the agent also asks the members' REST API whom Patroni names leader).

Invariants, checked for both pgrelays in every scenario (but ha_source = none when the leader's
Patroni is killed, where the test asserts its documented behaviour; HAProxy's figures are
printed beside them):
  * every acknowledged write committed on the member etcd named leader at some instant
    between the server's clock just before the commit and the acknowledgement, or is in that
    member's hand-over tail: acknowledged within HANDOVER_S after etcd could last have named
    it (Patroni demotes a leader that lost its key at its next HA loop; until then PostgreSQL
    itself commits there: HAProxy lands writes there too), and before the proxy wrote on any
    other member since (coming back to it is never a tail);
  * every acknowledged write is on the final leader, unless the timeline it was written on
    was left before it by the final leader's history (Patroni promoted a replica that had
    not received it: counted and printed as "discarded", not a failure);
  * every error a client got carries a SQLSTATE (an ErrorResponse, never a bare close);
  * the read port keeps serving: no stretch without a read longer than READ_OUTAGE_MAX
    while a replica that the scenario does not touch is streaming.

Each scenario prints one line per proxy: ``[patroni] SCENARIO PROXY {figures}``; with
PATRONI_FIGURES=FILE set they are appended to FILE as JSON lines too.
"""

import contextlib
import json
import os
import signal
import time

import pytest

from cluster import show_nodes
from conftest import admin, wait_for
from patroni_cluster import LOOP_WAIT, PROXIES, SCOPE, TTL
from recorder import (
    HANDOVER_S,
    LeaderPoller,
    ReadLoad,
    WriteLoad,
    carries_sqlstate,
    StreamingPoller,
    figures,
    gaps,
    missing_writes,
    read_final_leader,
    wrong_node_writes,
)

pytestmark = pytest.mark.deadline(240)

# The longest stretch without a read through pgrelay's read port while a replica streamed from
# the leader all along: the agent sees it fit after a probe or two (200 ms apart), the reader
# opens a new session, scheduling on a loaded machine (two cores for etcd, three Patroni
# members, HAProxy and the test's ten threads: 1.5 s held on a quiet one).
READ_OUTAGE_MAX = 3.0


# How long the SIGSTOP of the postmaster alone lasts.
HANG_S = 8

# What ha_source = none (the default) does when the leader's Patroni is killed: the old leader's
# PostgreSQL stays a primary after etcd named another member, the agent sees two primaries and
# keeps the current leader (its split-brain rule), so pgrelay goes on acknowledging writes on a
# member etcd no longer names; pg_rewind discards them when that member's Patroni comes back.
# ha_source = patroni is the remedy; the test asserts both, so that the man page's account of
# the default stays true.
KILL9_PATRONI_NONE = ("ha_source = none keeps writing to the old primary that etcd no longer "
                      "names until its Patroni is back")


class Run:
    """One scenario's loads through both proxies, and its checks."""

    def __init__(self, stack, name):
        self.stack = stack
        self.name = name
        stack.reset()
        self.table = f"w_{name}"
        # On whoever etcd names leader and answers as a primary when the table is made (the
        # leader reset() saw may lose its key under load before this runs).
        self.leader = wait_for(lambda: stack.run_on_leader(
            f"DROP TABLE IF EXISTS {self.table}; "
            f"CREATE TABLE {self.table} (src text, thread int, seq int, "
            "PRIMARY KEY (src, thread, seq))"), timeout=60, interval=0.2,
            what="a leader in etcd that answers as a primary, to make the table on")
        self.ports = {m.pg_port: m.name for m in stack.members.values()}
        # pgrelay has caught up with the reset too: the leader is its write leader and both
        # replicas are readable (else a read session that fell back to the leader is moved
        # during the scenario, which is pgrelay's rule, not the scenario's effect).
        wait_for(lambda: self._relay_settled(), timeout=60, interval=0.2,
                 what=f"pgrelay to route writes to {self.leader} and reads to both replicas")
        self.poller = LeaderPoller(stack).start()
        self.streaming = StreamingPoller(stack).start()
        self.writes = {src: WriteLoad(src, stack.proxy_ports(src)[0], self.table)
                       for src in PROXIES}
        self.reads = {src: ReadLoad(src, stack.proxy_ports(src)[1]) for src in PROXIES}
        for load in [*self.writes.values(), *self.reads.values()]:
            load.start()
        wait_for(lambda: all(len(w.acks) >= 10 for w in self.writes.values()),
                 timeout=30, what="writes through every proxy before the scenario")
        self.start = time.time()

    def _relay_settled(self):
        for relay in (self.stack.relay, self.stack.relay_ha):
            nodes = show_nodes(relay)
            if not (nodes[self.leader]["leader"]
                    and all(nodes[n]["readable"] for n in nodes if n != self.leader)):
                return False
        return True

    def member_port(self, name):
        return self.stack.member(name).pg_port

    def wait_writes_on(self, member, after, timeout=90, proxies=PROXIES):
        """Every proxy acknowledges writes on ``member`` (None: whoever etcd names leader)
        after ``after``; returns the member."""
        def done():
            name = member or self.stack.leader()
            if name not in self.stack.members:
                return None
            port = self.member_port(name)
            ok = all(any(a["acked"] > after and a["port"] == port for a in self.writes[p].acks[-50:])
                     for p in proxies)
            return name if ok else None
        return wait_for(done, timeout=timeout, interval=0.1,
                        what=f"writes on {member or 'the etcd leader'} through {', '.join(proxies)}")

    def finish(self, unchecked=()):
        """Stop the loads, print the figures, check the invariants for both pgrelays (but those
        in ``unchecked``: a behaviour the scenario's test asserts itself)."""
        end = time.time()
        for load in [*self.writes.values(), *self.reads.values()]:
            load.stop()
        self.poller.stop()
        self.streaming.stop()
        # The final leader: named by etcd before and after the read and a primary in the
        # read's own session (Patroni may restart or demote a member at any moment; a refused
        # connection is waited out, never taken as evidence).
        final = wait_for(lambda: read_final_leader(self.stack, self.table), timeout=60,
                         interval=0.2, what="a leader in etcd that answers as a primary")
        figs = {}
        for src in PROXIES:
            f = figures(self.writes[src], self.reads[src], self.poller, self.ports, self.start,
                        end)
            lost, discarded = missing_writes([self.writes[src]], final)
            f.update(lost_writes=len(lost), discarded_by_patroni=len(discarded))
            figs[src] = (f, lost)
            print(f"[patroni] {self.name} {src} {json.dumps(f)}")
            path = os.environ.get("PATRONI_FIGURES")
            if path:
                with open(path, "a") as out:
                    out.write(json.dumps(dict(f, scenario=self.name, proxy=src)) + "\n")
        print(f"[patroni] {self.name} etcd leader changes: "
              + ", ".join(f"{t - self.start:+.2f}s {who}" for t, who in self.poller.changes()))
        for src in PROXIES:
            bare = [e for e in self.writes[src].errors if not carries_sqlstate(e)]
            if bare:
                print(f"[patroni] {self.name} {src} first errors without a SQLSTATE: {bare[:3]}")
        # What an operator sees on pgrelay's console after the scenario.
        for src, relay in (("pgrelay", self.stack.relay), ("pgrelay_ha", self.stack.relay_ha)):
            print(f"[patroni] {self.name} {src} show nodes:\n{admin(relay, 'show nodes')}")
            history = admin(relay, "show leader history").splitlines()
            print(f"[patroni] {self.name} {src} show leader history (newest first):\n"
                  + "\n".join(history[:8]))
        assert any(streaming for _, streaming in self.streaming.samples), \
            "no sample saw a replica streaming: the read port's check would be vacuous"
        for src in ("pgrelay", "pgrelay_ha"):
            if src not in unchecked:
                self._check(src, figs[src][1], final, end)
        return {src: f for src, (f, _) in figs.items()}

    def _check(self, src, lost, final, end):
        """The invariants, for one pgrelay."""
        load = self.writes[src]
        wrong = wrong_node_writes(load, self.poller, self.ports, HANDOVER_S)
        assert not wrong, (f"{src} acknowledged writes from a member etcd did not name, past "
                           f"its hand-over: {wrong[:5]}")
        assert not lost, f"acknowledged writes through {src} missing on {final.name}: {lost[:5]}"
        # A backend whose postmaster was killed exits mid-statement without a word: pgrelay
        # sends 08006 then (kill -9 of the postmaster), where a direct connection sees a bare
        # close.
        bare = [e for e in load.errors + self.reads[src].errors if not carries_sqlstate(e)]
        assert not bare, f"{src} errors without a SQLSTATE: {bare[:5]}"
        # The read port is dark only while no replica streams from the leader: no stretch
        # without a read holds a stretch longer than READ_OUTAGE_MAX in which one streamed.
        for a, b in gaps([t for t, _ in self.reads[src].oks], self.start, end):
            streamed = self.streaming.longest_streaming(a, b)
            assert streamed <= READ_OUTAGE_MAX, (
                f"{src}'s read port served nothing for {b - a:.2f}s, {streamed:.2f}s of them "
                f"with a replica streaming; errors: {self.reads[src].errors[:5]}")


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
    run.finish()


def test_patronictl_failover_to_a_named_member(stack):
    """patronictl failover --candidate: the leader is demoted at once (no checkpoint wait);
    writes follow to the named member."""
    run = Run(stack, "failover")
    candidate = other_members(stack, run.leader)[1]
    before = time.time()
    stack.patronictl("failover", "--candidate", candidate, "--force")
    run.wait_writes_on(candidate, before)
    run.finish()


def test_kill_9_of_the_leaders_postmaster(stack):
    """The leader's postmaster is killed with SIGKILL (its backends end when they notice):
    Patroni, still holding the leader key, starts PostgreSQL again after crash recovery;
    writes come back on the same member."""
    run = Run(stack, "kill9_postmaster")
    member = stack.member(run.leader)
    old = member.postmaster_pid()
    os.kill(old, signal.SIGKILL)
    wait_for(lambda: member.postmaster_pid() not in (None, old), timeout=60, interval=0.1,
             what=f"Patroni to start {run.leader}'s PostgreSQL again")
    run.wait_writes_on(run.leader, time.time())
    run.finish()


def test_patronictl_restart_of_the_leader(stack):
    """patronictl restart of the leader: PostgreSQL is stopped and started by Patroni, which
    keeps the leader key; writes pause and come back on the same member."""
    run = Run(stack, "restart")
    before = time.time()
    stack.patronictl("restart", "--force", SCOPE, run.leader)
    run.wait_writes_on(run.leader, before)
    run.finish()


def test_patronictl_pause_and_resume(stack):
    """Maintenance mode of Patroni (pause, resume) changes nothing PostgreSQL does: no write
    fails and no read fails through pgrelay."""
    run = Run(stack, "pause_resume")
    stack.patronictl("pause", "--wait", SCOPE)
    paused_at = time.time()
    wait_for(lambda: (stack.cluster_view() or {}).get("pause"), timeout=30,
             what="Patroni to say it is paused")
    run.wait_writes_on(run.leader, paused_at + LOOP_WAIT)
    stack.patronictl("resume", "--wait", SCOPE)
    run.wait_writes_on(run.leader, time.time())
    figs = run.finish()
    for src in ("pgrelay", "pgrelay_ha"):
        assert figs[src]["failed_ops"] == 0, run.writes[src].errors[:5]
        assert figs[src]["read_errors"] == 0, run.reads[src].errors[:5]


def test_sigstop_of_the_leaders_postmaster_alone(stack):
    """The leader's postmaster alone is stopped (its backends and Patroni go on, so Patroni
    keeps the leader key) for a while, then continued."""
    run = Run(stack, "sigstop_postmaster")
    pid = stack.member(run.leader).postmaster_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        stopped = time.time()
        wait_for(lambda: time.time() - stopped >= HANG_S, timeout=HANG_S + 5, interval=0.2,
                 what="the hang to last")
    finally:
        os.kill(pid, signal.SIGCONT)
    run.wait_writes_on(None, time.time())
    run.finish()


def test_sigstop_of_every_leader_process_longer_than_the_ttl(stack):
    """Patroni and every PostgreSQL process of the leader are stopped for longer than the TTL:
    etcd's leader key expires, a replica is promoted; when the old leader continues, no write
    in flight on it may be acknowledged (its sessions through pgrelay were closed)."""
    run = Run(stack, "sigstop_all")
    member = stack.member(run.leader)
    pids = member.stop_everything()
    try:
        new = wait_for(lambda: stack.leader() not in (None, run.leader) and stack.leader(),
                       timeout=TTL + 30, interval=0.2, what="etcd to name another leader")
        run.wait_writes_on(new, time.time())
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    run.wait_writes_on(None, time.time())
    run.finish()


def test_kill_9_of_the_leaders_patroni(stack):
    """The leader's Patroni is killed with SIGKILL, its PostgreSQL goes on as a primary: after
    the TTL etcd names another member, which Patroni promotes. Until the old leader's Patroni
    is started again (and demotes its PostgreSQL), two primaries answer. pgrelay with
    ha_source = patroni leaves the old leader when Patroni stops naming it and writes on the
    promoted member once a probe sees it primary: every invariant holds. pgrelay with
    ha_source = none keeps the old leader (KILL9_PATRONI_NONE)."""
    run = Run(stack, "kill9_patroni")
    member = stack.member(run.leader)
    os.kill(member.patroni_pid(), signal.SIGKILL)
    member.proc.wait(10)
    new = wait_for(lambda: stack.leader() not in (None, run.leader) and stack.leader(),
                   timeout=TTL + 30, interval=0.2, what="etcd to name another leader")
    promoted = stack.member(new)
    wait_for(promoted.is_primary, timeout=30,
             what=f"{new} to be promoted")
    port = promoted.pg_port
    after = time.time()
    for src in ("haproxy", "pgrelay_ha"):
        wait_for(lambda: any(a["acked"] > after and a["port"] == port
                             for a in run.writes[src].acks[-50:]),
                 timeout=30, what=f"{src} to write on {new} while the old leader is a primary")
    member.start()  # Patroni comes back, finds another leader and demotes its PostgreSQL
    run.wait_writes_on(new, time.time())
    figs = run.finish(unchecked=("pgrelay",))
    assert figs["pgrelay"]["wrong_node_writes"] > 0, KILL9_PATRONI_NONE
