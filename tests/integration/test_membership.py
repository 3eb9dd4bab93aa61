"""Declared membership and one epoch, one leader (issue 8, items 1 and 5).

Only the proxies an operator declared (pgrelayctl create-proxy) vote in the leader decision,
receive it, are addressed by orchestrations and acknowledge commands, each only its own. A node
id nobody declared is pending: recorded (at most 64 per deployment), shown by show-proxies,
answered 403 on everything but register. The quorum for a leader change is a majority of the
declared proxies. One epoch names one leader, in memory and in the store.

The first tests speak the agents' protocol with simulated agents against a real pgrelay-control
(test_control_api.py's fixtures); the last one, "three forged node ids", runs real proxies with
real agents against a primary and a replica.
"""

import http.client as httplib
import json
import os
import signal
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from conftest import admin_json, start_relay, wait_for
from control_e2e_helpers import ADMIN_TOKEN, DEPLOYMENT, PROD_TOKEN, http, info, run_ctl
from control_fleet import ADDRESSES, FleetKeeper, Reports
from test_control_api import (  # noqa: F401 - fixtures used by name
    ADMIN, API, REPO, TOKENS, Background, SimAgent, control_factory, obs, store, store_rows)

CTL_BIN = os.path.abspath(os.environ.get("PGRELAYCTL_BIN", os.path.join(REPO, "bin", "pgrelayctl")))
OFF = {"auto_declare": "off"}
FORGED = ("forged-1", "forged-2", "forged-3")


@pytest.fixture
def control(control_factory):  # noqa: F811 - the fixture of this file: membership enforced
    return control_factory(control=OFF)


def declare(control, *node_ids):
    for node_id in node_ids:
        status, body = control.admin("POST", "/deployments/prod/proxies", {"node_id": node_id})
        assert status in (200, 201), body


def ctl(control, *args):
    env = {k: v for k, v in os.environ.items() if not k.startswith("PGRELAYCTL_")}
    env.update(PGRELAYCTL_ENDPOINT=f"http://127.0.0.1:{control.port}", PGRELAYCTL_TOKEN=ADMIN,
               PGRELAYCTL_DEPLOYMENT="prod")
    return subprocess.run([CTL_BIN, *args], capture_output=True, text=True, env=env, timeout=30)


def seeded(control, leader="pg1", *node_ids):
    """Declared agents that all see ``leader`` as the primary and pg2 as a replica, and the
    deployment's leader settled on it. Returns (agents, epoch)."""
    declare(control, *node_ids)
    agents = [SimAgent(control, n) for n in node_ids]
    nodes = [obs(leader), obs("pg2" if leader != "pg2" else "pg1", in_recovery=True)]
    for a in agents:
        a.register()
    answer = None
    for a in agents:
        answer = a.metrics(epoch=1, leader=leader, nodes=nodes)
    assert answer["leader"] == leader, answer
    return agents, answer["epoch"]


FAILOVER = [obs("pg1", up=False), obs("pg2")]  # "pg1 down, pg2 primary"


# --------------------------------------------------------------------------- #
# pending node ids
# --------------------------------------------------------------------------- #


def test_an_undeclared_node_id_registers_as_pending_and_is_refused_everything_else(control):
    a = SimAgent(control, "stranger")
    answer = a.register(epoch=99, config_version=99, leader="pg9")
    assert answer["declared"] is False and "create-proxy stranger" in answer["warning"], answer
    calls = [("POST", "/metrics", {"ts_ms": 1, "nodes": FAILOVER}),
             ("POST", "/queries", {"queries": []}),
             ("POST", "/config", {"config_version": 1, "config": {}}),
             ("POST", "/schema", {"database": "d", "tables": []}),
             ("GET", "/commands?node_id=stranger&wait_s=0", None),
             ("POST", "/commands/1/ack", {"ok": True})]
    for method, path, body in calls:
        if body is not None:
            body = dict(body, node_id="stranger")
        status, answer = control.agent(method, path, body)
        assert status == 403, (path, status, answer)
        assert "not declared" in answer["error"] and "create-proxy stranger" in answer["error"]
    row = control.proxies()["stranger"]
    assert row["status"] == "pending" and row["hostname"] == "host-stranger", row
    # what it claims feeds nothing (epochs, the next configuration version)
    assert (row["epoch"], row["config_version"], row["leader"]) == (0, 0, None), row
    # a pending proxy is neither counted nor stored
    [dep] = [d for d in control.admin("GET", "/deployments")[1] if d["name"] == "prod"]
    assert dep["proxies"] == 0, dep
    assert store_rows(control.store, "SELECT node_id FROM pgrelay.proxies") == []


