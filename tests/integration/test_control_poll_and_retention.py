"""docs/protocol.md promises about the command long poll, auto_register and retention that no
other test checks: a new poll from the same node ends the older one; a poll whose commands were
just delivered waits a second first (no spin); an auto_register token needs 8 characters;
telemetry older than telemetry_retention and commands older than command_retention are gone."""

import hashlib
import time

import psycopg

from conftest import SCHED_SLACK, wait_for
from test_control_api import (  # noqa: F401  (fixtures used by name)
    ADMIN,
    API,
    TOKENS,
    Background,
    SimAgent,
    control,
    control_factory,
    store,
    store_rows,
)


def _poll(control, node_id, wait_s):
    return Background(control.port, "GET", API + f"/agent/commands?node_id={node_id}&wait_s={wait_s}",
                      token=TOKENS["prod"], timeout=wait_s + 10)


def test_a_new_poll_from_the_same_node_ends_the_older_waiting_one(control):
    SimAgent(control, "proxy-a").register()
    SimAgent(control, "proxy-b").register()
    first, second = _poll(control, "proxy-a", 30), _poll(control, "proxy-a", 30)
    # Whichever the control plane took first is the older one: it ends, the newer waits.
    ended = wait_for(lambda: [p for p in (first, second) if p.done()], timeout=5,
                     what="one of the two polls to end")
    assert len(ended) == 1
    (old,) = ended
    (new,) = [p for p in (first, second) if p is not old]
    assert old.result() == (200, {"commands": [], "leader": None, "epoch": 0})
    assert old.elapsed < 5  # not at the end of its 30 s
    # A poll from another node does not end it; a third poll from the same node does.
    other = _poll(control, "proxy-b", 30)
    third = _poll(control, "proxy-a", 30)
    assert new.result(timeout=5)[1]["commands"] == []
    assert not other.done() and not third.done()
    # Let the last two go: a command for every proxy answers both at once.
    op = Background(control.port, "POST", API + "/deployments/prod/reload", {"timeout_s": 20},
                    token=ADMIN, timeout=30)
    for p, node in ((other, "proxy-b"), (third, "proxy-a")):
        status, body = p.result(timeout=10)
        [cmd] = body["commands"]
        assert status == 200 and cmd["type"] == "reload"
        SimAgent(control, node).ack(cmd["id"], True, "reloaded")
    assert op.result()[0] == 200


def test_a_poll_whose_commands_were_just_delivered_waits_a_second_first(control):
    agent = SimAgent(control, "proxy-a")
    agent.register()
    op = Background(control.port, "POST", API + "/deployments/prod/reload", {"timeout_s": 20},
                    token=ADMIN, timeout=30)
    [cmd] = wait_for(lambda: agent.poll(wait_s=0)[1]["commands"], timeout=10,
                     what="the reload command")
    # Still unacknowledged (the agent works on it) and polling again with a wait: the same
    # command again, but after a second, not at once (an agent looping here must not spin).
    t0 = time.monotonic()
    status, body = agent.poll(wait_s=10)
    took = time.monotonic() - t0
    assert status == 200 and body["commands"] == [cmd]
    assert 0.9 <= took < 1 + SCHED_SLACK, took
    # wait_s = 0 asks for no wait at all: at once
    t0 = time.monotonic()
    assert agent.poll(wait_s=0)[1]["commands"] == [cmd]
    assert time.monotonic() - t0 < SCHED_SLACK
    assert agent.ack(cmd["id"], True, "reloaded") == (204, "")
    assert op.result()[0] == 200


def test_auto_register_takes_a_token_of_8_printable_characters_not_7(control_factory):
    c = control_factory(control={"auto_register": "on"})
    for token, status in (("1234567", 401), ("12345678", 200), ("abc\x7fdefgh", 401)):
        got, answer = c.call("POST", API + "/agent/register", {"node_id": "n1"}, token=token)
        assert got == status, (token, got, answer)
    name = "auto-" + hashlib.sha256(b"12345678").hexdigest()[:12]
    assert set(c.proxies(name)) == {"n1"}
    status, deployments = c.admin("GET", "/deployments")
    assert status == 200
    names = [d["name"] if isinstance(d, dict) else d for d in deployments]
    assert [n for n in names if n.startswith("auto-")] == [name], names


def test_telemetry_older_than_telemetry_retention_is_gone(control_factory):
    c = control_factory(control={"telemetry_retention": "2s", "proxy_timeout": "30s"})
    agent = SimAgent(c, "proxy-a")
    agent.register()
    sent = time.monotonic()
    agent.metrics(clients=7, statements=70)
    agent.post("/queries", {"queries": [{"session": 1, "client": "127.0.0.1:1", "user": "u",
                                         "database": "d", "node": "pg1", "state": "active",
                                         "duration_ms": 5, "text": "SELECT $1"}]})

    def sample():
        status, rows = c.admin("GET", "/deployments/prod/metrics")
        assert status == 200, rows
        row = [r for r in rows if r["node_id"] == "proxy-a"]
        return row[0].get("sample") if row else None

    assert sample()["clients"] == 7
    status, queries = c.admin("GET", "/deployments/prod/queries")
    assert status == 200 and [q["node_id"] for q in queries] == ["proxy-a"], queries
    wait_for(lambda: sample() is None, timeout=2 + 2 * SCHED_SLACK,
             what="the metrics sample to expire")
    assert time.monotonic() - sent >= 1.9
    status, queries = c.admin("GET", "/deployments/prod/queries")
    assert status == 200 and queries == [], queries
    # The proxy itself is still known (the store keeps proxies; only telemetry expires).
    assert "proxy-a" in c.proxies()


def test_commands_older_than_command_retention_are_deleted(control_factory, store):
    """command_retention's smallest value is a minute; the age is made in the store rather
    than waited for, and a restart runs the expiry at once (then every minute)."""
    c1 = control_factory(control={"command_retention": "1min", "proxy_timeout": "30s"})
    agent = SimAgent(c1, "proxy-a")
    agent.register()
    for _ in range(2):  # two commands the agent never acknowledges
        op = Background(c1.port, "POST", API + "/deployments/prod/reload", {"timeout_s": 1},
                        token=ADMIN, timeout=30)
        assert op.result()[0] == 504
    ids = [row[0] for row in store_rows(store, "SELECT id FROM pgrelay.commands ORDER BY id")]
    assert len(ids) == 2, ids
    old, fresh = ids
    with psycopg.connect(store, autocommit=True) as conn:
        conn.execute("UPDATE pgrelay.commands SET created_at = now() - interval '61 seconds'"
                     " WHERE id = %s", (old,))
    assert c1.stop() == 0
    c2 = control_factory(control={"command_retention": "1min", "proxy_timeout": "30s"})
    wait_for(lambda: "deleted 1 command(s) older than command_retention" in c2.log(),
             timeout=10, what="the expiry at start")
    assert [r[0] for r in store_rows(store, "SELECT id FROM pgrelay.commands")] == [fresh]
    assert store_rows(store, "SELECT count(*) FROM pgrelay.command_acks"
                             f" WHERE command_id = {old}") == [(0,)]
    # and an agent is not sent the deleted one any more
    status, body = SimAgent(c2, "proxy-a").poll(wait_s=0)
    assert status == 200 and [cmd["id"] for cmd in body["commands"]] == [fresh], body
