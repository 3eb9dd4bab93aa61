"""The control plane end to end: pgrelay-control, two real pgrelay proxies and pgrelayctl.

The fleet (control_fleet.py):

  * a store database in the session's PostgreSQL, and bin/pgrelay-control serving deployment
    ``prod`` (proxy_timeout 3 s);
  * a cluster: pg1 primary + pg2 streaming replica (cluster.py);
  * two pgrelay proxies, NODE_ID proxy-a and proxy-b, each a separate "host" (own mount
    namespace, see control_e2e_helpers.py) running the same pgrelay.ini: health_interval
    200ms, fall 2, rise 1, [control] endpoint/token, metrics every 250 ms, running queries
    every 500 ms, control_grace_period 2 s.

Every test gets it in the same known state (pg1 the leader of both proxies under one epoch, the
configuration as built, no maintenance): the fleet the previous test left once it is checked to
be so, else a new one (a test that moves the leader or commits a configuration leaves it
changed). So the tests pass in any order and alone. Each one states what an operator relies on
and asserts it from the outside (pgrelayctl, the HTTP API, the proxies' admin consoles and
sessions through the proxies).
"""

import os
import re
import socket
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

import loadgen
from cluster import wait_probe_rounds
from conftest import admin, admin_json, wait_for
from loadgen import InThread
from control_e2e_helpers import (
    ADMIN_TOKEN,
    API,
    DEPLOYMENT,
    PROD_TOKEN,
    http,
    info,
    nodes_view,
    running_config,
    set_ini_key,
    start_proxy,
    stop_proxy,
    table_rows,
)
from control_fleet import ADDRESSES, FleetKeeper, wait_reports

EXIT_OK, EXIT_FAILED = 0, 1


@pytest.fixture(scope="module")
def fleet_keeper(pg):
    keeper = FleetKeeper(pg, "ctl_e2e")
    yield keeper
    keeper.close()


@pytest.fixture
def fleet(fleet_keeper):
    """The fleet in its state as built (control_fleet.py): pg1 the leader, pg2 its replica."""
    return fleet_keeper.get()


def unread_at_proxy(relay, conn):
    """True when bytes the client ``conn`` sent wait unread in its session's socket at
    ``relay`` (the proxy's end of the connection: Recv-Q in ss)."""
    with socket.fromfd(conn.fileno(), socket.AF_INET, socket.SOCK_STREAM) as s:
        client_port = s.getsockname()[1]
    out = subprocess.run(["ss", "-tnH", "state", "established", "src", relay.host,
                          f"( sport = :{relay.port} and dport = :{client_port} )"],
                         capture_output=True, text=True, check=True).stdout.split()
    return bool(out) and int(out[0]) > 0


def total_statements(relay):
    """The statements ``relay`` has relayed (show stats, all workers)."""
    [total] = [w for w in admin_json(relay, "show stats")["workers"] if w["worker"] == "total"]
    return total["statements"]


def node_of_session(relay):
    """The database node a new write session through ``relay`` lands on (its cluster_name)."""
    with relay.connect() as c:
        return c.execute("SHOW cluster_name").fetchone()[0]


# --------------------------------------------------------------------------- #
# 1. registration
# --------------------------------------------------------------------------- #


def test_both_proxies_show_up_live_with_version_epoch_and_leader(fleet):
    def agree():
        p = fleet.ctl_json("show-proxies")
        if p[0] != EXIT_OK:
            return None
        rows = {r["node_id"]: r for r in p[1]}
        if all(rows.get(n, {}).get("epoch") == info(fleet.proxies[n])["epoch"] for n in ADDRESSES):
            return rows
        return None

    rows = wait_for(agree, timeout=10, interval=0.2,
                    what="show-proxies epochs equal to the proxies' own")
    for node_id, relay in fleet.proxies.items():
        row, own = rows[node_id], info(relay)
        assert row["live"] is True, row
        assert row["version"] == own["version"], (row, own)
        assert row["leader"] == own["write_leader"] == "pg1", (row, own)
        assert row["epoch"] == own["epoch"] >= 1, (row, own)
        assert f"pgrelay-e2e-host:{fleet.listen_port}" in row["listen"], row
        assert row["maintenance"] is False

    p = fleet.ctl("show-proxies")
    assert p.returncode == EXIT_OK, p.stderr
    table = {r["node_id"]: r for r in table_rows(p.stdout)}
    for node_id in ADDRESSES:
        assert table[node_id]["live"] == "yes", p.stdout
        assert table[node_id]["leader"] == "pg1", p.stdout
        assert table[node_id]["epoch"] == str(rows[node_id]["epoch"]), p.stdout
        assert table[node_id]["version"] == rows[node_id]["version"], p.stdout

    dep = fleet.control.deployment()
    assert dep["live"] >= 2 and dep["leader"] == "pg1", dep


# --------------------------------------------------------------------------- #
# 2. metrics
# --------------------------------------------------------------------------- #


def test_metrics_arrive_continuously_and_statement_counters_grow(fleet):
    path = f"/deployments/{DEPLOYMENT}/metrics"

    def by_node():
        return {m["node_id"]: m for m in fleet.control.get(path)}

    first = by_node()
    wait_reports(fleet.control, 2)
    second = by_node()
    for node_id in ADDRESSES:
        assert second[node_id]["live"] is True
        assert second[node_id]["received_ms"] > first[node_id]["received_ms"], (
            first[node_id], second[node_id])
        assert second[node_id]["sample"]["ts_ms"] > first[node_id]["sample"]["ts_ms"]

    before = second["proxy-b"]["sample"]["statements"]
    with fleet.b.connect() as c:
        for i in range(25):
            c.execute("SELECT %s::int", (i,))

    def grown():
        m = by_node()["proxy-b"]
        return m if m["sample"]["statements"] >= before + 25 else None

    m = wait_for(grown, timeout=5, interval=0.1,
                 what="proxy-b's statements counter to grow by 25 at the control plane")
    assert m["rates"]["statements"] is not None and m["rates"]["statements"] > 0, m


