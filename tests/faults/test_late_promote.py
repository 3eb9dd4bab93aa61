"""A promote never runs after its operation ended (issue 8, Deliver 2): the operator's
timeout bounds the whole switchover, an agent asks the control plane right before
pg_promote(), and a promote delivered again after a control-plane restart does not run."""

import json
import os
import signal
import threading
import time

import psycopg

from conftest import wait_for
from control_e2e_helpers import DEPLOYMENT, info
from fleet import Fleet, Watch, postmaster_pid

EXIT_OK = 0


def primaries(cluster):
    """The nodes that take writes: not in recovery, and not fenced (a fenced node accepts
    connections to template1 only)."""
    out = []
    for n in cluster.nodes:
        try:
            with psycopg.connect(n.conninfo(dbname="template1", connect_timeout=3),
                                 autocommit=True) as c:
                if not c.execute("SELECT pg_is_in_recovery() OR NOT EXISTS (SELECT FROM"
                                 " pg_database WHERE datallowconn AND datname <> 'template1')"
                                 ).fetchone()[0]:
                    out.append(n.name)
        except psycopg.Error:
            pass
    return out


def assert_one_primary_for(cluster, seconds, expected="pg1"):
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert primaries(cluster) == [expected], primaries(cluster)
        time.sleep(0.2)


def store_query(fleet, sql, params=None):
    with psycopg.connect(fleet.pg.conninfo(dbname=fleet.store_db), autocommit=True) as c:
        cur = c.execute(sql, params)
        return cur.fetchall() if cur.description else None


def test_a_switchover_whose_agents_are_stopped_past_its_timeout_never_promotes_later(pg):
    """switchover --promote --timeout 2; both agents are stopped (SIGSTOP) as soon as the fleet
    is paused and continued 5 s later: the switchover answers 504 at 2 s and is rolled back;
    whatever the agents had received then, pg2 is never promoted, pg1 stays the only primary,
    and both proxies route to it again."""
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        watch = Watch(fleet)
        agents = [fleet.agent_pid(n) for n in fleet.proxies]
        result = {}

        def run():
            result["r"] = fleet.ctl_json("switchover", "--node", "pg2", "--promote",
                                         "--timeout", "2")

        t = threading.Thread(target=run)
        t0 = time.monotonic()
        t.start()
        try:
            wait_for(lambda: any(info(r)["maintenance"] == "on" for r in fleet.proxies.values()),
                     timeout=2, interval=0.01, what="the pause")
            for pid in agents:
                os.kill(pid, signal.SIGSTOP)
            t.join(10)
            rc, out, err = result["r"]
            assert rc != EXIT_OK and time.monotonic() - t0 < 4, (out, err)
            time.sleep(max(0.0, 5 - (time.monotonic() - t0)))
        finally:
            for pid in agents:
                os.kill(pid, signal.SIGCONT)
        assert_one_primary_for(fleet.cluster, 6)
        wait_for(lambda: all(info(r)["write_leader"] == "pg1" and info(r)["maintenance"] == "off"
                             for r in fleet.proxies.values()),
                 timeout=10, what="both proxies back on pg1, resumed")
        [op] = fleet.control.get(f"/deployments/{DEPLOYMENT}/operations")
        assert op["state"] == "rolled_back", op
        watch.check()
    print(f"scenario time {time.monotonic() - started:.1f}s")


def test_a_switchover_whose_old_primary_answers_late_is_not_promoted_after_its_timeout(pg):
    """The old primary is stopped (SIGSTOP of its postmaster) so the fence waits for it:
    switchover --promote --timeout 2 ends at 2 s; when the fence's connection gives up (5 s),
    nothing more happens: pg2 is never promoted (the old code skipped the fence then and
    promoted pg2 at ~5 s: two primaries)."""
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        pg1 = fleet.cluster["pg1"]
        target = postmaster_pid(pg1)
        os.kill(target, signal.SIGSTOP)
        try:
            t0 = time.monotonic()
            rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote",
                                          "--timeout", "2")
            assert rc != EXIT_OK and time.monotonic() - t0 < 5, (out, err)
            time.sleep(max(0.0, 8 - (time.monotonic() - t0)))
        finally:
            os.kill(target, signal.SIGCONT)
        assert_one_primary_for(fleet.cluster, 3)
    print(f"scenario time {time.monotonic() - started:.1f}s")


