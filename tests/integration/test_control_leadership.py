"""pgrelay-control: coordinated leadership from the proxies' node observations.

Every test gets its own store (a fresh database in the session's PostgreSQL 15) and its own
bin/pgrelay-control (or $PGRELAY_CONTROL_BIN, e.g. the AddressSanitizer build) started from a
generated control.ini; agents are simulated with Python HTTP clients (SimAgent) that register,
upload metrics and long-poll for commands in a thread, answering each command as the test's
policy says (control_helpers.py). What is asserted is what agents, operators and pgrelayctl
rely on:

  * the leader is decided by the majority of live proxies (seeded from the majority primary
    when agents disagree), a new leader answers the parked polls at once, epochs only grow
    and leadership survives a restart; an epoch an agent holds for another leader is passed.
"""

from conftest import wait_for
from control_helpers import (  # noqa: F401,F811 (fixtures used by name)
    API,
    Background,
    SimAgent,
    TOKENS,
    agents,
    control,
    control_factory,
    obs,
    store,
    store_rows,
)


# --------------------------------------------------------------------------- #
# coordinated leadership
# --------------------------------------------------------------------------- #


def test_leader_is_decided_by_the_majority_of_live_proxies(control, agents, store):
    a, b, c = (agents(control, n, poll=False) for n in ("proxy-a", "proxy-b", "proxy-c"))
    healthy = [obs("pg1", lsn=10), obs("pg2", in_recovery=True)]
    # seeded from the agents' own agreement, at their epoch
    for agent in (a, b, c):
        answer = agent.metrics(epoch=2, leader="pg1", nodes=healthy)
    assert answer == {"leader": "pg1", "epoch": 2}
    # one proxy alone losing pg1 changes nothing
    split = [obs("pg1", up=False), obs("pg2")]
    assert a.metrics(epoch=2, leader="pg1", nodes=split) == {"leader": "pg1", "epoch": 2}
    # a majority seeing pg2 as the primary moves the leader, with a new epoch
    assert b.metrics(epoch=2, leader="pg1", nodes=split) == {"leader": "pg2", "epoch": 3}
    assert c.metrics(epoch=2, leader="pg1", nodes=healthy) == {"leader": "pg2", "epoch": 3}
    assert store_rows(store, "SELECT leader, epoch FROM pgrelay.leadership"
                             " WHERE deployment = 'prod'") == [("pg2", 3)]
    # epochs never go down, and an agent's higher epoch is caught up with
    assert a.metrics(epoch=1, leader="pg2", nodes=split)["epoch"] == 3
    assert a.metrics(epoch=9, leader="pg2", nodes=split) == {"leader": "pg2", "epoch": 9}
    status, deps = control.admin("GET", "/deployments")
    [prod] = [d for d in deps if d["name"] == "prod"]
    assert prod["leader"] == "pg2" and prod["epoch"] == 9


def test_a_new_leader_answers_the_parked_polls_at_once(control, agents):
    """Agents learn a decision from their parked long poll, not at their next metrics call."""
    a, b, c = (agents(control, n, poll=False) for n in ("proxy-a", "proxy-b", "proxy-c"))
    healthy = [obs("pg1", lsn=10), obs("pg2", in_recovery=True)]
    for agent in (a, b, c):
        agent.metrics(epoch=2, leader="pg1", nodes=healthy)
    polls = {agent.node_id: Background(control.port, "GET",
                                       API + f"/agent/commands?node_id={agent.node_id}&wait_s=30",
                                       token=TOKENS["prod"], timeout=40)
             for agent in (a, c)}
    wait_for(lambda: control.polling("proxy-a") and control.polling("proxy-c"),
             what="both polls to be parked (they would wait 30 s)")
    assert not any(p.done() for p in polls.values()), "a poll was answered before any change"
    split = [obs("pg1", up=False), obs("pg2")]
    a.metrics(epoch=2, leader="pg1", nodes=split)
    assert b.metrics(epoch=2, leader="pg1", nodes=split) == {"leader": "pg2", "epoch": 3}
    for node_id, poll in polls.items():
        status, body = poll.result(timeout=5)  # not after its 30 s
        assert status == 200 and body == {"commands": [], "leader": "pg2", "epoch": 3}, node_id


def test_leader_is_seeded_from_the_majority_primary_when_agents_disagree(control, agents):
    a, b = agents(control, "proxy-a", poll=False), agents(control, "proxy-b", poll=False)
    nodes = [obs("pg1", in_recovery=True), obs("pg2")]
    # one of two declared proxies is no majority: no leader yet
    assert a.metrics(epoch=4, leader="pg1", nodes=nodes) == {"leader": None, "epoch": 0}
    assert b.metrics(epoch=4, leader="pg2", nodes=nodes) == {"leader": "pg2", "epoch": 5}


def test_leadership_survives_a_restart(control_factory):
    c1 = control_factory()
    a = SimAgent(c1, "proxy-a")
    a.register()
    a.metrics(epoch=3, leader="pg1", nodes=[obs("pg1")])
    assert c1.stop() == 0
    c2 = control_factory()
    a.control = c2
    assert a.metrics(nodes=[obs("pg1")]) == {"leader": "pg1", "epoch": 3}