def test_statement_latency_reaches_the_control_plane_for_the_node_that_ran_it(fleet):
    """SELECT pg_sleep(0.2) through proxy-a, in a loop: the control plane shows an average
    latency of at least 0.2 s (and well under 2 s) for proxy-a and for its write leader, the
    leader's statement count grows and the replica's does not, and /metrics carries the
    latency summaries."""
    path = f"/deployments/{DEPLOYMENT}/metrics"
    leader = info(fleet.a)["write_leader"]
    [replica] = [n for n in ("pg1", "pg2") if n != leader]

    def proxy_a():
        return next(m for m in fleet.control.get(path) if m["node_id"] == "proxy-a")

    def reported(m, node):  # the agent's cumulative counters of a node, as it sent them
        return next(n for n in m["sample"]["nodes"] if n["name"] == node)

    stop = threading.Event()
    slept = []  # one entry per pg_sleep(0.2) done

    def sleep_in_a_loop():
        with fleet.a.connect() as c:
            # psycopg prepares a statement run 5 times (a Parse + Sync round trip of its own,
            # which the proxy counts as a statement of a few microseconds): not here
            c.prepare_threshold = None
            while not stop.is_set():
                c.execute("SELECT pg_sleep(0.2)")
                slept.append(1)
        return len(slept)

    sleeper = InThread(sleep_in_a_loop)
    try:
        # the counters as of a report sent after the loop's first statement ended: every
        # statement through proxy-a that ends after it is one of the loop's (the fleet has no
        # other session), so the deltas from here are pg_sleep(0.2)'s alone
        wait_for(lambda: slept, timeout=10, what="the first pg_sleep(0.2)")
        wait_reports(fleet.control, 1, node_ids=["proxy-a"])
        first = proxy_a()

        # The control plane averages over the samples of its last 10 s (control/views.c): a
        # statement that ended before this test (another test's, through proxy-a) counts until
        # it leaves that window. So the average of pg_sleep(0.2) is waited for, within the
        # window and a margin: a latency never reported, or reported too low, still times out.
        def measured():
            m = proxy_a()
            node = next((n for n in m["nodes"] if n["name"] == leader), None)
            done = reported(m, leader)["statements_completed"]
            if node and node["latency_ms"] is not None and node["latency_ms"] >= 200 and \
                    m["latency_ms"] is not None and m["latency_ms"] >= 200 and \
                    done >= reported(first, leader)["statements_completed"] + 3:
                return m
            return None

        m = wait_for(measured, timeout=20, interval=0.2,
                     what="proxy-a's latency of pg_sleep(0.2) on the leader at the control plane")
    finally:
        stop.set()
    ran = sleeper.result(timeout=10)
    assert ran >= 3

    nodes = {n["name"]: n for n in m["nodes"]}
    assert 200 <= nodes[leader]["latency_ms"] < 2000, nodes[leader]
    assert 200 <= m["latency_ms"] < 2000, m
    assert nodes[leader]["rates"]["statements"] > 0, nodes[leader]
    # per node, from the agent's own cumulative counters: the leader ran them, not the replica
    lead0, lead1 = reported(first, leader), reported(m, leader)
    assert lead1["statements"] >= lead0["statements"] + 3, ("statements", lead0, lead1)
    assert lead1["bytes_in"] > lead0["bytes_in"] and lead1["bytes_out"] > lead0["bytes_out"]
    done = lead1["statements_completed"] - lead0["statements_completed"]
    assert 0.2 <= (lead1["latency_us"] - lead0["latency_us"]) / done / 1e6 < 2, \
        (done, lead1["latency_us"] - lead0["latency_us"], lead0, lead1)
    assert reported(m, replica)["statements"] == reported(first, replica)["statements"]
    assert nodes[replica]["latency_ms"] is None, nodes[replica]
    # the proxy's totals count them too
    assert m["sample"]["statements_completed"] >= first["sample"]["statements_completed"] + done

    status, text = http(fleet.control.port, "GET", "/metrics")
    assert status == 200
    values = dict(line.rsplit(" ", 1) for line in text.splitlines() if not line.startswith("#"))
    labels = f'deployment="{DEPLOYMENT}",node_id="proxy-a",node="{leader}"'
    count = int(values[f"pgrelay_node_statement_latency_seconds_count{{{labels}}}"])
    total = float(values[f"pgrelay_node_statement_latency_seconds_sum{{{labels}}}"])
    assert count >= 3 and total >= 0.2 * done, (count, total)
    assert int(values[f"pgrelay_node_statements_total{{{labels}}}"]) >= lead1["statements"]
    proxy_labels = f'deployment="{DEPLOYMENT}",node_id="proxy-a"'
    assert int(values[f"pgrelay_proxy_statement_latency_seconds_count{{{proxy_labels}}}"]) >= count
    assert "# TYPE pgrelay_proxy_statement_latency_seconds summary" in text.splitlines()


# --------------------------------------------------------------------------- #
# 3. running queries
# --------------------------------------------------------------------------- #


