"""Query plans in the control plane: each agent uploads its plans (and plan changes) with its
running queries; pgrelay-control keeps them per deployment in its store; operators read them
with GET /api/v1/deployments/NAME/plans and ``pgrelayctl show-plans``; a running query carries
the id of its plan.

One real pgrelay-control (store in the test PostgreSQL) and one proxy in front of the same
PostgreSQL, declared automatically (auto_declare).
"""

import os
import threading
import uuid

import pytest

from conftest import wait_for
from control_e2e_helpers import (DEPLOYMENT, PROD_TOKEN, ControlPlane, cleanup_dir, ctl_json,
                                 make_root, run_ctl)

NODE_ID = "plans-proxy"


@pytest.fixture(scope="module")
def control(pg):
    root = make_root()
    store_db = "ctl_plans_" + uuid.uuid4().hex[:10]
    pg.query(f"CREATE DATABASE {store_db}")
    cp = ControlPlane(os.path.join(root, "control"),
                      f"host={pg.host} port={pg.port} user=postgres dbname={store_db} "
                      "connect_timeout=5")
    os.makedirs(cp.workdir)
    try:
        cp.start()
        yield cp
    finally:
        cp.stop()
        pg.query(f"DROP DATABASE IF EXISTS {store_db} WITH (FORCE)")
        cleanup_dir(root)


@pytest.fixture
def proxy(control, relay_factory):
    agent = {"plan_slow_threshold": "500ms", "plan_max_age": "0"}
    r = relay_factory(env={"NODE_ID": NODE_ID},
                      sections={"agent": agent,
                                "control": {"endpoint": control.url, "token": PROD_TOKEN,
                                            "metrics_interval": "250ms",
                                            "active_queries_interval": "300ms"}})
    wait_for(lambda: NODE_ID in control.proxies(), what="the proxy registered")
    return r


def api_plans(control, query=""):
    return control.get(f"/deployments/{DEPLOYMENT}/plans{query}")


def wait_api_plan(control, fragment, timeout=15, **match):
    def find():
        for p in api_plans(control):
            if fragment in p["text"] and all(p.get(k) == v for k, v in match.items()):
                return p
        return None
    wait_for(lambda: find() is not None, timeout=timeout, what=f"a plan of {fragment!r}")
    return find()


def test_a_slow_statement_s_plan_reaches_the_api_and_pgrelayctl(control, proxy):
    with proxy.connect() as c:
        c.execute("SELECT pg_sleep(0.7), 'to the control plane' AS upload_me")
    p = wait_api_plan(control, "upload_me", reason="slow")
    assert p["node_id"] == NODE_ID and p["node"] == "pg1" and p["user"] == "postgres"
    assert p["text"] == "SELECT pg_sleep($1), $2 AS upload_me"
    assert p["top_node"] == "Result" and p["error"] is None
    assert p["plan"][0]["Plan"]["Node Type"] == "Result"
    assert p["duration_ms"] >= 700

    ctl = run_ctl(control, "show-plans", "--query", "upload_me")
    assert ctl.returncode == 0, ctl.stderr
    assert f"plan {p['id']}" in ctl.stdout and "reason slow" in ctl.stdout
    assert "SELECT pg_sleep($1), $2 AS upload_me" in ctl.stdout
    assert "\n  Result  (cost=0.00..0.01 rows=1 width=36)\n" in ctl.stdout, ctl.stdout
    assert "    Output: pg_sleep(" in ctl.stdout, ctl.stdout

    rc, body, err = ctl_json(control, "show-plans", "--query", "upload_me")
    assert rc == 0 and [x["id"] for x in body] == [p["id"]], (body, err)
    rc, body, err = ctl_json(control, "show-plans", "--query", "no statement has this text")
    assert rc == 0 and body == []


def test_a_running_query_carries_the_id_of_its_plan(control, proxy):
    done = threading.Event()

    def run():
        with proxy.connect() as c:
            c.execute("SELECT pg_sleep(5), 'linked' AS running_link")
        done.set()

    t = threading.Thread(target=run)
    t.start()
    try:
        p = wait_api_plan(control, "running_link", reason="running", timeout=4)

        def linked():
            qs = control.get(f"/deployments/{DEPLOYMENT}/queries")
            return [q for q in qs if "running_link" in q["text"] and q.get("plan_id") == p["id"]]
        wait_for(linked, timeout=4, what="the running query with its plan_id")
        assert not done.is_set()
    finally:
        t.join(15)


@pytest.fixture
def change_table(pg):
    pg.query("DROP TABLE IF EXISTS ctl_plan_chg")
    pg.query("CREATE TABLE ctl_plan_chg (id int, v text)")
    pg.query("INSERT INTO ctl_plan_chg SELECT g, 'v' || g FROM generate_series(1, 20000) g")
    pg.query("ANALYZE ctl_plan_chg")
    yield
    pg.query("DROP TABLE IF EXISTS ctl_plan_chg")


