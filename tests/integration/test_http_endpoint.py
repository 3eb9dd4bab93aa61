"""The proxy's own HTTP endpoint: health checks a load balancer asks, and Prometheus metrics.

Each test starts pgrelay with ``http_listen_port`` and talks plain HTTP to it, as HAProxy's
``option httpchk`` or Prometheus would.
"""

import datetime
import json
import os
import signal
import socket
import subprocess
import time

import psycopg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from cluster import Cluster, destroy_relay, start_ha_relay
from conftest import admin, admin_json, free_port, wait_for


def http_get(port, path, token=None, method="GET", timeout=10.0):
    """(status, body text) of one request; the endpoint closes after each answer."""
    head = f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
    if token is not None:
        head += f"Authorization: Bearer {token}\r\n"
    return http_raw(port, (head + "\r\n").encode(), timeout)


def http_raw(port, data, timeout=10.0):
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(data)
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    raw = b"".join(chunks).decode("utf-8", "replace")
    if not raw:
        return None, ""
    status = int(raw.split(" ", 2)[1])
    return status, raw.split("\r\n\r\n", 1)[1] if "\r\n\r\n" in raw else ""


def health(port, path):
    status, body = http_get(port, path)
    return status, json.loads(body)


def metrics(port, token=None):
    status, body = http_get(port, "/metrics", token=token)
    assert status == 200, body
    samples = {}
    for family in text_string_to_metric_families(body):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


@pytest.fixture
def http_relay(relay_factory):
    def start(**extra):
        port = free_port()
        r = relay_factory(http_listen_port=port, **extra)
        r.http_port = port
        return r

    return start


def test_is_live_and_is_ready_answer_200_with_the_leader(http_relay):
    r = http_relay()
    status, body = health(r.http_port, "/health/is-live")
    assert status == 200 and body["live"] is True and body["workers_running"] >= 1
    wait_for(lambda: health(r.http_port, "/health/is-ready")[0] == 200, what="is-ready 200")
    status, body = health(r.http_port, "/health/is-ready")
    assert body["ready"] is True
    assert body["leader"] == admin_json(r, "show info")["write_leader"]


def test_is_ready_is_503_while_paused_with_the_end_time_and_200_after_resume(http_relay):
    r = http_relay()
    wait_for(lambda: health(r.http_port, "/health/is-ready")[0] == 200, what="is-ready 200")
    assert "maintenance on" in admin(r, "pause 300s")
    status, body = health(r.http_port, "/health/is-ready")
    assert status == 503
    assert body["reason"] == "paused by maintenance"
    until = datetime.datetime.fromisoformat(body["until"].replace("Z", "+00:00"))
    left = (until - datetime.datetime.now(datetime.timezone.utc)).total_seconds()
    assert 200 < left <= 301, body
    admin(r, "resume")
    assert health(r.http_port, "/health/is-ready")[0] == 200


def test_is_ready_is_503_without_a_reachable_leader(http_relay):
    dead = free_port()  # nothing listens there
    r = http_relay(nodes=[("pg1", {"host": "127.0.0.1", "port": dead, "role": "primary"})])
    status, body = health(r.http_port, "/health/is-ready")
    assert status == 503 and body["ready"] is False
    # Before the first probe the leader is not confirmed; after it the node is down.
    assert body["reason"] in ("the write leader is not confirmed by a probe yet",
                              "the write leader is down", "no write leader")
    wait_for(lambda: health(r.http_port, "/health/is-ready")[1]["reason"] != (
        "the write leader is not confirmed by a probe yet"), what="a probe of the dead node")
    status, body = health(r.http_port, "/health/is-ready")
    assert status == 503 and body["reason"] in ("the write leader is down", "no write leader")
    # is-live does not depend on the leader.
    assert health(r.http_port, "/health/is-live")[0] == 200


def test_is_ready_is_503_while_sessions_drain_at_sigterm(http_relay):
    r = http_relay(shutdown_timeout="30s")
    wait_for(lambda: health(r.http_port, "/health/is-ready")[0] == 200, what="is-ready 200")
    conn = r.connect(autocommit=False)
    conn.execute("SELECT 1")  # a transaction is open: the graceful shutdown waits for it
    r.signal(signal.SIGTERM)
    wait_for(lambda: health(r.http_port, "/health/is-ready")[0] == 503, what="is-ready 503")
    status, body = health(r.http_port, "/health/is-ready")
    assert body["reason"] == "shutting down: sessions are draining"
    conn.rollback()
    conn.close()
    assert r.wait_exit(15) == 0