def test_a_running_statement_shows_in_show_queries_normalised(fleet):
    conn = fleet.a.connect(application_name="nightly-report")
    sleeper = InThread(lambda: conn.execute("SELECT pg_sleep(5)"))
    try:
        def seen():
            rc, rows, err = fleet.ctl_json("show-queries")
            assert rc == EXIT_OK, err
            # this session's: an earlier test's statement may still be in the last upload
            return [q for q in rows if q["text"] == "SELECT pg_sleep($1)"
                    and q.get("application_name") == "nightly-report"]

        [q] = wait_for(seen, timeout=5, interval=0.2, what="pg_sleep in show-queries")
        assert q["node_id"] == "proxy-a", q
        assert q["user"] == "postgres" and q["database"] == "postgres", q
        assert q["node"] == info(fleet.a)["write_leader"], q
        assert q["state"] == "active" and q["duration_ms"] >= 0, q
        assert q["application_name"] == "nightly-report", q
        # when proxy-a reported it: within the last upload interval (5 s) and a margin
        assert time.time() * 1000 - 10000 <= q["as_of"] <= time.time() * 1000 + 1000, q
        assert q["tls"] == "", q  # the client is in clear (test_client_tls: the version and cipher)

        p = fleet.ctl("show-queries")
        assert p.returncode == EXIT_OK, p.stderr
        rows = [r for r in table_rows(p.stdout) if r.get("text") == "SELECT pg_sleep($1)"
                and r.get("application_name") == "nightly-report"]
        assert rows and rows[0]["node_id"] == "proxy-a", p.stdout
        assert rows[0]["application_name"] == "nightly-report", p.stdout
        assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", rows[0]["as_of"]), p.stdout
    finally:
        conn.cancel()
        with pytest.raises(psycopg.errors.QueryCanceled):
            sleeper.result(timeout=10)
        conn.close()


# --------------------------------------------------------------------------- #
# 4. maintenance
# --------------------------------------------------------------------------- #


def test_maintenance_holds_statements_on_every_proxy_until_turned_off(fleet):
    conns = {n: r.connect() for n, r in fleet.proxies.items()}  # idle sessions
    try:
        rc, out, err = fleet.ctl_json("maintenance", "on", "--timeout", "10")
        assert rc == EXIT_OK, (out, err)
        # exit 0 means every proxy acknowledged: the effect is already there, no polling
        assert out["ok"] is True and {p["node_id"] for p in out["proxies"]} >= set(ADDRESSES), out
        assert all(p["ok"] for p in out["proxies"]), out
        for node_id, relay in fleet.proxies.items():
            assert info(relay)["maintenance"] == "on", node_id

        statements = {n: total_statements(r) for n, r in fleet.proxies.items()}
        held = {n: InThread(lambda c=c: c.execute("SELECT 1").fetchone()[0])
                for n, c in conns.items()}
        # each statement is at its proxy, unread (a session is held at its next statement),
        # and stays so while each proxy reports twice to the control plane
        for node_id, c in conns.items():
            wait_for(lambda r=fleet.proxies[node_id], c=c: unread_at_proxy(r, c), timeout=5,
                     what=f"the statement to reach {node_id}")
        wait_reports(fleet.control, 2)
        assert not any(t.done() for t in held.values()), "a statement ran during maintenance"
        assert statements == {n: total_statements(r) for n, r in fleet.proxies.items()}
        wait_for(lambda: all(fleet.control.proxies()[n]["maintenance"] for n in ADDRESSES),
                 timeout=5, interval=0.1, what="show-proxies to report maintenance on both")

        rc, out, err = fleet.ctl_json("maintenance", "off", "--timeout", "10")
        assert rc == EXIT_OK and out["ok"] is True, (out, err)
        for node_id, relay in fleet.proxies.items():
            assert info(relay)["maintenance"] == "off", node_id
        for node_id, t in held.items():
            assert t.result(timeout=5) == 1, node_id
    finally:
        for relay in fleet.proxies.values():  # never leave the fleet paused
            if info(relay)["maintenance"] == "on":
                admin(relay, "resume")
        for c in conns.values():
            c.close()


# --------------------------------------------------------------------------- #
# 5. switchover
# --------------------------------------------------------------------------- #


class Writer(loadgen.Writer):
    """A client writing through one proxy in a loop, a new session for each row (as a pooled
    application reconnecting would): which rows were acknowledged, and which errors it saw."""

    def __init__(self, relay, table, tag):
        def insert(conn, i):
            conn.execute(f"INSERT INTO {table} VALUES (%s, %s)", (tag, i))

        super().__init__(relay, insert, session_per_row=True, pause=0.02)
        self.tag = tag
        self.start()

    @property
    def acked(self):
        return [seq for seq, *_ in self.ok]

    def finish(self):
        self.stop(timeout=30)


