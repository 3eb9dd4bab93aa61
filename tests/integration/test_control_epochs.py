"""One epoch names one leader, also across agents that decided alone.

An agent that decides alone (control_lost = decide_alone, or before the control plane first
answers) raises its own epoch; an agent refuses a control-plane leader that its own epoch names
otherwise ("deciding alone until it moves on", agent/leader.c). So when an agent comes back
holding the deployment's epoch for another leader, or two agents hold the same epoch for two
leaders, the control plane must announce its leader under a higher epoch, or that agent never
follows it again.
"""

from test_control_api import agents, control, control_factory, obs, store, store_rows  # noqa: F401


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