def test_metrics_parse_and_their_counters_move_with_traffic(http_relay):
    r = http_relay()
    wait_for(lambda: health(r.http_port, "/health/is-ready")[0] == 200, what="is-ready 200")
    before = metrics(r.http_port)
    with r.connect() as c:
        for _ in range(20):
            c.execute("SELECT 1").fetchone()
        during = metrics(r.http_port)
    after = metrics(r.http_port)
    assert after[("pgrelay_statements_total", ())] >= before[("pgrelay_statements_total", ())] + 20
    assert after[("pgrelay_sessions_accepted_total", ())] >= (
        before[("pgrelay_sessions_accepted_total", ())] + 1)
    assert after[("pgrelay_client_bytes_sent_total", ())] > before[
        ("pgrelay_client_bytes_sent_total", ())]
    assert after[("pgrelay_statement_latency_seconds_count", ())] >= (
        before[("pgrelay_statement_latency_seconds_count", ())] + 20)
    idle = during[("pgrelay_sessions", (("port", "write"), ("state", "idle")))]
    assert idle >= 1
    leader = admin_json(r, "show info")["write_leader"]
    assert after[("pgrelay_node_leader", (("node", leader),))] == 1
    assert after[("pgrelay_node_up", (("node", leader),))] == 1
    assert after[("pgrelay_node_statements_total", (("node", leader),))] >= 20
    assert after[("pgrelay_workers_running", ())] == after[("pgrelay_workers", ())]
    assert after[("pgrelay_maintenance", ())] == 0
    admin(r, "pause")
    assert metrics(r.http_port)[("pgrelay_maintenance", ())] == 1
    admin(r, "resume")


def test_metrics_require_the_token_when_one_is_set_and_health_checks_do_not(http_relay):
    r = http_relay(http_token="s3cret-token")
    assert http_get(r.http_port, "/metrics")[0] == 401
    assert http_get(r.http_port, "/metrics", token="wrong")[0] == 401
    assert http_get(r.http_port, "/metrics", token="s3cret-token")[0] == 200
    assert http_get(r.http_port, "/health/is-live")[0] == 200
    # The token is a secret: show config masks it.
    rows = admin_json(r, "show config")
    row = next(x for x in rows if x["key"] == "http_token")
    assert "s3cret" not in json.dumps(row)


def test_bad_requests_get_4xx_and_idle_connections_are_capped(http_relay):
    r = http_relay()
    p = r.http_port
    assert http_get(p, "/nope")[0] == 404
    assert http_get(p, "/health/is-live", method="POST")[0] == 405
    assert http_get(p, "/health/is-read-ready?lag=abc")[0] == 400
    assert http_raw(p, b"\x00\x01garbage\r\n\r\n")[0] == 400
    assert http_raw(p, b"GET /metrics HTTP/1.1\r\nX: " + b"a" * 10000 + b"\r\n\r\n")[0] == 431
    # A flood of idle connections: at most 64 are held, the rest are closed at once, and the
    # master goes on serving the console and the clients.
    idle = []
    try:
        for _ in range(100):
            idle.append(socket.create_connection(("127.0.0.1", p), timeout=5))
        closed = 0
        for s in idle:
            s.settimeout(2)
            try:
                if s.recv(1) == b"":
                    closed += 1
            except socket.timeout:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 100 - 64
        assert admin_json(r, "show info")["workers_running"] >= 1
        with r.connect() as c:
            assert c.execute("SELECT 1").fetchone() == (1,)
    finally:
        for s in idle:
            s.close()
    wait_for(lambda: http_get(p, "/health/is-live")[0] == 200, what="the endpoint to answer again")


def test_an_unanswered_request_is_closed_with_408(http_relay):
    r = http_relay()
    with socket.create_connection(("127.0.0.1", r.http_port), timeout=15) as s:
        s.sendall(b"GET /health/is-live HTTP/1.1\r\n")  # never finished
        start = time.monotonic()
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 408")
        assert time.monotonic() - start < 12


def test_is_read_ready_follows_replica_lag_with_the_lag_parameter():
    with Cluster.create(replicas=1) as cluster:
        port = free_port()
        r = start_ha_relay(cluster, agent={"health_interval": "200ms"}, read_listen_port="auto",
                           read_fallback="none", http_listen_port=port)
        try:
            wait_for(lambda: health(port, "/health/is-read-ready")[0] == 200,
                     what="is-read-ready 200")
            assert health(port, "/health/is-read-ready")[1]["replicas"] == ["pg2"]
            assert health(port, "/health/is-read-ready?lag=1000000")[0] == 200
            cluster["pg2"].pause_replay()
            with cluster["pg1"].connect() as c:
                c.execute("CREATE TABLE lagger AS SELECT g FROM generate_series(1, 20000) g")
            # Behind by well over 100 kB: a tight ?lag= refuses, the default limit still serves.
            wait_for(lambda: health(port, "/health/is-read-ready?lag=100000")[0] == 503,
                     what="is-read-ready?lag=100000 503")
            status, body = health(port, "/health/is-read-ready?lag=100000")
            assert "no replica qualifies" in body["reason"]
            assert health(port, "/health/is-read-ready")[0] == 200
            cluster["pg2"].resume_replay()
            wait_for(lambda: health(port, "/health/is-read-ready?lag=100000")[0] == 200,
                     what="is-read-ready?lag=100000 200 after catching up")
        finally:
            destroy_relay(r)