def test_switchover_with_promote_fences_the_old_primary_and_loses_no_acknowledged_write(fleet):
    """switchover --promote: pause every proxy, fence the old primary, let the replica replay
    everything it wrote, pg_promote() it through an agent, switch, resume. Clients writing
    through both proxies meanwhile: every acknowledged row is on the new primary, the only
    errors are the documented leader-change close, and the old primary refuses writes."""
    old = info(fleet.a)["write_leader"]
    new = next(n.name for n in fleet.cluster.nodes if n.name != old)
    old_node, new_node = fleet.cluster[old], fleet.cluster[new]
    assert new_node.in_recovery(), "the fleet's cluster should have a replica here"
    table = "e2e_promote_" + uuid.uuid4().hex[:8]
    with fleet.a.connect() as c:
        c.execute(f"CREATE TABLE {table} (proxy text, n int)")
    fleet.cluster.wait_caught_up(new_node, old_node)

    writers = [Writer(relay, table, node_id) for node_id, relay in fleet.proxies.items()]
    try:
        wait_for(lambda: all(len(w.acked) >= 5 for w in writers), timeout=10,
                 what="5 rows written through each proxy")
        rc, out, err = fleet.ctl_json("switchover", "--node", new, "--promote", "--timeout", "20")
        assert rc == EXIT_OK, (rc, out, err)
        # writers carry on against the new leader
        after = [len(w.acked) for w in writers]
        wait_for(lambda: all(len(w.acked) >= n + 5 for w, n in zip(writers, after)),
                 timeout=10, what="5 more rows through each proxy after the switchover")
    finally:
        for w in writers:
            w.finish()
    assert out["ok"] is True and out["leader"] == new, out
    assert out["promoted_by"] in ADDRESSES, out
    epoch = out["epoch"]

    assert not new_node.in_recovery(), f"{new} was not promoted"
    for node_id, relay in fleet.proxies.items():
        own = info(relay)
        assert (own["write_leader"], own["epoch"], own["maintenance"]) == (new, epoch, "off"), \
            (node_id, own)
        assert node_of_session(relay) == new, node_id

    # no acknowledged write is missing on the new primary
    rows = set(new_node.query(f"SELECT proxy, n FROM {table}"))
    for w in writers:
        assert w.acked, f"{w.tag} wrote nothing"
        missing = [i for i in w.acked if (w.tag, i) not in rows]
        assert not missing, f"{w.tag}: acknowledged rows missing on {new}: {missing[:10]}"
        # the fence ends every session on the old primary (57P01, as the leader change)
        others = [e for e in w.errors if "write leader changed" not in e[3]
                  and "terminating connection due to administrator command" not in e[3]]
        assert not others, f"{w.tag}: unexpected errors {others[:5]}"

    # the old primary is fenced: still up, but it refuses every new session
    with pytest.raises(psycopg.OperationalError, match="not currently accepting connections"):
        old_node.query(f"INSERT INTO {table} VALUES ('direct', 0)")

    # give the fleet its replica back: the old primary follows the new one
    fleet.cluster.rebuild_as_replica(old, new_node)
    fleet.cluster.wait_streaming(new_node, 1)
    wait_for(lambda: all(info(r)["write_leader"] == new for r in fleet.proxies.values()),
             timeout=5, what="the leader to stay put while the old primary is rebuilt")


def test_switchover_to_a_promoted_replica_moves_every_proxy_under_one_epoch(fleet):
    old = info(fleet.a)["write_leader"]
    new = next(n.name for n in fleet.cluster.nodes if n.name != old)
    fleet.cluster.wait_caught_up(fleet.cluster[new], fleet.cluster[old])
    fleet.cluster[new].promote()  # by hand; the old primary keeps running

    # refused (changing nothing) until the agents have reported the promotion
    def switched():
        rc, out, err = fleet.ctl_json("switchover", "--node", new, "--timeout", "15")
        return None if "in recovery" in err else (rc, out, err)

    rc, out, err = wait_for(switched, timeout=5, interval=0.1,
                            what=f"the switchover to be accepted once {new} is seen promoted")
    assert rc == EXIT_OK, (out, err)
    assert out["ok"] is True and out["leader"] == new, out
    epoch = out["epoch"]
    assert {p["node_id"] for p in out["proxies"] if p["ok"]} >= set(ADDRESSES), out

    # acknowledged = in force: both proxies route to the new leader under the same epoch
    for node_id, relay in fleet.proxies.items():
        own = info(relay)
        assert (own["write_leader"], own["epoch"]) == (new, epoch), (node_id, own)
        assert node_of_session(relay) == new, node_id
    dep = fleet.control.deployment()
    assert (dep["leader"], dep["epoch"]) == (new, epoch), dep
    wait_for(lambda: all((p["leader"], p["epoch"]) == (new, epoch)
                         for n, p in fleet.control.proxies().items() if n in ADDRESSES),
             timeout=5, interval=0.1, what="show-proxies to report the new leader and epoch")

    # and it stays so (the old primary still runs: the control plane keeps its decision)
    # while every agent probes both primaries and reports them to the control plane
    for relay in fleet.proxies.values():
        wait_probe_rounds(relay, 2)
    wait_reports(fleet.control, 3)
    for node_id, relay in fleet.proxies.items():
        own = info(relay)
        assert (own["write_leader"], own["epoch"]) == (new, epoch), (node_id, own)
    assert (fleet.control.deployment()["epoch"]) == epoch



# --------------------------------------------------------------------------- #
# 6. configuration
# --------------------------------------------------------------------------- #


def config_version_of(fleet, node_id):
    return fleet.control.proxies()[node_id]["config_version"]