def test_create_proxy_declares_it_and_delete_proxy_makes_it_pending_again(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    p = ctl(control, "create-proxy", "proxy-a")
    assert p.returncode == 0 and "created" in p.stdout, (p.stdout, p.stderr)
    assert a.register()["declared"] is True
    assert a.metrics(nodes=[obs("pg1")])["leader"] == "pg1"
    assert control.proxies()["proxy-a"]["status"] == "declared"
    assert ctl(control, "create-proxy", "proxy-a").returncode == 0  # again: no change

    # a parked long poll of a deleted proxy ends, refused
    poll = Background(control.port, "GET",
                      API + "/agent/commands?node_id=proxy-a&wait_s=20", None, TOKENS["prod"],
                      timeout=30)
    wait_for(lambda: "proxy proxy-a polls for 20s" in control.log() or poll.done(), timeout=5,
             what="proxy-a's long poll parked")
    assert not poll.done(), (poll.result(), control.log()[-2000:])
    p = ctl(control, "delete-proxy", "proxy-a")
    assert p.returncode == 0, p.stderr
    status, answer = poll.result()
    assert status == 403 and "deleted" in answer["error"], (status, answer)
    assert control.proxies()["proxy-a"]["status"] == "pending"
    assert control.agent("POST", "/metrics", {"node_id": "proxy-a", "ts_ms": 1})[0] == 403
    p = ctl(control, "delete-proxy", "proxy-a")
    assert p.returncode == 6 and "not declared" in p.stderr and "pending" in p.stderr, p.stderr
    p = ctl(control, "delete-proxy", "nobody")
    assert p.returncode == 6, p.stderr


def test_membership_requests_with_odd_node_ids_and_bodies(control):
    odd = "rack/1%proxy?a"  # printable, no blanks: a valid node id that needs URL escapes
    p = ctl(control, "create-proxy", odd)
    assert p.returncode == 0, p.stderr
    assert ctl(control, "set-proxy-options", odd, "maintenance_exempt=on").returncode == 0
    assert control.proxies()[odd]["options"] == {"maintenance_exempt": True}
    for body in ({"node_id": "has space"}, {"node_id": ""}, {"node_id": "x" * 200},
                 {"node_id": 7}, {"node_id": "x", "options": []},
                 {"node_id": "x", "options": {"maintenance_exempt": 3}}, {}):
        status, answer = control.admin("POST", "/deployments/prod/proxies", body)
        assert status == 400 and "error" in answer, (body, status, answer)
    assert control.admin("POST", "/deployments/prod/proxies/x/options", {"options": 1})[0] == 400
    assert control.admin("POST", "/deployments/nosuch/proxies", {"node_id": "x"})[0] == 404
    assert control.call("POST", API + "/deployments/prod/proxies", {"node_id": "x"},
                        "prod-agent-token-1")[0] == 403  # a deployment token may not declare
    assert "x" not in control.proxies()
    p = ctl(control, "delete-proxy", odd)
    assert p.returncode == 0, p.stderr
    assert control.proxies()[odd]["status"] == "pending"


def test_membership_and_options_survive_a_restart(control_factory):  # noqa: F811
    c1 = control_factory(control=OFF)
    declare(c1, "proxy-a")
    p = ctl(c1, "set-proxy-options", "proxy-a", "maintenance_exempt=on")
    assert p.returncode == 0, p.stderr
    assert c1.stop() == 0
    c2 = control_factory(control=OFF)
    row = c2.proxies()["proxy-a"]
    assert row["status"] == "declared" and row["options"] == {"maintenance_exempt": True}, row
    assert SimAgent(c2, "proxy-a").metrics(nodes=[obs("pg1")])["leader"] == "pg1"


def test_set_proxy_options_checks_keys_and_values(control):
    declare(control, "proxy-a")
    p = ctl(control, "set-proxy-options", "proxy-a", "colour=blue")
    assert p.returncode == 1 and "unknown proxy option colour" in p.stderr, p.stderr
    p = ctl(control, "set-proxy-options", "proxy-a", "maintenance_exempt=perhaps")
    assert p.returncode == 1 and "on or off" in p.stderr, p.stderr
    p = ctl(control, "set-proxy-options", "proxy-a", "novalue")
    assert p.returncode == 2, p.stderr
    p = ctl(control, "set-proxy-options", "ghost", "maintenance_exempt=on")
    assert p.returncode == 6, p.stderr
    p = ctl(control, "set-proxy-options", "proxy-a", "maintenance_exempt=")
    assert p.returncode == 0, p.stderr
    assert control.proxies()["proxy-a"]["options"] == {}


def test_pending_node_ids_are_bounded_and_the_oldest_is_forgotten_first(control):
    declare(control, "proxy-a")
    for i in range(70):
        SimAgent(control, f"inv-{i:02d}").register()
    rows = control.proxies()
    pending = sorted(n for n, r in rows.items() if r["status"] == "pending")
    assert pending == [f"inv-{i:02d}" for i in range(6, 70)], pending
    assert rows["proxy-a"]["status"] == "declared"
    assert "forgot pending proxy inv-00" in control.log()
    # invented node ids cannot flood the log: lines about pending proxies are info at most
    # once per 10 s (debug otherwise)
    started = time.monotonic()
    for i in range(70, 140):
        SimAgent(control, f"inv-{i:03d}").register()
    assert time.monotonic() - started < 10
    info_lines = [ln for ln in control.log().splitlines()
                  if " info: " in ln and "not declared" in ln]
    assert len(info_lines) <= 2, info_lines


def test_proxies_recorded_before_membership_load_as_pending_and_bounded(control_factory):  # noqa: F811
    """After an upgrade, the proxies the store knew are pending until declared; more than 64
    of them load as the 64 seen last."""
    c1 = control_factory(control=OFF)
    values = ", ".join(f"('prod', 'old-{i:02d}', {1000 + i})" for i in range(70))
    store_rows(c1.store, "INSERT INTO pgrelay.proxies (deployment, node_id, last_seen_ms)"
                         f" VALUES {values} RETURNING 1")
    assert c1.stop() == 0
    c2 = control_factory(control=OFF)
    rows = c2.proxies()
    assert sorted(rows) == [f"old-{i:02d}" for i in range(6, 70)], sorted(rows)
    assert {r["status"] for r in rows.values()} == {"pending"}
    assert SimAgent(c2, "old-69").post("/metrics", {"ts_ms": 1})[0] == 403


def test_delete_proxy_is_refused_while_an_orchestration_runs(control):
    declare(control, "proxy-a")
    a = SimAgent(control, "proxy-a")
    a.register()
    op = Background(control.port, "POST", API + "/deployments/prod/reload", {"timeout_s": 20},
                    ADMIN, timeout=40)
    wait_for(lambda: a.poll()[1]["commands"], timeout=5, what="the reload command")
    p = ctl(control, "delete-proxy", "proxy-a")
    assert p.returncode == 1 and "in progress" in p.stderr, p.stderr
    [cmd] = a.poll()[1]["commands"]
    assert a.ack(cmd["id"])[0] == 204
    assert op.result()[0] == 200
    assert ctl(control, "delete-proxy", "proxy-a").returncode == 0


def test_auto_declare_declares_at_register(control_factory):  # noqa: F811
    c = control_factory(control={"auto_declare": "on"})
    a = SimAgent(c, "dev-1")
    assert a.register()["declared"] is True
    assert c.proxies()["dev-1"]["status"] == "declared"
    # only at register: a node id that never registered stays pending
    assert c.agent("POST", "/metrics", {"node_id": "dev-2", "ts_ms": 1})[0] == 403


def from_address(source, port, method, path, body, token):
    """An HTTP request to 127.0.0.1:port sent from the local address ``source``."""
    conn = httplib.HTTPConnection("127.0.0.1", port, timeout=10, source_address=(source, 0))
    try:
        conn.request(method, path, body=json.dumps(body).encode(),
                     headers={"Content-Type": "application/json",
                              "Authorization": f"Bearer {token}"})
        r = conn.getresponse()
        return r.status, json.loads(r.read() or b"null")
    finally:
        conn.close()


def test_a_proxy_pinned_to_an_address_takes_calls_only_from_it(control):
    """Node ids are not secrets: pinning a declared proxy to its address keeps a token holder
    elsewhere from speaking in its name."""
    declare(control, "proxy-a")
    p = ctl(control, "set-proxy-options", "proxy-a", "address=127.0.0.2")
    assert p.returncode == 0, p.stderr
    body = {"node_id": "proxy-a", "ts_ms": 1, "nodes": [obs("pg1")]}
    status, answer = control.agent("POST", "/metrics", body)  # from 127.0.0.1
    assert status == 403 and "only from its address, not from 127.0.0.1" in answer["error"]
    assert control.proxies()["proxy-a"]["last_seen"] == 0  # the impostor was not "seen"
    assert control.agent("POST", "/register", {"node_id": "proxy-a"})[0] == 403
    status, answer = from_address("127.0.0.2", control.port, "POST", API + "/agent/metrics",
                                  body, TOKENS["prod"])
    assert (status, answer) == (200, {"leader": "pg1", "epoch": 1}), answer
    p = ctl(control, "set-proxy-options", "proxy-a", "address=not-an-ip")
    assert p.returncode == 1 and "IPv4 or IPv6" in p.stderr, p.stderr
    assert ctl(control, "set-proxy-options", "proxy-a", "address=").returncode == 0
    assert control.agent("POST", "/metrics", body)[0] == 200


# --------------------------------------------------------------------------- #
# votes and quorum
# --------------------------------------------------------------------------- #


def test_forged_node_ids_do_not_move_the_leader(control):
    (a, b), epoch = seeded(control, "pg1", "proxy-a", "proxy-b")
    for node_id in FORGED:
        f = SimAgent(control, node_id)
        f.register(epoch=epoch + 5, leader="pg2")
        status, answer = f.post("/metrics", {"ts_ms": 1, "epoch": epoch + 5, "leader": "pg2",
                                              "nodes": FAILOVER})
        assert status == 403, answer
    assert a.metrics(epoch=epoch, leader="pg1", nodes=[obs("pg1"), obs("pg2", in_recovery=True)]
                     ) == {"leader": "pg1", "epoch": epoch}
    rows = control.proxies()
    assert all(rows[n]["status"] == "pending" for n in FORGED), rows


def test_the_first_proxy_to_report_a_failover_is_not_a_majority(control_factory):  # noqa: F811
    c1 = control_factory(control=OFF)
    (a, b, c), epoch = seeded(c1, "pg1", "proxy-a", "proxy-b", "proxy-c")
    # a new control plane (restart, lease change) starts with no observations: the first
    # proxy to report is the only reporter, but not a majority of the declared
    assert c1.stop() == 0
    c2 = control_factory(control=OFF)
    for p in (a, b, c):
        p.control = c2
    assert a.metrics(epoch=epoch, leader="pg1", nodes=FAILOVER) == {"leader": "pg1",
                                                                     "epoch": epoch}
    # a quorum is 2 of the 3 declared
    assert b.metrics(epoch=epoch, leader="pg1", nodes=FAILOVER) == {"leader": "pg2",
                                                                     "epoch": epoch + 1}


def test_a_declared_proxy_that_is_gone_still_counts_in_the_quorum(control):
    (a,), epoch = seeded(control, "pg1", "proxy-a")
    declare(control, "proxy-b")  # declared, never reports
    assert a.metrics(epoch=epoch, leader="pg1", nodes=FAILOVER) == {"leader": "pg1",
                                                                     "epoch": epoch}
    assert ctl(control, "delete-proxy", "proxy-b").returncode == 0
    assert a.metrics(epoch=epoch, leader="pg1", nodes=FAILOVER) == {"leader": "pg2",
                                                                     "epoch": epoch + 1}


# --------------------------------------------------------------------------- #
# commands
# --------------------------------------------------------------------------- #


def test_commands_go_to_declared_proxies_and_each_acknowledges_only_its_own(control):
    declare(control, "proxy-a", "proxy-b")
    a, b = SimAgent(control, "proxy-a"), SimAgent(control, "proxy-b")
    for p in (a, b):
        p.register()
    SimAgent(control, "forged-1").register()
    assert ctl(control, "set-proxy-options", "proxy-b", "maintenance_exempt=on").returncode == 0
    result = {}
    t = threading.Thread(target=lambda: result.update(r=control.admin(
        "POST", "/deployments/prod/maintenance", {"on": True, "timeout_s": 3}, timeout=20)))
    t.start()
    status, body = wait_for(lambda: (lambda r: r if r[1]["commands"] else None)(a.poll()),
                            timeout=5, what="proxy-a's maintenance command")
    [cmd] = body["commands"]
    # proxy-b (exempt) was not sent it, so it cannot acknowledge it; a forged id cannot either
    assert b.poll()[1]["commands"] == []
    assert b.ack(cmd["id"])[0] == 404
    assert SimAgent(control, "forged-1").ack(cmd["id"])[0] == 403
    assert a.ack(cmd["id"], True, "maintenance on")[0] == 204
    t.join(20)
    status, answer = result["r"]
    assert status == 200 and [p["node_id"] for p in answer["proxies"]] == ["proxy-a"], answer
    acks = store_rows(control.store, "SELECT node_id, ok FROM pgrelay.command_acks")
    assert acks == [("proxy-a", True)], acks


# --------------------------------------------------------------------------- #
# one epoch, one leader
# --------------------------------------------------------------------------- #


def test_the_store_never_takes_an_epoch_again_for_another_leader(control):
    (a, b), epoch = seeded(control, "pg1", "proxy-a", "proxy-b")
    # Another writer (a second replica that believed it held the lease) recorded pg2 at the
    # next epoch behind this replica's back.
    store_rows(control.store, "UPDATE pgrelay.leadership SET leader = 'pg2', epoch = epoch + 1"
                              " RETURNING 1")
    pg3 = [obs("pg1", up=False), obs("pg2", up=False), obs("pg3")]
    # The agents follow every answer, as real ones do.
    told = {"leader": "pg1", "epoch": epoch}
    seen = []
    for _ in range(6):
        for p in (a, b):
            told = p.metrics(nodes=pg3, **told)
            seen.append((told["leader"], told["epoch"]))
        if told["leader"] == "pg3":
            break
    # pg3 was refused at epoch + 1 (it names pg2 there), and decided at epoch + 2
    assert told == {"leader": "pg3", "epoch": epoch + 2}, seen
    assert ("pg3", epoch + 1) not in seen, seen
    assert store_rows(control.store, "SELECT leader, epoch FROM pgrelay.leadership") == [
        ("pg3", epoch + 2)]
    assert "the store refused leader pg3" in control.log()


# --------------------------------------------------------------------------- #
# fault scenario: three forged node ids against real proxies (issue 8, item 7)
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def fleet_keeper(pg):
    keeper = FleetKeeper(pg, "ctl_mship", auto_declare=False)
    yield keeper
    keeper.close()


@pytest.fixture
def fleet(fleet_keeper):
    """pgrelay-control (auto_declare off) with its store, a primary pg1 and a replica pg2, and
    two real proxies declared as proxy-a and proxy-b; in its state as built for every test
    (control_fleet.py)."""
    return fleet_keeper.get()


class Writer:
    """Writes through one proxy every 20 ms and records, per write, the node it landed on
    (cluster_name) or the error."""

    def __init__(self, relay, table, name):
        self.relay, self.table, self.name = relay, table, name
        self.landed = []  # (node or None, error text or None)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        conn = None
        while not self.stop.is_set():
            try:
                if conn is None:
                    conn = self.relay.connect(connect_timeout=3)
                node = conn.execute(f"INSERT INTO {self.table} VALUES (%s)"
                                    " RETURNING current_setting('cluster_name')",
                                    (self.name,)).fetchone()[0]
                self.landed.append((node, None))
            except psycopg.Error as e:
                self.landed.append((None, str(e).strip()))
                conn = None
            self.stop.wait(0.02)
        if conn is not None:
            conn.close()


def test_three_forged_node_ids_neither_move_the_leader_nor_touch_the_real_proxies_commands(
        fleet):
    """Three made-up node ids with the deployment token register and report "pg1 down, pg2
    primary" at a higher epoch, again and again: the leader stays pg1 at its epoch, both real
    proxies keep writing to pg1 all along, the forged ids show as pending, and they can
    neither take nor acknowledge the commands of an orchestration meant for the real
    proxies. (Before declared membership, three of five voters moved the leader to pg2 and
    both proxies refused every write with 57P03.)"""
    control, b = fleet.control, fleet.proxies["proxy-b"]
    epoch = control.deployment()["epoch"]
    table = "forged_" + uuid.uuid4().hex[:8]
    fleet.cluster.primary.query(f"CREATE TABLE {table} (proxy text)")
    writers = [Writer(r, table, n) for n, r in fleet.proxies.items()]
    for w in writers:
        w.thread.start()
    wait_for(lambda: all(w.landed for w in writers), timeout=10, what="first writes")

    forged_down = [{"name": "pg1", "health": "down", "role": "primary", "in_recovery": False},
                   {"name": "pg2", "health": "up", "role": "primary", "in_recovery": False}]
    answers = []
    try:
        for node_id in FORGED:
            status, body = http(control.port, "POST", API + "/agent/register",
                                {"node_id": node_id, "hostname": "evil", "epoch": epoch,
                                 "leader": "pg1"}, PROD_TOKEN)
            assert status == 200 and body["declared"] is False, (status, body)
        # while the control plane hears three reports from each real agent (each one a
        # decision the forged votes could sway): first under the current epoch (three of five
        # voters, before), then three more at a higher one
        for claimed in (epoch, epoch + 10):
            reports = Reports(control, ADDRESSES)
            while reports.poll() < 3:
                for node_id in FORGED:
                    answers.append(http(control.port, "POST", API + "/agent/metrics",
                                        {"node_id": node_id, "ts_ms": int(time.time() * 1000),
                                         "epoch": claimed, "leader": "pg1" if claimed == epoch
                                         else "pg2", "nodes": forged_down}, PROD_TOKEN))
                time.sleep(0.05)  # pacing of the forged reports, not a synchronisation
                dep = control.deployment()
                assert (dep["leader"], dep["epoch"]) == ("pg1", epoch), dep
                for n, r in fleet.proxies.items():
                    i = info(r)
                    assert (i["write_leader"], i["epoch"]) == ("pg1", epoch), (n, i)
    finally:
        for w in writers:
            w.stop.set()
        for w in writers:
            w.thread.join(10)
    assert all(status == 403 for status, _ in answers), answers[:3]
    for w in writers:
        assert len(w.landed) > 20, (w.name, w.landed)
        errors = [e for _, e in w.landed if e]
        assert not errors, (w.name, errors[:3])
        assert {node for node, _ in w.landed} == {"pg1"}, (w.name, set(w.landed))
    rows = control.proxies()
    assert {n: rows[n]["status"] for n in FORGED} == dict.fromkeys(FORGED, "pending"), rows
    assert all(rows[n]["status"] == "declared" and rows[n]["live"] for n in ADDRESSES)

    # An orchestration addresses the declared proxies only; with proxy-b's agent stopped, its
    # command waits for it, and no forged id can answer in its place.
    agent_b = b.agent_pid()
    os.kill(agent_b, signal.SIGSTOP)
    try:
        reload = Background(control.port, "POST", API + f"/deployments/{DEPLOYMENT}/reload",
                            {"timeout_s": 20}, ADMIN_TOKEN, timeout=40)
        cmd_id = wait_for(lambda: command_for(control, "proxy-b"), timeout=10,
                          what="the reload command queued for proxy-b")
        for node_id in FORGED:
            status, body = http(control.port, "POST", API + f"/agent/commands/{cmd_id}/ack",
                                {"node_id": node_id, "ok": True, "detail": "forged"}, PROD_TOKEN)
            assert status == 403, (status, body)
            status, body = http(control.port, "GET",
                                API + f"/agent/commands?node_id={node_id}&wait_s=0", None,
                                PROD_TOKEN)
            assert status == 403, (status, body)
        assert not reload.done()
    finally:
        os.kill(agent_b, signal.SIGCONT)
    status, body = reload.result(timeout=30)
    assert status == 200 and body["ok"], body
    assert sorted(p["node_id"] for p in body["proxies"]) == sorted(ADDRESSES), body
    assert all(p["detail"] != "forged" for p in body["proxies"]), body


def command_for(control, node_id):
    """The id of a command queued for node_id and not acknowledged yet, or None."""
    rows = store_rows(control.store, "SELECT command_id FROM pgrelay.command_acks"
                                     f" WHERE node_id = '{node_id}' AND acked_at IS NULL")
    return rows[0][0] if rows else None


def test_an_undeclared_real_proxy_serves_alone_and_joins_once_declared(fleet, pg):
    """A proxy named by [control] node_id (no NODE_ID in its environment) that nobody declared:
    its agent logs that the control plane refuses it and routes on its own decision; once an
    operator declares it, it follows the deployment's leader and epoch."""
    control = fleet.control
    relay = start_relay(pg, nodes=fleet.cluster.relay_nodes(), sections={
        "agent": {"monitor_user": "postgres", "health_interval": "200ms", "fall": 2, "rise": 1},
        "control": {"endpoint": control.url, "token": PROD_TOKEN, "node_id": "proxy-c",
                    "request_timeout": "2s", "metrics_interval": "250ms",
                    "control_grace_period": "2s"}})
    try:
        assert "NODE_ID" not in os.environ
        wait_for(lambda: control.proxies().get("proxy-c", {}).get("status") == "pending",
                 timeout=10, what="proxy-c recorded as pending")
        wait_for(lambda: "create-proxy proxy-c" in relay.log(), timeout=10,
                 what="the agent's warning naming the command to run")
        assert "as node proxy-c ([control] node_id)" in relay.log()
        # it registers again while refused, without saying it again each time
        def registrations():
            return control.log_since(0).count("proxy proxy-c registered")

        wait_for(lambda: registrations() >= 2, timeout=10, what="proxy-c registering again")
        said = relay.log().count("create-proxy proxy-c")
        wait_for(lambda: registrations() >= 3, timeout=10, what="proxy-c registering again")
        assert relay.log().count("create-proxy proxy-c") == said, relay.log()
        with relay.connect() as c:  # serving on its own decision
            assert c.execute("SELECT current_setting('cluster_name')").fetchone()[0] == "pg1"
        p = run_ctl(control, "create-proxy", "proxy-c")
        assert p.returncode == 0, p.stderr
        dep = control.deployment()
        wait_for(lambda: admin_json(relay, "show info")["epoch"] == dep["epoch"]
                 and control.proxies()["proxy-c"]["live"], timeout=40,
                 what="proxy-c following the deployment once declared")
    finally:
        relay.stop()
        run_ctl(control, "delete-proxy", "proxy-c")  # the fleet's quorum: proxy-a and proxy-b


def test_a_node_id_with_url_characters_gets_its_commands(fleet, pg):
    """Node ids may hold any printable character but blanks: the agent's long poll must name
    exactly this proxy (its node id escaped in the query string), or the command that an
    operator sends to it never arrives."""
    control = fleet.control
    node_id = "edge&a+b%2F=c#d"
    p = run_ctl(control, "create-proxy", node_id)
    assert p.returncode == 0, p.stderr
    relay = start_relay(pg, nodes=fleet.cluster.relay_nodes(), sections={
        "agent": {"monitor_user": "postgres", "health_interval": "200ms", "fall": 2, "rise": 1},
        "control": {"endpoint": control.url, "token": PROD_TOKEN, "node_id": node_id,
                    "request_timeout": "2s", "metrics_interval": "250ms",
                    "control_grace_period": "2s"}})
    try:
        label = node_id.replace("\\", "\\\\").replace('"', '\\"')
        polling = f'pgrelay_proxy_polling{{deployment="prod",node_id="{label}"}} 1'

        def parked():
            status, text = http(control.port, "GET", "/metrics")
            return status == 200 and polling in text.splitlines()

        wait_for(parked, timeout=15, what=f"the long poll of {node_id} parked under its name")
        assert control.proxies()[node_id]["live"]
    finally:
        relay.stop()
        p = run_ctl(control, "delete-proxy", node_id)
        assert p.returncode == 0, p.stderr