def test_a_plan_change_is_listed_by_show_plans_changed_with_both_plans(control, proxy, pg,
                                                                       change_table):
    tag = "v_" + uuid.uuid4().hex[:8]  # a statement of its own, whatever the store holds
    q = f"SELECT v AS {tag}, pg_sleep(0.6) FROM ctl_plan_chg WHERE id = 4242"
    with proxy.connect() as c:
        c.execute(q)
    first = wait_api_plan(control, tag, reason="slow")
    assert first["top_node"].startswith("Seq Scan"), first
    pg.query("CREATE INDEX ctl_plan_chg_id ON ctl_plan_chg (id)")
    pg.query("ANALYZE ctl_plan_chg")
    with proxy.connect() as c:
        c.execute(q)
    changes = f"/deployments/{DEPLOYMENT}/plans?changed=1&id={first['id']}"
    wait_for(lambda: control.get(changes), what="a plan change in the control plane")
    [change] = control.get(changes)
    assert change["id"] == first["id"] and change["node_id"] == NODE_ID
    assert change["old_plan"][0]["Plan"]["Node Type"] == "Seq Scan"
    assert "ctl_plan_chg_id" in str(change["new_plan"])
    ctl = run_ctl(control, "show-plans", "--changed", "--query", tag)
    assert ctl.returncode == 0, ctl.stderr
    out = ctl.stdout
    assert "before:" in out and "after:" in out
    assert out.index("Seq Scan on public.ctl_plan_chg") < out.index("after:") < \
        out.index("using ctl_plan_chg_id on public.ctl_plan_chg"), out
    wait_for(lambda: wait_api_plan(control, tag)["changes"] == 1,
             what="the plan's change count")
    # The control plane's /metrics counts the proxy's plan changes (from its metrics reports).
    import re

    def counted():
        from conftest import http_call
        status, text = http_call(control.port, "GET", "/metrics")
        m = re.search(r'^pgrelay_proxy_plan_changes_total\{deployment="prod",node_id="'
                      + NODE_ID + r'"\} (\d+)', text, re.M)
        return m and int(m.group(1)) >= 1
    wait_for(counted, what="pgrelay_proxy_plan_changes_total in the control plane's /metrics")


@pytest.mark.parametrize("body, says", [
    ({"node_id": NODE_ID, "plans": [{"id": "x"}]}, "missing field plans[0].node"),
    ({"node_id": NODE_ID, "plans": "no"}, "plans"),
    ({"node_id": NODE_ID, "plans": [{"id": "x", "node": "n", "database": "d", "user": "u",
                                     "text": "t", "reason": "slow", "duration_ms": -1,
                                     "planned_at_ms": 1}]}, "plans[0].duration_ms"),
    ({"node_id": NODE_ID, "changes": [{"id": "x", "node": "n", "database": "d", "user": "u",
                                       "text": "t"}]}, "missing field changes[0].at_ms"),
])
def test_a_malformed_upload_is_refused_with_400(control, proxy, body, says):
    status, answer = control.api("POST", "/agent/plans", body, token=PROD_TOKEN)
    assert status == 400 and says in answer["error"], (status, answer)
    status, _ = control.api("GET", f"/deployments/{DEPLOYMENT}/plans?changed=maybe")
    assert status == 400


class ShortRetentionControlPlane(ControlPlane):
    """The control plane with telemetry_retention = 3s."""

    def _write_ini(self):
        super()._write_ini()
        with open(self.conf) as f:
            text = f.read()
        with open(self.conf, "w") as f:
            f.write(text.replace("[control]\n", "[control]\ntelemetry_retention = 3s\n", 1))


def test_plans_older_than_telemetry_retention_are_not_served(pg, relay_factory):
    root = make_root()
    store_db = "ctl_plans_ret_" + uuid.uuid4().hex[:10]
    pg.query(f"CREATE DATABASE {store_db}")
    cp = ShortRetentionControlPlane(os.path.join(root, "control"),
                                    f"host={pg.host} port={pg.port} user=postgres "
                                    f"dbname={store_db} connect_timeout=5")
    os.makedirs(cp.workdir)
    try:
        cp.start()
        r = relay_factory(env={"NODE_ID": NODE_ID},
                          sections={"agent": {"plan_slow_threshold": "500ms"},
                                    "control": {"endpoint": cp.url, "token": PROD_TOKEN,
                                                "active_queries_interval": "300ms"}})
        with r.connect() as c:
            c.execute("SELECT pg_sleep(0.7) AS short_lived")
        p = wait_api_plan(cp, "short_lived", reason="slow")
        assert api_plans(cp, f"?id={p['id']}") == [p]
        wait_for(lambda: api_plans(cp, f"?id={p['id']}") == [], timeout=10,
                 what="the plan gone after telemetry_retention")
    finally:
        cp.stop()
        pg.query(f"DROP DATABASE IF EXISTS {store_db} WITH (FORCE)")
        cleanup_dir(root)