def test_config_apply_lands_on_every_proxy(fleet):
    text = fleet.ini(pgrelay={"server_connect_timeout": "7s", "leader_change_grace": "12s"})
    path = os.path.join(fleet.root, "new-pgrelay.ini")
    with open(path, "w") as f:
        f.write(text)

    rc, out, err = fleet.ctl_json("config", "apply", path)
    assert rc == EXIT_OK, (out, err)
    assert out["ok"] is True, out
    version = out["version"]
    assert {p["node_id"] for p in out["proxies"] if p["ok"]} >= set(ADDRESSES), out

    for node_id, relay in fleet.proxies.items():
        cfg = running_config(relay)
        assert cfg["server_connect_timeout"] == "7s", (node_id, cfg)
        assert cfg["leader_change_grace"] == "12s", (node_id, cfg)
        with open(relay.conf_path) as f:
            assert f.read() == text, node_id
        assert node_of_session(relay) == info(relay)["write_leader"]  # still serving

    def versions():
        p = fleet.ctl("show-proxies")
        assert p.returncode == EXIT_OK, p.stderr
        rows = {r["node_id"]: r for r in table_rows(p.stdout)}
        return all(rows[n]["config_version"] == str(version) for n in ADDRESSES)

    wait_for(versions, timeout=5, interval=0.2,
             what=f"show-proxies to show config version {version} on both proxies")
    rc, shown, err = fleet.ctl_json("config", "show")
    assert rc == EXIT_OK and shown["version"] == version and shown["text"] == text, (shown, err)


def test_config_that_one_proxy_refuses_lands_on_none(fleet):
    """A third proxy host, proxy-c, still runs max_client_conn = 500 (a restart-only key):
    a text with max_client_conn = 1000 is fine for proxy-a and proxy-b but refused by it."""
    rc, shown, err = fleet.ctl_json("config", "show")
    assert rc == EXIT_OK, err
    current_version, current_text = shown["version"], shown["text"]
    if not current_text:  # config apply did not run first: start from the files
        with open(fleet.a.conf_path) as f:
            current_text = f.read()
    files = {}
    for node_id, relay in fleet.proxies.items():
        with open(relay.conf_path) as f:
            files[node_id] = f.read()
    before = {n: running_config(r) for n, r in fleet.proxies.items()}
    versions = {n: config_version_of(fleet, n) for n in ADDRESSES}

    c_text = current_text.replace("max_client_conn = 1000", "max_client_conn = 500")
    assert c_text != current_text
    proxy_c = start_proxy(fleet.root, "proxy-c", "127.0.0.4", c_text)
    try:
        wait_for(lambda: "proxy-c" in fleet.live_proxies(), timeout=10,
                 what="proxy-c registered and live")
        new_text = re.sub(r"^leader_change_grace = .*$", "leader_change_grace = 15s",
                          current_text, flags=re.M)
        assert "leader_change_grace = 15s" in new_text
        path = os.path.join(fleet.root, "refused-pgrelay.ini")
        with open(path, "w") as f:
            f.write(new_text)

        rc, out, err = fleet.ctl_json("config", "apply", path)
        assert rc == EXIT_FAILED, (rc, out, err)
        assert "409" in err, err
        answers = {p["node_id"]: p for p in out["proxies"]}
        assert answers["proxy-c"]["ok"] is False, out
        assert "max_client_conn" in answers["proxy-c"]["detail"], out

        for node_id, relay in fleet.proxies.items():
            with open(relay.conf_path) as f:
                assert f.read() == files[node_id], f"{node_id}'s file changed"
            assert running_config(relay) == before[node_id], node_id
        wait_reports(fleet.control, 3)  # a few metrics reports later, the versions have not moved
        for node_id in ADDRESSES:
            assert config_version_of(fleet, node_id) == versions[node_id], node_id
        rc, shown, err = fleet.ctl_json("config", "show")
        assert rc == EXIT_OK and shown["version"] == current_version, (shown, err)
    finally:
        stop_proxy(proxy_c)
        # orchestrations address live proxies: wait until proxy-c no longer counts
        wait_for(lambda: "proxy-c" not in fleet.live_proxies(), timeout=15, interval=0.2,
                 what="proxy-c to be no longer live")


def test_reload_reaches_every_proxy_and_each_applies_its_own_file(fleet):
    """`pgrelayctl reload` (POST /deployments/prod/reload: a `reload` command to every live
    proxy). Each host's pgrelay.ini is edited by hand first, with a different
    client_login_timeout on each host: editing changes nothing by itself; after the reload,
    exit 0 means every proxy acknowledged it (its agent saw its master reload), and each runs
    the value of its own file. The files are put back and reloaded the same way at the end."""
    values = {"proxy-a": "41s", "proxy-b": "47s"}
    originals, offsets = {}, {}
    for node_id, relay in fleet.proxies.items():
        with open(relay.conf_path) as f:
            originals[node_id] = f.read()
        assert running_config(relay)["client_login_timeout"] not in values.values(), node_id
    try:
        for node_id, relay in fleet.proxies.items():
            with open(relay.conf_path, "w") as f:
                f.write(set_ini_key(originals[node_id], "pgrelay", "client_login_timeout",
                                    values[node_id]))
            offsets[node_id] = len(relay.log())
        # a file edit alone is not picked up: there is no event for "not watched", so the
        # window is the agents' own periodic work (their tick runs the probes), twice over
        for relay in fleet.proxies.values():
            wait_probe_rounds(relay, 2)
        for node_id, relay in fleet.proxies.items():
            assert running_config(relay)["client_login_timeout"] != values[node_id], node_id

        rc, out, err = fleet.ctl_json("reload")
        assert rc == EXIT_OK, (rc, out, err)
        assert out["ok"] is True, out
        answers = {p["node_id"]: p for p in out["proxies"]}
        for node_id in ADDRESSES:
            assert answers[node_id]["ok"] is True, out
            assert answers[node_id]["detail"] == "reloaded", out
        # acknowledged = in force, on each proxy with its own file's value
        for node_id, relay in fleet.proxies.items():
            cfg = running_config(relay)
            assert cfg["client_login_timeout"] == values[node_id], (node_id, cfg)
            log = relay.log()[offsets[node_id]:]
            assert f"control plane: reloading {relay.conf_path}" in log, (node_id, log)
            assert node_of_session(relay) == info(relay)["write_leader"]  # still serving
    finally:
        for node_id, relay in fleet.proxies.items():
            with open(relay.conf_path, "w") as f:
                f.write(originals[node_id])
    rc, out, err = fleet.ctl_json("reload")
    assert rc == EXIT_OK and out["ok"] is True, (rc, out, err)
    for node_id, relay in fleet.proxies.items():
        assert running_config(relay)["client_login_timeout"] not in values.values(), node_id


