"""[agent] ha_source = patroni (issue 11, Deliver 3): the leader Patroni names gates writes,
without a Patroni cluster: a small HTTP stub answers GET /cluster as Patroni 3.0 does, in front
of real PostgreSQL 15 servers.

The cluster: pg1 primary, pg2 and pg3 its streaming replicas; pg2 is then promoted while pg1
runs on, so that two primaries take writes (the split brain a dead Patroni leaves behind:
its PostgreSQL goes on as a primary after another member was promoted). pg3 stays in
recovery. The stub's members are named m1..m3 (not the [node.NAME]s), so that pgrelay finds
them by host and port.

  * writes go only to the primary the stub names, even when the other one is the configured
    primary (which the probes alone prefer);
  * when the stub names another member, sessions on the old leader are closed at once
    (57P01, also inside a transaction, well before leader_change_grace) and new ones write on
    the new leader;
  * a member the stub names that is in recovery gets no write: writes are held (no_leader_wait)
    and refused with a SQLSTATE, never sent there; the old primary is not a write target
    either while the stub names someone else;
  * a stub that stops answering: the probes alone decide again, said once in the log;
  * ha_source = patroni without ha_patroni_urls is a configuration error.
"""

import http.server
import json
import socketserver
import subprocess
import threading
import time

import pytest

from cluster import Cluster, destroy_relay, leader_history, log_lines, show_info, start_ha_relay
from conftest import (PGRELAY_BIN, RawClient, admin_json, data_rows, error_fields, free_port,
                      wait_for)

pytestmark = pytest.mark.deadline(120)

AGENT = {"health_interval": "200ms", "fall": 2, "rise": 1, "health_timeout": "1s"}


