"""Statement latency histograms per node: /metrics exports them as a Prometheus histogram,
and the admin console's ``show latency`` reports p50/p95/p99 from the same buckets.

Each worker counts the statements it relays in its own rows of shared memory; the readers
(the master's HTTP endpoint and console) sum them. A statement is counted when the
ReadyForQuery that ends it passes through the worker, before the client reads it, so the
numbers below are exact once the client has its answer.
"""

import socket
import time

import psycopg
from prometheus_client.parser import text_string_to_metric_families

from conftest import admin, admin_json, free_port

HIST = "pgrelay_node_statement_latency_seconds"
BOUNDS = ["0.0001", "0.00025", "0.0005", "0.001", "0.0025", "0.005", "0.01", "0.025", "0.05",
          "0.1", "0.25", "0.5", "1", "2.5", "5", "10", "30", "60", "+Inf"]


def http_metrics(port):
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        chunks = []
        while True:
            b = s.recv(65536)
            if not b:
                break
            chunks.append(b)
    raw = b"".join(chunks).decode()
    assert raw.startswith("HTTP/1.1 200"), raw[:200]
    return raw.split("\r\n\r\n", 1)[1]


def histogram(port, node):
    """{le: cumulative count}, sum, count of one node, through prometheus_client's parser."""
    families = {f.name: f for f in text_string_to_metric_families(http_metrics(port))}
    fam = families[HIST]
    assert fam.type == "histogram"
    buckets, total, count = {}, None, None
    for s in fam.samples:
        if s.labels.get("node") != node:
            continue
        if s.name == HIST + "_bucket":
            buckets[s.labels["le"]] = s.value
        elif s.name == HIST + "_sum":
            total = s.value
        elif s.name == HIST + "_count":
            count = s.value
    return buckets, total, count


def run_mix(relay, fast, slow, sleep=0.2):
    """`fast` trivial statements and `slow` pg_sleep(sleep), spread over one session; returns
    (slow?, seconds the client waited) per statement. psycopg does not prepare behind our
    back (prepare_threshold=None), so each statement is one round trip, counted once."""
    every = (fast + slow) // slow
    times = []
    with psycopg.connect(relay.conninfo(), autocommit=True, prepare_threshold=None) as c:
        for i in range(fast + slow):
            is_slow = i % every == 0 and i // every < slow
            t0 = time.monotonic()
            c.execute(f"select pg_sleep({sleep})" if is_slow else "select 1").fetchall()
            times.append((is_slow, time.monotonic() - t0))
    assert sum(1 for s, _ in times if s) == slow
    return times


def test_metrics_has_a_latency_histogram_per_node_that_moves_with_traffic(relay_factory):
    port = free_port()
    r = relay_factory(http_listen_port=port, workers=2)
    leader = admin_json(r, "show info")["write_leader"]
    before, sum0, count0 = histogram(port, leader)
    assert list(before) == BOUNDS, "every fixed bucket from 100 us to 60 s, then +Inf"
    assert before["+Inf"] == count0

    run_mix(r, fast=20, slow=2)

    after, sum1, count1 = histogram(port, leader)
    assert count1 - count0 == 22
    assert after["+Inf"] == count1
    values = [after[le] for le in BOUNDS]
    assert values == sorted(values), "buckets are cumulative"
    # the two pg_sleep(0.2) are over 100 ms and under 250 ms
    slow = (after["0.25"] - before["0.25"]) - (after["0.1"] - before["0.1"])
    assert slow == 2
    assert after["0.1"] - before["0.1"] == 20
    assert 0.4 <= sum1 - sum0 < 0.4 + 20 * 0.1 + 0.1


def test_show_latency_p99_of_95_fast_and_5_slow_lands_in_the_slow_bucket(relay_factory):
    r = relay_factory(workers=2)
    leader = admin_json(r, "show info")["write_leader"]
    times = run_mix(r, fast=95, slow=5)
    rows = {row["node"]: row for row in admin_json(r, "show latency")}
    row = rows[leader]
    assert row["statements"] == 100
    # the client's own times: five slow in (100, 250] ms, all fast ones under 100 ms
    assert all(0.1 < t <= 0.25 for s, t in times if s)
    assert all(t < 0.1 for s, t in times if not s)
    assert 100 < row["p99_ms"] <= 250, row
    assert row["p50_ms"] < 100 and row["p95_ms"] < 100, row
    assert abs(row["avg_ms"] - sum(t for _, t in times) * 1000 / 100) < 5, row
    # the table form says the same and ends with an empty line
    table = admin(r, "show latency")
    assert table.endswith("\n\n")
    head = table.splitlines()[0].split()
    assert head[:6] == ["node", "statements", "avg_ms", "p50_ms", "p95_ms", "p99_ms"], table


def test_show_latency_before_any_statement_has_no_percentiles(relay_factory):
    r = relay_factory()
    for row in admin_json(r, "show latency"):
        assert row["statements"] == 0
        assert row["p50_ms"] is None and row["p99_ms"] is None and row["avg_ms"] is None