# --------------------------------------------------------------------------- #
# 7. control plane outage
# --------------------------------------------------------------------------- #


def test_proxies_keep_serving_without_the_control_plane_and_reconnect(fleet):
    leaders = {n: info(r)["write_leader"] for n, r in fleet.proxies.items()}
    epochs = {n: info(r)["epoch"] for n, r in fleet.proxies.items()}
    offsets = {n: len(r.log()) for n, r in fleet.proxies.items()}

    fleet.control.kill9()
    try:
        for node_id, relay in fleet.proxies.items():
            assert node_of_session(relay) == leaders[node_id], node_id
        # past control_grace_period the agents decide alone: routing must not change
        for node_id, relay in fleet.proxies.items():
            wait_for(lambda r=relay, n=node_id: "deciding the leader alone" in r.log()[offsets[n]:],
                     timeout=15, interval=0.2, what=f"{node_id} to fall back to deciding alone")
        # deciding alone, each agent decides after every probe round: three rounds each
        for relay in fleet.proxies.values():
            wait_probe_rounds(relay, 3)
        for node_id, relay in fleet.proxies.items():
            own = info(relay)
            assert (own["write_leader"], own["epoch"]) == (leaders[node_id], epochs[node_id]), \
                (node_id, own)
            with relay.connect() as c:
                assert c.execute("SELECT 40 + 2").fetchone()[0] == 42
                assert c.execute("SHOW cluster_name").fetchone()[0] == leaders[node_id]
    finally:
        restarted_ms = int(time.time() * 1000)
        fleet.control.start()

    def both_back():
        proxies = fleet.control.proxies()
        return all(proxies[n]["live"] and proxies[n]["last_seen"] >= restarted_ms
                   for n in ADDRESSES)

    wait_for(both_back, timeout=10, interval=0.2, what="both agents to reconnect")
    p = fleet.ctl("show-proxies")
    assert p.returncode == EXIT_OK, p.stderr
    rows = {r["node_id"]: r for r in table_rows(p.stdout)}
    assert all(rows[n]["live"] == "yes" for n in ADDRESSES), p.stdout
    for node_id, relay in fleet.proxies.items():
        assert info(relay)["write_leader"] == leaders[node_id], node_id
        assert node_of_session(relay) == leaders[node_id], node_id
    dep = fleet.control.deployment()
    assert dep["leader"] == leaders["proxy-a"] and dep["epoch"] >= epochs["proxy-a"], dep


def fleet_config_text(fleet):
    """The fleet's pgrelay.ini as last committed through the control plane (the file of
    proxy-a when nothing was committed yet)."""
    rc, shown, err = fleet.ctl_json("config", "show")
    assert rc == EXIT_OK, err
    if shown["text"]:
        return shown["text"]
    with open(fleet.a.conf_path) as f:
        return f.read()


def apply_config_text(fleet, text):
    path = os.path.join(fleet.root, f"apply-{uuid.uuid4().hex[:8]}.ini")
    with open(path, "w") as f:
        f.write(text)
    rc, out, err = fleet.ctl_json("config", "apply", path)
    assert rc == EXIT_OK and out["ok"] is True, (rc, out, err)


FALLBACK_GRACE_S = 12  # the first phase must fit in it less 1 s, on a loaded machine