class PatroniStub:
    """GET /cluster as Patroni 3.0 answers it: members with name, role, host, port, state and
    api_url, which is this stub's /NAME/patroni (its /NAME/liveness answers 200, as a running
    Patroni's GET /liveness does).
    ``leader``: the member named leader (None: no leader key); ``silent``: answer 503;
    ``dead``: members whose own Patroni does not answer (503 on their /liveness)."""

    def __init__(self, members):
        self.members = members  # name -> (host, port)
        self.leader = None
        self.silent = False
        self.dead = set()
        self.requests = 0
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802 (http.server's name)
                stub.requests += 1
                if self.path.endswith("/liveness"):
                    dead = stub.silent or self.path.split("/")[1] in stub.dead
                    self.send_response(503 if dead else 200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                    return
                if stub.silent or self.path != "/cluster":
                    self.send_response(503 if stub.silent else 404)
                    self.end_headers()
                    return
                body = json.dumps({"members": [
                    {"name": name, "role": "leader" if name == stub.leader else "replica",
                     "state": "running",
                     "api_url": f"http://127.0.0.1:{stub.port}/{name}/patroni",
                     "host": host, "port": port, "timeline": 1}
                    for name, (host, port) in stub.members.items()], "scope": "stub"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        class Server(socketserver.ThreadingMixIn, http.server.HTTPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.port = free_port()
        self.server = Server(("127.0.0.1", self.port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def name(self, leader):
        """Name ``leader`` and wait until pgrelay's agent has asked again since."""
        self.leader = leader
        seen = self.requests
        wait_for(lambda: self.requests >= seen + 2, timeout=10, what="the agent to ask again")

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def split_brain():
    """(cluster, stub): pg1 and pg2 both primaries, pg3 a replica of pg1; the stub names m1."""
    c = Cluster.create(replicas=2)
    stub = None
    try:
        c["pg2"].promote()
        wait_for(lambda: not c["pg2"].in_recovery(), timeout=30, what="pg2 to be promoted")
        stub = PatroniStub({f"m{i + 1}": ("127.0.0.1", n.port) for i, n in enumerate(c.nodes)})
        stub.leader = "m1"
        yield c, stub
    finally:
        if stub:
            stub.stop()
        c.destroy()


@pytest.fixture
def relay_with(split_brain):
    started = []

    def start(agent=None, **extra):
        c, stub = split_brain
        # A dead URL first: the agent goes on to the next member and sticks to the one that
        # answered.
        urls = f"http://127.0.0.1:{free_port()}, http://127.0.0.1:{stub.port}/"
        extra.setdefault("workers", 2)
        r = start_ha_relay(c, agent={**AGENT, "ha_source": "patroni", "ha_patroni_urls": urls,
                                     **(agent or {})}, **extra)
        started.append(r)
        return r

    yield start
    for r in started:
        destroy_relay(r)


def login(port, timeout=10.0):
    client = RawClient(port, timeout=timeout)
    client.send_startup()
    msgs = client.read_until("ZE")
    return client, error_fields(msgs)


def server_port_through(relay):
    """inet_server_port() of a new write session, or the ErrorResponse's fields."""
    client, err = login(relay.port)
    try:
        if err:
            return err
        msgs = client.simple_query("SELECT inet_server_port(), pg_is_in_recovery()")
        err = error_fields(msgs)
        if err:
            return err
        port, in_recovery = data_rows(msgs)[0]
        assert in_recovery in ("f", False), "a write session reached a node in recovery"
        return int(port)
    finally:
        client.close()


def test_writes_go_only_to_the_primary_patroni_names(split_brain, relay_with):
    """Two primaries answer; the configured primary is pg1, which the probes alone would keep;
    the stub names m2 (pg2's host and port): every write session lands on pg2."""
    c, stub = split_brain
    stub.leader = "m2"
    relay = relay_with()
    wait_for(lambda: show_info(relay).get("write_leader") == "pg2", timeout=15,
             what="pgrelay to route writes to pg2, which the stub names")
    ports = {server_port_through(relay) for _ in range(20)}
    assert ports == {c["pg2"].port}, ports
    assert log_lines(relay, "node pg1 reports it is a primary, but Patroni names m2 leader")


def test_patroni_naming_another_member_closes_the_old_leaders_sessions_at_once(
        split_brain, relay_with):
    """The stub names m1, then m2: a session inside a transaction on pg1 gets FATAL 57P01 at
    once (leader_change_grace is 60 s here), and new write sessions land on pg2; the history
    says why."""
    c, stub = split_brain
    relay = relay_with(leader_change_grace="60s")
    wait_for(lambda: show_info(relay).get("write_leader") == "pg1", timeout=15,
             what="pgrelay to route writes to pg1")
    client, err = login(relay.port)
    assert err is None, err
    msgs = client.simple_query("BEGIN; SELECT inet_server_port()")
    assert int(data_rows(msgs)[0][0]) == c["pg1"].port
    before = time.monotonic()
    stub.leader = "m2"
    client.sock.settimeout(10)
    msgs = client.read_until("E")
    took = time.monotonic() - before
    fields = error_fields(msgs)
    assert fields and fields.get("C") == "57P01", msgs
    assert took < 5, f"the session on the old leader was closed after {took:.1f}s"
    client.close()
    wait_for(lambda: server_port_through(relay) == c["pg2"].port, timeout=10,
             what="new write sessions on pg2")
    assert {server_port_through(relay) for _ in range(10)} == {c["pg2"].port}
    newest = leader_history(relay)[0]
    assert "Patroni names m2 leader, not pg1" in json.dumps(newest), newest


def test_a_member_in_recovery_named_by_patroni_gets_no_write(split_brain, relay_with):
    """The stub names m3, which is pg3, a replica: pgrelay routes writes to nobody (not pg3,
    not the primaries the stub does not name): a new write session waits no_leader_wait and is
    refused with a SQLSTATE. When the stub names m1 again, writes go to pg1."""
    c, stub = split_brain
    relay = relay_with(no_leader_wait="1s")
    wait_for(lambda: show_info(relay).get("write_leader") == "pg1", timeout=15,
             what="pgrelay to route writes to pg1")
    stub.name("m3")
    wait_for(lambda: not show_info(relay).get("write_leader"), timeout=10,
             what="pgrelay to route writes to nobody")
    for _ in range(3):
        got = server_port_through(relay)
        assert isinstance(got, dict) and got.get("C"), f"a write session got {got!r}"
    assert show_info(relay).get("write_leader") in (None, "", "(none)")
    stub.name("m1")
    wait_for(lambda: server_port_through(relay) == c["pg1"].port, timeout=10,
             what="writes on pg1 again")


def test_a_leader_whose_own_patroni_is_dead_gets_no_write(split_brain, relay_with):
    """The stub names m1, whose own Patroni stops answering (killed: it renews its key no more,
    and its PostgreSQL takes writes until the key expires and after): the session on pg1 gets
    57P01 at once, no write goes anywhere meanwhile; Patroni alive again, writes go to pg1."""
    c, stub = split_brain
    relay = relay_with(no_leader_wait="1s")
    wait_for(lambda: show_info(relay).get("write_leader") == "pg1", timeout=15,
             what="pgrelay to route writes to pg1")
    client, err = login(relay.port)
    assert err is None, err
    stub.dead.add("m1")
    client.sock.settimeout(10)
    fields = error_fields(client.read_until("E"))
    assert fields and fields.get("C") == "57P01", fields
    client.close()
    assert not show_info(relay).get("write_leader")
    got = server_port_through(relay)
    assert isinstance(got, dict) and got.get("C"), f"a write session got {got!r}"
    assert log_lines(relay, "its own Patroni does not answer")
    stub.dead.clear()
    wait_for(lambda: server_port_through(relay) == c["pg1"].port, timeout=10,
             what="writes on pg1 again")


def test_patroni_silent_falls_back_to_the_probes_alone(split_brain, relay_with):
    """The stub answers 503 from then on: the log says once that the probes alone decide, and
    writes go on to the leader pgrelay had (its split-brain rule keeps it)."""
    c, stub = split_brain
    stub.leader = "m2"
    relay = relay_with()
    wait_for(lambda: show_info(relay).get("write_leader") == "pg2", timeout=15,
             what="pgrelay to route writes to pg2")
    stub.silent = True
    wait_for(lambda: log_lines(relay, "no Patroni member answers"), timeout=15,
             what="the agent to say Patroni is silent")
    assert {server_port_through(relay) for _ in range(10)} == {c["pg2"].port}
    seen = stub.requests
    wait_for(lambda: stub.requests >= seen + 5, timeout=15, what="more rounds of the agent")
    assert len(log_lines(relay, "no Patroni member answers")) == 1
    stub.silent = False
    stub.name("m1")
    wait_for(lambda: show_info(relay).get("write_leader") == "pg1", timeout=15,
             what="pgrelay to follow Patroni again")
    assert log_lines(relay, "Patroni answers again")


def test_ha_source_patroni_needs_urls(tmp_path):
    conf = tmp_path / "pgrelay.ini"
    conf.write_text("[pgrelay]\nlisten_port = 6432\n[agent]\nha_source = patroni\n"
                    "[node.a]\nhost = 127.0.0.1\nrole = primary\n")
    r = subprocess.run([PGRELAY_BIN, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode != 0
    assert "ha_source = patroni needs ha_patroni_urls" in r.stdout + r.stderr
    conf.write_text("[pgrelay]\nlisten_port = 6432\n[agent]\nha_source = consul\n"
                    "[node.a]\nhost = 127.0.0.1\nrole = primary\n")
    r = subprocess.run([PGRELAY_BIN, "-t", "-c", str(conf)], capture_output=True, text=True)
    assert r.returncode != 0 and "ha_source" in r.stdout + r.stderr


def test_patronis_word_is_in_show_nodes_and_in_the_observations_for_the_control_plane(
        split_brain, relay_with):
    """show nodes has Patroni's word on each node, and so has each node of the agent's metrics
    report (the control plane's leader decision does not count a primary Patroni does not
    name: test_control_leadership.py)."""
    from control_helpers import FakeControl

    class NoOpinion(FakeControl):
        """A control plane that has no leader opinion: the agent decides as it would alone."""

        def answer(self, method, path, body):
            if path == "/api/v1/agent/metrics":
                return (200, {"leader": None, "epoch": 0})
            if path == "/api/v1/agent/commands":
                self.stopping.wait(1.0)
                return (200, {"commands": []})
            return super().answer(method, path, body)

    c, stub = split_brain
    stub.leader = "m2"
    fake = NoOpinion("healthy")
    try:
        relay = relay_with(control={"endpoint": fake.url, "token": "t0ken-for-a-fake",
                                    "metrics_interval": "100ms"})
        expected = {"pg1": "not leader", "pg2": "leader", "pg3": "not leader"}
        wait_for(lambda: {n["name"]: n["patroni"] for n in admin_json(relay, "show nodes")}
                 == expected, timeout=15, what=f"show nodes to say {expected}")

        def reported():
            bodies = [r[3] for r in fake.requests if r[2] == "/api/v1/agent/metrics"
                      and isinstance(r[3], dict) and r[3].get("nodes")]
            return bodies and {n["name"]: n.get("patroni") for n in bodies[-1]["nodes"]}

        wait_for(lambda: reported() == {k: v.replace(" ", "_") for k, v in expected.items()},
                 timeout=15, what="the metrics report to carry Patroni's word")
        # Patroni stops answering: no word any more, in either place
        stub.silent = True
        wait_for(lambda: all(n["patroni"] is None for n in admin_json(relay, "show nodes")),
                 timeout=15, what="show nodes to drop Patroni's word")
        wait_for(lambda: reported() == {"pg1": None, "pg2": None, "pg3": None}, timeout=15,
                 what="the metrics report to drop Patroni's word")
    finally:
        fake.close()
