"""pgrelay-control: the API additions the web UI reads (docs/protocol.md), with simulated agents.

  * GET .../leaders: every change of the leader or epoch, newest first, with what made it;
  * GET .../metrics/history?since_ms=: per-second points per proxy and per node, only the new
    ones after since_ms, 400 on a bad since_ms;
  * GET .../nodes: lag_ms as reported, sessions summed over the live proxies;
  * GET .../proxies: maintenance_until_ms from the last metrics report;
  * GET .../config: each proxy's reported effective configuration;
  * a bad maintenance_until_ms or lag_ms in a metrics report is refused with 400.
"""

import time

from conftest import wait_for
from test_control_api import ADMIN, API, SimAgent, control, control_factory, obs, store  # noqa: F401

DEP = "/deployments/prod"


def get(control, path):  # noqa: F811 - the fixture's value
    status, body = control.admin("GET", DEP + path)
    assert status == 200, (path, status, body)
    return body


def test_leader_history_lists_each_change_newest_first_with_its_reason(control):  # noqa: F811
    a, b = SimAgent(control, "pa"), SimAgent(control, "pb")
    for agent in (a, b):
        agent.register()
    assert get(control, "/leaders") == []
    for agent in (a, b):
        agent.metrics(nodes=[obs("pg1"), obs("pg2", in_recovery=True)], epoch=0)
    wait_for(lambda: get(control, "/leaders"), timeout=5, what="the first decision recorded")
    [first] = get(control, "/leaders")
    assert first["leader"] == "pg1" and first["epoch"] >= 1 and first["why"], first
    assert abs(first["at"] - time.time() * 1000) < 10000, first

    # pg2 promoted, pg1 down: both proxies see it, the control plane moves the leader
    for agent in (a, b):
        agent.metrics(nodes=[obs("pg1", up=False), obs("pg2")], epoch=first["epoch"],
                      leader="pg1")
    wait_for(lambda: len(get(control, "/leaders")) == 2, timeout=5,
             what="the failover recorded")
    second, again = get(control, "/leaders")
    assert again == first
    assert second["leader"] == "pg2" and second["epoch"] > first["epoch"], second
    assert second["at"] >= first["at"]
    status, body = control.admin("GET", "/deployments/nowhere/leaders")
    assert status == 404, body


def test_metrics_history_has_a_point_per_second_and_only_new_ones_after_since(control):  # noqa: F811,E501
    a = SimAgent(control, "pa")
    a.register()
    t0 = int(time.time() * 1000)
    statements = 0
    for i in range(9):  # every 0.5 s: points need a second between samples
        statements += 100
        a.metrics(ts_ms=t0 + i * 500, statements=statements, clients=3,
                  nodes=[obs("pg1", statements=statements, write_sessions=3)])
        time.sleep(0.5)
    hist = get(control, "/metrics/history")
    assert hist["fields"] == ["t", "statements", "bytes_in", "bytes_out", "errors",
                              "latency_ms", "sessions"]
    [proxy] = hist["proxies"]
    assert proxy["node_id"] == "pa"
    points = proxy["points"]
    # 9 samples 500 ms apart by the agent's clock: a point every second of it, 4 in all, each
    # at 200 statements/s whatever the arrival jitter
    assert len(points) == 4, points
    for p in points:
        assert p[1] == 200 and p[6] == 3 and p[5] is None, p
    ts = [p[0] for p in points]
    assert ts == sorted(ts), ts
    [node] = proxy["nodes"]
    assert node["name"] == "pg1" and len(node["points"]) == len(points), node

    newer = get(control, f"/metrics/history?since_ms={ts[-2]}")["proxies"][0]["points"]
    assert [p[0] for p in newer] == [ts[-1]], newer
    assert get(control, f"/metrics/history?since_ms={ts[-1]}")["proxies"][0]["points"] == []
    for bad in ("x", "-1", "", "12abc"):
        status, body = control.admin("GET", f"{DEP}/metrics/history?since_ms={bad}")
        assert status == 400 and "since_ms" in body["error"], (bad, status, body)


def test_nodes_proxies_and_config_carry_what_the_fleet_page_shows(control):  # noqa: F811
    a, b = SimAgent(control, "pa"), SimAgent(control, "pb")
    for agent in (a, b):
        agent.register()
    until = int(time.time() * 1000) + 60000
    a.metrics(maintenance=True, maintenance_until_ms=until,
              nodes=[obs("pg1", write_sessions=4, read_sessions=0),
                     obs("pg2", in_recovery=True, lag_bytes=4096, lag_ms=1500,
                         read_sessions=2)])
    b.metrics(nodes=[obs("pg1", write_sessions=1),
                     obs("pg2", in_recovery=True, lag_bytes=4096, lag_ms=1500,
                         read_sessions=5)])
    nodes = {n["name"]: n for n in get(control, "/nodes")}
    assert (nodes["pg1"]["write_sessions"], nodes["pg1"]["read_sessions"]) == (5, 0), nodes
    assert (nodes["pg2"]["write_sessions"], nodes["pg2"]["read_sessions"]) == (0, 7), nodes
    assert nodes["pg2"]["lag_ms"] == 1500 and nodes["pg2"]["lag_bytes"] == 4096, nodes
    proxies = {p["node_id"]: p for p in get(control, "/proxies")}
    assert proxies["pa"]["maintenance"] is True and proxies["pa"]["maintenance_until_ms"] == until
    assert proxies["pb"]["maintenance_until_ms"] == 0

    status, answer = a.post("/config", {"config_version": 0,
                                        "config": {"listen_port": "6432", "agent.fall": "2"}})
    assert status == 204, answer
    cfg = {p["node_id"]: p for p in get(control, "/config")["proxies"]}
    assert cfg["pa"]["effective"] == {"listen_port": "6432", "agent.fall": "2"}, cfg
    assert cfg["pb"]["effective"] is None, cfg


def test_a_malformed_maintenance_end_or_lag_time_is_refused(control):  # noqa: F811
    a = SimAgent(control, "pa")
    a.register()
    for body in ({"maintenance_until_ms": -5}, {"maintenance_until_ms": "soon"},
                 {"nodes": [obs("pg1", lag_ms="long")]}):
        status, answer = a.post("/metrics", dict(body, ts_ms=int(time.time() * 1000)))
        assert status == 400, (body, status, answer)
        field = "maintenance_until_ms" if "maintenance_until_ms" in body else "lag_ms"
        assert field in answer["error"], answer
    assert control.call("GET", "/healthz")[0] == 200