def test_a_promote_delivered_again_after_a_control_plane_restart_does_not_run(pg):
    """A promote of a switchover that already ended (its acknowledgement lost, say) is still
    queued when the control plane restarts: the agent gets it again, asks whether its
    operation still runs, and refuses; pg2 stays a replica."""
    started = time.monotonic()
    with Fleet.start(pg, hold="pause") as fleet:
        # a switchover held after its pause until its deadline: rolled back, its id ended
        rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote", "--timeout",
                                      "2")
        status, ops = fleet.control.api("GET", f"/deployments/{DEPLOYMENT}/operations")
        op = ops[0] if status == 200 else {"id": 1, "state": "(no operation records)"}
        fleet.control.kill9()
        [(cid,)] = store_query(
            fleet, "INSERT INTO pgrelay.commands (deployment, type, args) VALUES (%s, 'promote',"
            " %s::jsonb) RETURNING id",
            (DEPLOYMENT, json.dumps({"node": "pg2", "old": "pg1", "operation": op["id"]})))
        store_query(fleet, "INSERT INTO pgrelay.command_acks (command_id, node_id) VALUES "
                    "(%s, 'proxy-a')", (cid,))
        fleet.start_control()
        wait_for(lambda: store_query(fleet, "SELECT acked_at IS NOT NULL FROM"
                                     " pgrelay.command_acks WHERE command_id = %s",
                                     (cid,))[0][0],
                 timeout=15, what="proxy-a to answer the promote delivered again")
        [(ok, detail)] = store_query(fleet, "SELECT ok, detail FROM pgrelay.command_acks"
                                     " WHERE command_id = %s", (cid,))
        assert_one_primary_for(fleet.cluster, 2)
        assert ok is False and "no longer running" in detail, detail
        assert op["state"] == "rolled_back", op
    print(f"scenario time {time.monotonic() - started:.1f}s")


def test_a_second_promote_of_the_same_operation_reports_the_first_result(pg):
    """A switchover --promote is done; its promote is delivered to the same proxy again (an
    acknowledgement lost, then a control-plane restart): the agent does not run it again
    and reports the first result."""
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        rc, out, err = fleet.ctl_json("switchover", "--node", "pg2", "--promote", "--timeout",
                                      "20")
        assert rc == EXIT_OK, (out, err)
        [op] = fleet.control.get(f"/deployments/{DEPLOYMENT}/operations")
        [first] = [s["detail"] for s in op["steps"] if s["step"] == "promote"]
        fleet.control.kill9()
        [(cid,)] = store_query(
            fleet, "INSERT INTO pgrelay.commands (deployment, type, args) VALUES (%s, 'promote',"
            " %s::jsonb) RETURNING id",
            (DEPLOYMENT, json.dumps({"node": "pg2", "operation": op["id"]})))
        store_query(fleet, "INSERT INTO pgrelay.command_acks (command_id, node_id) VALUES "
                    "(%s, %s)", (cid, op["runner"]))
        fleet.start_control()
        wait_for(lambda: store_query(fleet, "SELECT acked_at IS NOT NULL FROM"
                                     " pgrelay.command_acks WHERE command_id = %s",
                                     (cid,))[0][0],
                 timeout=15, what="the runner to answer the promote delivered again")
        [(ok, detail)] = store_query(fleet, "SELECT ok, detail FROM pgrelay.command_acks"
                                     " WHERE command_id = %s", (cid,))
        assert (ok, detail) == (True, first), (ok, detail, first)
        assert primaries(fleet.cluster) == ["pg2"]
    print(f"scenario time {time.monotonic() - started:.1f}s")