def test_is_ready_flips_to_503_when_the_leader_dies_and_back_when_a_replica_is_promoted():
    with Cluster.create(replicas=1) as cluster:
        port = free_port()
        r = start_ha_relay(cluster, agent={"health_interval": "200ms", "fall": 2},
                           http_listen_port=port)
        try:
            assert health(port, "/health/is-ready")[1]["leader"] == "pg1"
            cluster.stop_node("pg1", mode="immediate")
            wait_for(lambda: health(port, "/health/is-ready")[0] == 503,
                     what="is-ready 503 once pg1 is gone")
            cluster["pg2"].promote()
            wait_for(lambda: health(port, "/health/is-ready")[0] == 200, timeout=20,
                     what="is-ready 200 once pg2 is promoted")
            assert health(port, "/health/is-ready")[1]["leader"] == "pg2"
            with psycopg.connect(r.conninfo(), autocommit=True) as c:
                assert c.execute("SELECT pg_is_in_recovery()").fetchone() == (False,)
        finally:
            destroy_relay(r)


def test_a_port_in_use_stops_pgrelay_at_start_with_a_clear_error(relay_factory):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        r = relay_factory(http_listen_port=port, wait=False)
        assert r.wait_exit(15) == 1
        assert "http endpoint" in r.log() and "in use" in r.log().lower()


def haproxy_status(sock_path):
    """{server: status} of HAProxy's servers, from its stats socket (CSV of 'show stat')."""
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        s.sendall(b"show stat\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    lines = data.decode().splitlines()
    head = lines[0].lstrip("# ").split(",")
    sv, st = head.index("svname"), head.index("status")
    return {f[sv]: f[st] for f in (line.split(",") for line in lines[1:] if line)
            if f[sv] not in ("FRONTEND", "BACKEND")}


def test_haproxy_with_httpchk_sends_new_sessions_only_to_a_pgrelay_that_can_take_writes(
        http_relay, tmp_path):
    good = http_relay()
    bad = http_relay(nodes=[("pg1", {"host": "127.0.0.1", "port": free_port(),
                                     "role": "primary"})])
    front = free_port()
    sock = str(tmp_path / "haproxy.sock")
    cfg = tmp_path / "haproxy.cfg"
    cfg.write_text(f"""
global
    stats socket {sock} mode 600 level admin
defaults
    mode tcp
    timeout connect 2s
    timeout client 30s
    timeout server 30s
    timeout check 2s
listen pg
    bind 127.0.0.1:{front}
    balance roundrobin
    option httpchk GET /health/is-ready
    http-check expect status 200
    default-server inter 200ms fall 1 rise 1 on-marked-down shutdown-sessions
    server good 127.0.0.1:{good.port} check port {good.http_port}
    server bad 127.0.0.1:{bad.port} check port {bad.http_port}
""")
    proc = subprocess.Popen(["haproxy", "-db", "-f", str(cfg)], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: os.path.exists(sock) and haproxy_status(sock) == {
            "good": "UP", "bad": "DOWN"}, timeout=15, what="HAProxy: good UP, bad DOWN")
        for _ in range(20):  # round robin would send every other one to bad
            with psycopg.connect(host="127.0.0.1", port=front, user="postgres",
                                 dbname="postgres", connect_timeout=10) as c:
                assert c.execute("SELECT 1").fetchone() == (1,)
        # A pause takes the good one out within a check interval or so; resume brings it back.
        admin(good, "pause 60s")
        wait_for(lambda: haproxy_status(sock)["good"] == "DOWN", timeout=10,
                 what="HAProxy marks the paused pgrelay DOWN")
        admin(good, "resume")
        wait_for(lambda: haproxy_status(sock)["good"] == "UP", timeout=10,
                 what="HAProxy marks the resumed pgrelay UP")
    finally:
        proc.terminate()
        out = proc.communicate(timeout=10)[0]
    assert proc.returncode in (0, 143, -15), out
