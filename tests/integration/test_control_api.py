"""pgrelay-control, the agents' API of docs/protocol.md: registration and telemetry.

Every test gets its own store (a fresh database in the session's PostgreSQL 15) and its own
bin/pgrelay-control (or $PGRELAY_CONTROL_BIN, e.g. the AddressSanitizer build) started from a
generated control.ini; agents are simulated with Python HTTP clients (SimAgent) that register,
upload metrics and long-poll for commands in a thread, answering each command as the test's
policy says (control_helpers.py). What is asserted is what agents, operators and pgrelayctl
rely on:

  * registration, telemetry (metrics, queries, schema, config) and their listings, rates and
    latency per proxy and per node, the nodes view of every proxy's observation.

The control plane's fixtures and helpers live in control_helpers.py (test_control_*.py hold
the other areas); the names other test files import from here stay importable from here.
"""

import time

import pytest

from conftest import preload_shim_env
from control_helpers import (  # noqa: F401,F811 (fixtures used by name; all re-exported)
    ADMIN,
    API,
    Background,
    CONTROL_BIN,
    Control,
    REPO,
    SimAgent,
    TOKENS,
    ack_all,
    agents,
    control,
    control_factory,
    never,
    obs,
    start_control,
    store,
    store_rows,
    write_ini,
)


# --------------------------------------------------------------------------- #
# registration and telemetry
# --------------------------------------------------------------------------- #


def test_register_two_agents_and_list_proxies(control, agents, store):
    answer = SimAgent(control, "proxy-a").register(hostname="db-proxy-1", epoch=7,
                                                   leader="pg1", config_version=3)
    assert answer["deployment"] == "prod" and answer["node_id"] == "proxy-a"
    assert 1 <= answer["poll_wait_s"] <= 60
    SimAgent(control, "proxy-b").register(hostname="db-proxy-2", maintenance=True)
    proxies = control.proxies()
    assert set(proxies) == {"proxy-a", "proxy-b"}
    a = proxies["proxy-a"]
    for key in ("node_id", "hostname", "version", "last_seen", "live", "epoch", "leader",
                "maintenance", "config_version", "listen"):
        assert key in a
    assert a["hostname"] == "db-proxy-1" and a["epoch"] == 7 and a["leader"] == "pg1"
    assert a["config_version"] == 3 and a["live"] is True and a["listen"] == ["127.0.0.1:6432"]
    assert abs(a["last_seen"] - time.time() * 1000) < 60000
    assert proxies["proxy-b"]["maintenance"] is True and proxies["proxy-b"]["leader"] is None
    # registering again updates the record
    SimAgent(control, "proxy-a").register(hostname="db-proxy-1b")
    assert control.proxies()["proxy-a"]["hostname"] == "db-proxy-1b"
    # the other deployment sees none of them
    assert control.proxies("stage") == {}
    status, deps = control.admin("GET", "/deployments")
    assert status == 200
    by_name = {d["name"]: d for d in deps}
    assert by_name["prod"]["proxies"] == 2 and by_name["prod"]["live"] == 2
    assert by_name["stage"]["proxies"] == 0
    assert sorted(r[0] for r in store_rows(store, "SELECT node_id FROM pgrelay.proxies")) == [
        "proxy-a", "proxy-b"]


