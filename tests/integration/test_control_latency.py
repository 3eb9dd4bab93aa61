"""Statement latency percentiles through the control plane: each agent uploads its proxy's
per-node latency histogram with its metrics (``latency_buckets``, docs/protocol.md), and the
control plane's metrics view and ``pgrelayctl show-metrics`` give the p99 of the statements
that ended in the last 10 seconds."""

import os
import time
import uuid

import psycopg
import pytest

from conftest import admin_json, start_relay, wait_for
from control_e2e_helpers import (PROD_TOKEN, ControlPlane, cleanup_dir, ctl_json, make_root,
                                 run_ctl, table_rows)
from test_control_api import SimAgent, control, control_factory, obs, store  # noqa: F401 (fixtures)

FAST_BUCKET = 2   # le 0.5 ms
SLOW_BUCKET = 10  # le 250 ms: (100, 250] ms
N_BUCKETS = 19


def buckets(**at):
    """19 counts, the given ones set: buckets(b2=95, b10=5)."""
    h = [0] * N_BUCKETS
    for k, v in at.items():
        h[int(k[1:])] = v
    return h


def metrics_row(control, node_id="proxy-a"):
    status, rows = control.admin("GET", "/deployments/prod/metrics")
    assert status == 200, rows
    [row] = [r for r in rows if r["node_id"] == node_id]
    return row


def test_p99_per_node_and_per_proxy_comes_from_the_windows_bucket_differences(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    t0 = int(time.time() * 1000)
    # before the window: 1000 slow statements on pg1 that must not count
    a.metrics(ts_ms=t0, nodes=[obs("pg1", latency_buckets=buckets(b12=1000)),
                               obs("pg2", in_recovery=True)])
    assert metrics_row(control)["p99_ms"] is None  # one sample: no interval yet
    # in the window: pg1 ran 95 fast and 5 slow statements; pg2 (an older agent) sent no buckets
    a.metrics(ts_ms=t0 + 1000, nodes=[obs("pg1", latency_buckets=buckets(b2=95, b10=5, b12=1000)),
                                      obs("pg2", in_recovery=True)])
    row = metrics_row(control)
    nodes = {n["name"]: n for n in row["nodes"]}
    assert 100 < nodes["pg1"]["p99_ms"] <= 250, nodes["pg1"]
    assert nodes["pg2"]["p99_ms"] is None
    assert 100 < row["p99_ms"] <= 250, row
    # the body is kept as sent
    [sent] = [n for n in row["sample"]["nodes"] if n["name"] == "pg1"]
    assert sent["latency_buckets"] == buckets(b2=95, b10=5, b12=1000)
    # a proxy restart (counts went down) gives no percentile for that interval
    a.metrics(ts_ms=t0 + 2000, nodes=[obs("pg1", latency_buckets=buckets(b2=3))])
    assert metrics_row(control)["nodes"][0]["p99_ms"] is None


@pytest.mark.parametrize("bad", [[0] * 18, [0] * 20, "many", [0] * 18 + [-1], [0.5] * 19,
                                 [0] * 18 + ["1"]])
def test_malformed_latency_buckets_are_400_and_not_recorded(control, bad):
    a = SimAgent(control, "proxy-a")
    a.register()
    status, answer = a.post("/metrics", {"ts_ms": int(time.time() * 1000),
                                         "nodes": [obs("pg1", latency_buckets=bad)]})
    assert status == 400, answer
    assert "latency_buckets" in str(answer), answer
    assert metrics_row(control)["sample"] is None


@pytest.fixture(scope="module")
def plane(pg):
    root = make_root()
    store_db = "ctl_lat_" + uuid.uuid4().hex[:10]
    pg.query(f"CREATE DATABASE {store_db}")
    p = ControlPlane(os.path.join(root, "control"),
                     f"host={pg.host} port={pg.port} user=postgres dbname={store_db} "
                     "connect_timeout=5")
    os.makedirs(p.workdir)
    try:
        p.start()
        yield p
    finally:
        p.stop()
        cleanup_dir(root)


def test_show_metrics_gives_the_p99_a_real_proxy_measured(pg, plane):
    relay = start_relay(pg, extra={"workers": 2},
                        sections={"agent": {"health_interval": "200ms"},
                                  "control": {"endpoint": plane.url, "token": PROD_TOKEN,
                                              "metrics_interval": "250ms"}},
                        env={"NODE_ID": "lat-a"})
    try:
        with psycopg.connect(relay.conninfo(), autocommit=True, prepare_threshold=None) as c:
            for i in range(100):
                c.execute("select pg_sleep(0.2)" if i % 20 == 0 else "select 1").fetchall()
        [shown] = [r for r in admin_json(relay, "show latency") if r["node"] == "pg1"]
        assert shown["statements"] == 100 and 100 < shown["p99_ms"] <= 250, shown

        def p99():
            rc, rows, err = ctl_json(plane, "show-metrics")
            assert rc == 0, (rows, err)
            mine = [r for r in rows if r["node_id"] == "lat-a"]
            if not mine or not mine[0]["sample"]:
                return None
            nodes = {n["name"]: n for n in mine[0]["nodes"]}
            sent = {n["name"]: n for n in mine[0]["sample"]["nodes"]}
            if sum(sent["pg1"].get("latency_buckets", [])) != 100:
                return None
            return mine[0]["p99_ms"], nodes["pg1"]["p99_ms"]

        wait_for(lambda: p99() is not None and None not in p99(), timeout=15,
                 what="lat-a's 100 statements in show-metrics with a p99")
        proxy_p99, node_p99 = p99()
        assert 100 < node_p99 <= 250 and 100 < proxy_p99 <= 250, (proxy_p99, node_p99)
        # the table form has the column
        p = run_ctl(plane, "show-metrics")
        assert p.returncode == 0, p.stderr
        rows = [r for r in table_rows(p.stdout) if r["node_id"] == "lat-a" and r["node"] == "pg1"]
        assert rows and 100 < float(rows[0]["p99_ms"]) <= 250, p.stdout
    finally:
        relay.stop()
        ctl_json(plane, "delete-proxy", "lat-a")