# --------------------------------------------------------------------------- #
# one epoch names one leader, also across agents that decided alone
# --------------------------------------------------------------------------- #
# An agent that decides alone (control_lost = decide_alone, or before the control plane first
# answers) raises its own epoch; an agent refuses a control-plane leader that its own epoch
# names otherwise ("deciding alone until it moves on", agent/leader.c). So when an agent comes
# back holding the deployment's epoch for another leader, or two agents hold one epoch for two
# leaders, the control plane must announce its leader under a higher epoch, or that agent
# never follows it again.


def three_nodes(primary):
    return [obs(n, in_recovery=(n != primary), lsn=10) for n in ("pg1", "pg2", "pg3")]


def test_an_agent_holding_the_current_epoch_for_another_leader_gets_a_higher_one(control, agents,
                                                                                  store):
    a, b, c = (agents(control, n, poll=False) for n in ("proxy-a", "proxy-b", "proxy-c"))
    for agent in (a, b, c):
        answer = agent.metrics(epoch=2, leader="pg1", nodes=three_nodes("pg1"))
    assert answer == {"leader": "pg1", "epoch": 2}
    # pg1 fails; a and b (a majority) see pg2 promoted: the deployment moves to pg2, epoch 3
    failed = [obs("pg1", up=False), obs("pg2"), obs("pg3", in_recovery=True)]
    a.metrics(epoch=2, leader="pg1", nodes=failed)
    assert b.metrics(epoch=2, leader="pg1", nodes=failed) == {"leader": "pg2", "epoch": 3}
    # c, cut off from the control plane, decided alone: it chose pg3 under its own epoch 3
    answer = c.metrics(epoch=3, leader="pg3", nodes=failed)
    assert answer["leader"] == "pg2" and answer["epoch"] > 3, answer
    assert store_rows(store, "SELECT leader, epoch FROM pgrelay.leadership"
                             " WHERE deployment = 'prod'") == [("pg2", answer["epoch"])]
    # the others get the same word
    assert a.metrics(epoch=3, leader="pg2", nodes=failed) == answer


def test_two_agents_holding_one_epoch_for_two_leaders_get_a_higher_one(control, agents):
    a, b, c = (agents(control, n, poll=False) for n in ("proxy-a", "proxy-b", "proxy-c"))
    for agent in (a, b, c):
        answer = agent.metrics(epoch=2, leader="pg1", nodes=three_nodes("pg1"))
    assert answer == {"leader": "pg1", "epoch": 2}
    # a and b each decided alone up to epoch 5, for different leaders; the deployment keeps
    # pg1 (every proxy still sees it as the primary) and must not reuse 5 for it
    a.metrics(epoch=5, leader="pg1", nodes=three_nodes("pg1"))
    answer = b.metrics(epoch=5, leader="pg2", nodes=three_nodes("pg1"))
    assert answer["leader"] == "pg1" and answer["epoch"] > 5, answer
    # and in the other order of reports too
    a.metrics(epoch=9, leader="pg2", nodes=three_nodes("pg1"))
    answer = b.metrics(epoch=9, leader="pg1", nodes=three_nodes("pg1"))
    assert answer["leader"] == "pg1" and answer["epoch"] > 9, answer


def test_an_agent_raising_the_epoch_for_the_same_leader_is_caught_up_with_exactly(control,
                                                                                  agents):
    a, b, c = (agents(control, n, poll=False) for n in ("proxy-a", "proxy-b", "proxy-c"))
    for agent in (a, b, c):
        agent.metrics(epoch=2, leader="pg1", nodes=three_nodes("pg1"))
    assert c.metrics(epoch=7, leader="pg1", nodes=three_nodes("pg1")) == {"leader": "pg1",
                                                                         "epoch": 7}


def test_a_primary_patroni_does_not_name_is_not_counted_as_a_primary(control, agents):
    """ha_source = patroni: a dead Patroni leaves its PostgreSQL running as a second primary
    after another member was promoted. Without Patroni's word the split brain keeps the old
    leader; with it (the agents report pg1 "not_leader"), the quorum sees only pg2 and the
    leader moves there."""
    a, b, c = (agents(control, n, poll=False) for n in ("proxy-a", "proxy-b", "proxy-c"))
    for agent in (a, b, c):
        answer = agent.metrics(epoch=2, leader="pg1", nodes=three_nodes("pg1"))
    assert answer == {"leader": "pg1", "epoch": 2}
    two_primaries = [obs("pg1"), obs("pg2"), obs("pg3", in_recovery=True)]
    for agent in (a, b, c):
        answer = agent.metrics(epoch=2, leader="pg1", nodes=two_primaries)
    assert answer == {"leader": "pg1", "epoch": 2}  # a split brain decides nothing
    patroni = [obs("pg1", patroni="not_leader"), obs("pg2", patroni="leader"),
               obs("pg3", in_recovery=True, patroni="not_leader")]
    a.metrics(epoch=2, leader=None, nodes=patroni)
    answer = b.metrics(epoch=2, leader=None, nodes=patroni)
    assert answer == {"leader": "pg2", "epoch": 3}
    # Patroni's word is checked like every other field
    status, body = a.post("/metrics", {"ts_ms": 1, "nodes": [obs("pg1", patroni="maybe")]})
    assert status == 400 and "nodes[0].patroni" in body["error"], (status, body)