def test_past_the_grace_period_each_agent_fails_over_alone_and_the_fleet_converges_again(fleet):
    """Coordinated leadership's fallback (control_grace_period, here 12 s for the test), with
    the control plane killed:

    * within the grace period an agent does not act alone: it keeps following the control
      plane's last word (agent/leader.c, leader_follow_control), even when it sees that leader
      down: the primary is stopped, both agents see it down, and both still route to it under
      the same epoch (alone, they would drop it and bump the epoch); it is started again;
    * past the grace period ("deciding the leader alone") the primary is stopped for good and
      the replica promoted by hand: each proxy moves to it on its own, with its own new epoch
      (the two may differ), and writes through each land there;
    * the control plane comes back: it loads its stored decision (the old leader, old epoch)
      while the agents report the new leader at higher epochs. An agent given an epoch below its
      own keeps deciding alone (it never lowers its epoch), so no session goes back to the old
      node. control/leader.c does not adopt an agent's epoch as it is: the stored leader is
      reported down by every proxy reporting under an epoch >= the stored one, so it takes the
      node the majority sees as primary as a new decision, at one above the highest epoch of
      the live proxies, logged as "a majority of the proxies see the old leader down or in
      recovery"; every agent then follows that one leader and epoch, and show-proxies, the
      deployment and the proxies' own consoles agree on it.

    The grace period counts from the agent's last answer from any endpoint: right after an
    earlier outage, an agent's metrics thread may still be backing off from it while its
    command poll has already been answered (and then the control plane is killed again); it
    used to end the grace period at once then (fixed in agent/main.c). So the test begins with
    a short outage of its own: killed until both reporters have failed, started again."""
    cluster, control = fleet.cluster, fleet.control
    old = info(fleet.a)["write_leader"]
    [replica] = [n for n in cluster.nodes if n.name != old]
    primary = cluster[old]
    assert replica.in_recovery()
    offsets = {n: len(r.log()) for n, r in fleet.proxies.items()}
    control.kill9()
    try:
        for node_id, relay in fleet.proxies.items():
            wait_for(lambda r=relay, n=node_id:
                     "control plane (reporter): unreachable" in r.log()[offsets[n]:],
                     timeout=10, interval=0.05, what=f"{node_id}'s reporter to fail")
    finally:
        restarted_ms = int(time.time() * 1000)
        control.start()
    # back (an orchestration addresses the live proxies: right after a start, none is yet)
    wait_for(lambda: all(p["live"] and p["last_seen"] >= restarted_ms
                         for n, p in control.proxies().items() if n in ADDRESSES),
             timeout=10, interval=0.1, what="both agents to reconnect")
    grace = f"{FALLBACK_GRACE_S}s"
    text = fleet_config_text(fleet)
    offsets = {n: len(r.log()) for n, r in fleet.proxies.items()}
    apply_config_text(fleet, set_ini_key(text, "control", "control_grace_period", grace))
    for node_id, relay in fleet.proxies.items():
        assert running_config(relay)["control.control_grace_period"] == grace, node_id
        wait_for(lambda r=relay, n=node_id: "configuration reloaded" in r.log()[offsets[n]:],
                 timeout=5, interval=0.1, what=f"{node_id}'s agent to reload")

    def fleet_state():
        return {n: (info(r)["write_leader"], info(r)["epoch"]) for n, r in fleet.proxies.items()}

    def agreed():
        seen = set(fleet_state().values())
        dep = control.deployment()
        return dep["leader"] == old and seen == {(dep["leader"], dep["epoch"])} and dep["epoch"]

    epoch = wait_for(agreed, timeout=10, interval=0.1,
                     what=f"both proxies and the control plane on {old} under one epoch")
    offsets = {n: len(r.log()) for n, r in fleet.proxies.items()}

    control.kill9()
    killed = time.monotonic()
    try:
        # 1. within the grace period: the primary goes down, the agents keep the control
        #    plane's leader and epoch
        primary.stop("immediate")
        for node_id, relay in fleet.proxies.items():
            wait_for(lambda r=relay: nodes_view(r)[old]["health"] == "down", timeout=5,
                     interval=0.05, what=f"{node_id} to see {old} down")
            assert info(relay)["write_leader"] == old and info(relay)["epoch"] == epoch, \
                (node_id, info(relay))
        # an agent decides after every probe round: two more rounds with the leader down
        for relay in fleet.proxies.values():
            wait_probe_rounds(relay, 2)
        assert time.monotonic() - killed < FALLBACK_GRACE_S - 1, \
            "too slow to look inside the grace period"
        assert fleet_state() == {n: (old, epoch) for n in ADDRESSES}, fleet_state()
        for node_id, relay in fleet.proxies.items():
            assert "deciding the leader alone" not in relay.log()[offsets[node_id]:], node_id
            assert nodes_view(relay)[old]["health"] == "down", node_id
        primary.start()
        for node_id, relay in fleet.proxies.items():
            wait_for(lambda r=relay: nodes_view(r)[old]["health"] == "up", timeout=10,
                     interval=0.05, what=f"{node_id} to see {old} up again")
        back_within_grace = time.monotonic() - killed < FALLBACK_GRACE_S - 1

        # 2. past it: each agent decides alone; a failover now is followed without help
        for node_id, relay in fleet.proxies.items():
            wait_for(lambda r=relay, n=node_id: "deciding the leader alone" in r.log()[offsets[n]:],
                     timeout=FALLBACK_GRACE_S + 10, interval=0.2,
                     what=f"{node_id} to fall back to deciding alone")
        state = fleet_state()
        assert all(leader == old for leader, _ in state.values()), state
        if back_within_grace:  # falling back does not move a healthy leader, nor the epoch
            assert state == {n: (old, epoch) for n in ADDRESSES}, state
        cluster.wait_caught_up(replica, primary)
        offsets = {n: len(r.log()) for n, r in fleet.proxies.items()}
        primary.stop("immediate")
        replica.promote()

        def moved():
            state = fleet_state()
            return state if all(leader == replica.name for leader, _ in state.values()) else None

        alone = wait_for(moved, timeout=15, interval=0.05,
                         what=f"both proxies to move to {replica.name} on their own")
        assert all(e > epoch for _, e in alone.values()), alone
        for node_id, relay in fleet.proxies.items():  # nobody told them
            changes = [ln for ln in relay.log()[offsets[node_id]:].splitlines()
                       if "write leader:" in ln]
            assert changes and f"-> {replica.name} " in changes[-1], (node_id, changes)
            assert not any("control plane:" in ln for ln in changes), (node_id, changes)
        table = "e2e_alone_" + uuid.uuid4().hex[:8]
        with fleet.a.connect() as c:
            c.execute(f"CREATE TABLE {table} (proxy text)")
        for node_id, relay in fleet.proxies.items():
            with relay.connect() as c:
                assert c.execute("SHOW cluster_name").fetchone()[0] == replica.name, node_id
                c.execute(f"INSERT INTO {table} VALUES (%s)", (node_id,))
        assert sorted(r[0] for r in replica.query(f"SELECT proxy FROM {table}")) == \
            sorted(ADDRESSES)
        control_offset = control.log_size()
    finally:
        restarted_ms = int(time.time() * 1000)
        control.start()

    # 3. the control plane is back: one leader, one epoch again
    seen_leaders = set()

    def converged():
        own = fleet_state()
        seen_leaders.update(v[0] for v in own.values())
        rc, rows, err = fleet.ctl_json("show-proxies")
        assert rc == EXIT_OK, err
        rows = {r["node_id"]: r for r in rows}
        dep = control.deployment()
        target = (dep["leader"], dep["epoch"])
        if all(rows[n]["live"] and rows[n]["last_seen"] >= restarted_ms
               and (rows[n]["leader"], rows[n]["epoch"]) == target == own[n]
               for n in ADDRESSES):
            return target
        return None

    leader, final = wait_for(converged, timeout=15, interval=0.1,
                             what="the agents to reconnect and agree with the control plane")
    assert leader == replica.name
    assert final >= max(e for _, e in alone.values()), (final, alone)
    assert old not in seen_leaders, seen_leaders  # never back to the dead node
    decision = control.log_since(control_offset)
    assert re.search(rf"write leader {old} -> {replica.name}, epoch \d+ \(a majority of the "
                     r"proxies see the old leader down or in recovery\)", decision), decision
    # and it holds: every agent probes twice more and reports three times more
    for relay in fleet.proxies.values():
        wait_probe_rounds(relay, 2)
    wait_reports(control, 3)
    assert fleet_state() == {n: (leader, final) for n in ADDRESSES}
    assert (control.deployment()["leader"], control.deployment()["epoch"]) == (leader, final)