def test_metrics_arrive_with_rates_and_show_on_metrics_endpoints(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    t0 = int(time.time() * 1000)
    a.metrics(ts_ms=t0, clients=10, statements=1000, bytes_in=100, bytes_out=500, errors=1,
              latency_us=4_000_000, statements_completed=900)
    # 100 statements ended in these 2 s, 25 s of latency between them: 250 ms on average
    answer = a.metrics(ts_ms=t0 + 2000, clients=12, statements=1400, bytes_in=300,
                       bytes_out=900, errors=1, epoch=4, config_version=2,
                       latency_us=29_000_000, statements_completed=1000)
    assert answer == {"leader": None, "epoch": 0}  # no observations: no opinion
    status, rows = control.admin("GET", "/deployments/prod/metrics")
    assert status == 200
    [row] = rows
    assert row["node_id"] == "proxy-a" and row["live"] is True
    assert row["sample"]["clients"] == 12 and row["sample"]["statements"] == 1400
    assert row["rates"]["statements"] == pytest.approx(200.0)
    assert row["rates"]["bytes_out"] == pytest.approx(200.0)
    assert row["rates"]["errors"] == pytest.approx(0.0)
    assert row["latency_ms"] == pytest.approx(250.0)
    assert row["nodes"] == []  # no observation of nodes
    proxy = control.proxies()["proxy-a"]
    assert proxy["epoch"] == 4 and proxy["config_version"] == 2

    status, text = control.call("GET", "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    assert "pgrelay_control_up 1" in lines
    assert 'pgrelay_control_proxies_live{deployment="prod"} 1' in lines
    assert 'pgrelay_control_proxies_live{deployment="stage"} 0' in lines
    assert 'pgrelay_proxy_clients{deployment="prod",node_id="proxy-a"} 12' in lines
    assert 'pgrelay_proxy_statements_total{deployment="prod",node_id="proxy-a"} 1400' in lines
    assert 'pgrelay_proxy_bytes_out_total{deployment="prod",node_id="proxy-a"} 900' in lines
    assert 'pgrelay_proxy_errors_total{deployment="prod",node_id="proxy-a"} 1' in lines
    assert 'pgrelay_proxy_epoch{deployment="prod",node_id="proxy-a"} 4' in lines
    assert 'pgrelay_proxy_maintenance{deployment="prod",node_id="proxy-a"} 0' in lines
    assert any(line.startswith('pgrelay_proxy_last_seen_seconds{deployment="prod",'
                               'node_id="proxy-a"} ') for line in lines)
    assert any(line.startswith("pgrelay_control_lease_held{") and line.endswith(" 1")
               for line in lines)
    assert "# TYPE pgrelay_proxy_statements_total counter" in lines
    # latency as Prometheus users expect it: a summary's _sum (seconds) and _count
    assert "# TYPE pgrelay_proxy_statement_latency_seconds summary" in lines
    assert ('pgrelay_proxy_statement_latency_seconds_sum{deployment="prod",node_id="proxy-a"} 29'
            in lines)
    assert ('pgrelay_proxy_statement_latency_seconds_count{deployment="prod",node_id="proxy-a"}'
            ' 1000' in lines)


def test_latency_is_null_until_a_statement_ends_and_after_a_counter_reset(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    t0 = int(time.time() * 1000)

    def row():
        status, rows = control.admin("GET", "/deployments/prod/metrics")
        assert status == 200
        [r] = rows
        return r

    a.metrics(ts_ms=t0, latency_us=1000, statements_completed=1)
    assert row()["latency_ms"] is None  # one sample: no interval yet
    a.metrics(ts_ms=t0 + 1000, latency_us=1000, statements_completed=1)
    assert row()["latency_ms"] is None  # no statement ended: no average, not 0
    a.metrics(ts_ms=t0 + 2000, latency_us=4000, statements_completed=3)
    assert row()["latency_ms"] == pytest.approx(1.5)
    a.metrics(ts_ms=t0 + 3000, latency_us=10, statements_completed=1)  # the proxy restarted
    assert row()["latency_ms"] is None


def test_per_node_counters_give_rates_and_latency_per_node(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    t0 = int(time.time() * 1000)
    a.metrics(ts_ms=t0, statements=100, latency_us=1_000_000, statements_completed=100, nodes=[
        obs("pg1", statements=90, bytes_in=1000, bytes_out=5000, errors=0,
            latency_us=900_000, statements_completed=90, write_sessions=3),
        obs("pg2", in_recovery=True, statements=10, bytes_in=100, bytes_out=200, errors=0,
            latency_us=100_000, statements_completed=10, read_sessions=1)])
    # in 4 s: pg1 ran 40 statements taking 8 s (200 ms each), pg2 nothing, one error on pg2
    a.metrics(ts_ms=t0 + 4000, statements=140, latency_us=9_000_000, statements_completed=140,
              nodes=[obs("pg1", statements=130, bytes_in=3000, bytes_out=9000, errors=0,
                         latency_us=8_900_000, statements_completed=130, write_sessions=5,
                         read_sessions=1),
                     obs("pg2", in_recovery=True, statements=10, bytes_in=100, bytes_out=200,
                         errors=1, latency_us=100_000, statements_completed=10)])
    status, rows = control.admin("GET", "/deployments/prod/metrics")
    assert status == 200
    [row] = rows
    assert row["latency_ms"] == pytest.approx(200.0)
    nodes = {n["name"]: n for n in row["nodes"]}
    assert set(nodes) == {"pg1", "pg2"}
    pg1, pg2 = nodes["pg1"], nodes["pg2"]
    assert pg1["sessions"] == 6 and pg2["sessions"] == 0
    assert pg1["latency_ms"] == pytest.approx(200.0)
    assert pg1["rates"] == pytest.approx(
        {"statements": 10.0, "bytes_in": 500.0, "bytes_out": 1000.0, "errors": 0.0})
    assert pg2["latency_ms"] is None  # nothing ended on pg2
    assert pg2["rates"]["statements"] == pytest.approx(0.0)
    assert pg2["rates"]["errors"] == pytest.approx(0.25)
    # the body is kept as sent
    [sent_pg1] = [n for n in row["sample"]["nodes"] if n["name"] == "pg1"]
    assert sent_pg1["latency_us"] == 8_900_000 and sent_pg1["statements_completed"] == 130

    status, text = control.call("GET", "/metrics")
    assert status == 200
    lines = set(text.splitlines())
    labels = 'deployment="prod",node_id="proxy-a",node="pg1"'
    assert f"pgrelay_node_statements_total{{{labels}}} 130" in lines
    assert f"pgrelay_node_bytes_in_total{{{labels}}} 3000" in lines
    assert f"pgrelay_node_bytes_out_total{{{labels}}} 9000" in lines
    assert f"pgrelay_node_sessions{{{labels}}} 6" in lines
    values = dict(line.rsplit(" ", 1) for line in lines if not line.startswith("#"))
    assert float(values[f"pgrelay_node_statement_latency_seconds_sum{{{labels}}}"]) == \
        pytest.approx(8.9)
    assert f"pgrelay_node_statement_latency_seconds_count{{{labels}}} 130" in lines
    assert ('pgrelay_node_errors_total{deployment="prod",node_id="proxy-a",node="pg2"} 1'
            in lines)
    assert "# TYPE pgrelay_node_statement_latency_seconds summary" in lines
    assert "# TYPE pgrelay_node_errors_total counter" in lines

    # a node the proxy no longer reports (removed from its configuration) is no longer shown
    a.metrics(ts_ms=t0 + 5000, nodes=[obs("pg1", statements=131, latency_us=9_000_000,
                                          statements_completed=131)])
    status, rows = control.admin("GET", "/deployments/prod/metrics")
    assert [n["name"] for n in rows[0]["nodes"]] == ["pg1"]
    status, text = control.call("GET", "/metrics")
    assert 'node="pg2"' not in text and 'node="pg1"' in text


# LD_PRELOAD for pgrelay-control: while $CLOCK_FREEZE_FILE exists, the wall clock stands
# still (each thread's at the moment it first saw the file), as for calls within one ms.
CLOCK_FREEZE_SHIM = r"""
#define _GNU_SOURCE
#include <stdlib.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
static __thread struct timespec frozen;
static __thread int have_frozen;
int clock_gettime(clockid_t id, struct timespec *ts)
{
    long rc = syscall(SYS_clock_gettime, id, ts);
    const char *file = getenv("CLOCK_FREEZE_FILE");
    if (rc != 0 || (id != CLOCK_REALTIME && id != CLOCK_REALTIME_COARSE) || !file)
        return (int)rc;
    if (access(file, F_OK) != 0) {
        have_frozen = 0;
        return 0;
    }
    if (!have_frozen) {
        frozen = *ts;
        have_frozen = 1;
    }
    *ts = frozen;
    return 0;
}
"""


def test_a_node_no_longer_reported_goes_even_when_two_calls_share_a_millisecond(
        control_factory, tmp_path):
    """A proxy's last observation of its nodes decides which nodes are shown, whatever the wall
    clock says: two metrics calls in the same millisecond (here the wall clock stands still
    between them), the second without pg2, and pg2 is no longer shown. (Before, a node counted
    as current when its newest sample had the observation's time in ms.)"""
    frozen = tmp_path / "frozen"
    control = control_factory(env={**preload_shim_env(str(tmp_path), "freeze", CLOCK_FREEZE_SHIM),
                                   "CLOCK_FREEZE_FILE": str(frozen)})
    a = SimAgent(control, "proxy-a")
    a.register()
    frozen.touch()
    a.metrics(nodes=[obs("pg1", statements=1), obs("pg2", in_recovery=True, statements=1)])
    status, rows = control.admin("GET", "/deployments/prod/metrics")
    assert status == 200 and [n["name"] for n in rows[0]["nodes"]] == ["pg1", "pg2"], rows
    a.metrics(nodes=[obs("pg1", statements=2)])
    status, rows = control.admin("GET", "/deployments/prod/metrics")
    assert [n["name"] for n in rows[0]["nodes"]] == ["pg1"], rows
    status, text = control.call("GET", "/metrics")
    assert 'node="pg2"' not in text and 'node="pg1"' in text
    frozen.unlink()


def test_queries_schema_and_config_uploads_are_shown(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    query = {"session": 17, "client": "10.1.2.3:51000", "application_name": "billing",
             "user": "app", "database": "shop", "node": "pg1", "state": "active",
             "duration_ms": 1520, "text": "SELECT * FROM orders WHERE id = $1"}
    before_ms = time.time() * 1000
    assert a.post("/queries", {"queries": [query]}) == (204, "")
    status, rows = control.admin("GET", "/deployments/prod/queries")
    assert status == 200 and len(rows) == 1, rows
    # as_of: when the proxy reported it (milliseconds since the Unix epoch)
    as_of = rows[0].pop("as_of")
    assert before_ms - 1000 <= as_of <= time.time() * 1000 + 1000, as_of
    assert rows == [dict(query, node_id="proxy-a")]
    bad = dict(query, application_name=7)
    status, answer = a.post("/queries", {"queries": [bad]})
    assert status == 400 and "application_name" in answer["error"], answer

    tables = [{"schema": "public", "name": "orders", "columns": [{"name": "id", "type": "bigint"}],
               "indexes": [{"name": "orders_pkey", "definition": "CREATE UNIQUE INDEX ..."}]}]
    assert a.post("/schema", {"database": "shop", "tables": tables}) == (204, "")
    status, rows = control.admin("GET", "/deployments/prod/schema")
    assert status == 200 and rows[0]["database"] == "shop" and rows[0]["tables"] == tables

    assert a.post("/config", {"config_version": 5, "config": {"listen_port": "6432"}}) == (204, "")
    assert control.proxies()["proxy-a"]["config_version"] == 5


def test_nodes_view_aggregates_every_proxys_observation(control):
    a, b = SimAgent(control, "proxy-a"), SimAgent(control, "proxy-b")
    a.register()
    b.register()
    a.metrics(nodes=[obs("pg1", lsn=100), obs("pg2", in_recovery=True, lag_bytes=10)])
    b.metrics(nodes=[obs("pg1", lsn=120), obs("pg2", up=False, in_recovery=True)])
    status, rows = control.admin("GET", "/deployments/prod/nodes")
    assert status == 200
    nodes = {r["name"]: r for r in rows}
    assert nodes["pg1"]["leader"] is True and nodes["pg2"]["leader"] is False
    assert nodes["pg1"]["health"] == {"proxy-a": "up", "proxy-b": "up"}
    assert nodes["pg2"]["health"] == {"proxy-a": "up", "proxy-b": "down"}
    assert nodes["pg1"]["host"] == "127.0.0.1" and nodes["pg1"]["port"] == 5432
    assert "lag_bytes" in nodes["pg2"] and "role" in nodes["pg2"]