# --------------------------------------------------------------------------- #
# 8. bad requests
# --------------------------------------------------------------------------- #


def test_wrong_token_and_malformed_body_are_refused_and_the_control_plane_keeps_serving(fleet):
    port = fleet.control.port
    proxies = f"{API}/deployments/{DEPLOYMENT}/proxies"

    status, body = http(port, "GET", proxies, token="not-a-valid-token")
    assert status == 401 and "error" in body, (status, body)
    status, body = http(port, "GET", proxies)  # no token at all
    assert status == 401, (status, body)
    # an agent with a wrong token is not recorded
    status, body = http(port, "POST", f"{API}/agent/register", {"node_id": "intruder"},
                        token="wrong-agent-token")
    assert status == 401, (status, body)

    status, body = http(port, "POST", f"{API}/deployments/{DEPLOYMENT}/maintenance",
                        raw=b'{"on": tru', token=ADMIN_TOKEN)
    assert status == 400 and "error" in body, (status, body)
    status, body = http(port, "POST", f"{API}/agent/metrics", raw=b"[1, 2, 3]", token=PROD_TOKEN)
    assert status == 400 and "error" in body, (status, body)
    status, body = http(port, "POST", f"{API}/deployments/{DEPLOYMENT}/maintenance",
                        {"on": "yes please"}, token=ADMIN_TOKEN)
    assert status == 400 and "error" in body, (status, body)

    # nothing of that took effect, and the control plane still answers
    rc, rows, err = fleet.ctl_json("show-proxies")
    assert rc == EXIT_OK, err
    rows = {r["node_id"]: r for r in rows}
    assert "intruder" not in rows
    assert all(rows[n]["live"] for n in ADDRESSES), rows
    for node_id, relay in fleet.proxies.items():
        assert info(relay)["maintenance"] == "off", node_id
    p = fleet.ctl("show-proxies")
    assert p.returncode == EXIT_OK and "proxy-a" in p.stdout and "proxy-b" in p.stdout
    assert fleet.control.proc.poll() is None


# --------------------------------------------------------------------------- #
# 9. failover, coordinated
# --------------------------------------------------------------------------- #


def test_failover_moves_every_proxy_to_the_promoted_replica_under_one_epoch(fleet):
    """The primary dies and a replica is promoted by hand (as Patroni or repmgr would): the
    control plane sees the majority of proxies lose the old leader and see a new primary, and
    every proxy follows it under one new epoch; writes go there and nowhere else."""
    old = info(fleet.a)["write_leader"]
    [other] = [n for n in fleet.cluster.nodes if n.name != old]
    assert other.in_recovery()
    replica = other
    epoch_before = fleet.control.deployment()["epoch"]
    fleet.cluster.wait_caught_up(replica, fleet.cluster[old])

    fleet.cluster.stop_node(old, "immediate")
    replica.promote()

    def agreed():
        seen = {(info(r)["write_leader"], info(r)["epoch"]) for r in fleet.proxies.values()}
        if len(seen) == 1 and next(iter(seen))[0] == replica.name:
            return next(iter(seen))
        return None

    leader, epoch = wait_for(agreed, timeout=15, interval=0.05,
                             what=f"both proxies to route to {replica.name} under one epoch")
    assert epoch > epoch_before
    dep = fleet.control.deployment()
    assert (dep["leader"], dep["epoch"]) == (leader, epoch), dep

    table = "e2e_failover_" + uuid.uuid4().hex[:8]
    with fleet.a.connect() as c:
        c.execute(f"CREATE TABLE {table} (proxy text)")
    for node_id, relay in fleet.proxies.items():
        with relay.connect() as c:
            c.execute(f"INSERT INTO {table} VALUES (%s)", (node_id,))
            assert c.execute("SHOW cluster_name").fetchone()[0] == replica.name
    assert sorted(r[0] for r in replica.query(f"SELECT proxy FROM {table}")) == sorted(ADDRESSES)
    for node_id, relay in fleet.proxies.items():
        history = admin(relay, "show leader history")
        assert replica.name in history and str(epoch) in history, (node_id, history)
