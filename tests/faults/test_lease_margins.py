"""The lease holder stops acting before anyone else may start (issue 8 Deliver 5, issue 9
Deliver 2 and 3), with two real control-plane replicas sharing a store (lease 3 s, renewed every
second: renew deadline 2 s):

  * a holder stopped (SIGSTOP) past its lease while one of its store writes waits on a lock
    (its periodic write of the proxies' rows; an agent's plan upload): the other replica takes
    over and declares a proxy; the old holder's write, let through only after the take-over,
    changes nothing (every write of a holder is conditional on its term, checked in the same
    statement), and continued, the old holder steps down;
  * the store stopped (SIGSTOP of every postgres process) past a renewal: the holder steps
    down at its renew deadline, not at the lease's end and not after a store timeout, and
    /healthz and a read endpoint served from state answer within a second throughout (the
    renewal runs in a thread of its own, the periodic writes on the store worker).

An audit trigger in the store records which backend wrote which row, and when.
"""

import contextlib
import os
import signal
import time
import uuid

import psutil
import psycopg
import pytest

from conftest import wait_for
from control_e2e_helpers import API, DEPLOYMENT, PROD_TOKEN, cleanup_dir, http, make_root
from fleet import Fleet, LeasedControlPlane
from loadgen import InThread

AUDITED = ("proxies", "leadership", "commands", "command_acks", "operations",
           "config_versions", "maintenance", "members", "deployments", "plans", "plan_changes")
LEASE_S, RENEW_DEADLINE_S = 3, 2.0


def store_conn(conninfo):
    return psycopg.connect(conninfo, autocommit=True)


def install_audit(conninfo):
    with store_conn(conninfo) as c:
        c.execute("CREATE TABLE public.audit (tbl text, pid int, at timestamptz)")
        c.execute("CREATE FUNCTION public.audit_row() RETURNS trigger LANGUAGE plpgsql AS $$"
                  " BEGIN INSERT INTO public.audit VALUES (TG_TABLE_NAME, pg_backend_pid(),"
                  " clock_timestamp()); RETURN NULL; END $$")
        for t in AUDITED:
            c.execute(f"CREATE TRIGGER audit AFTER INSERT OR UPDATE OR DELETE ON pgrelay.{t}"
                      " FOR EACH ROW EXECUTE FUNCTION public.audit_row()")


def backend_pids_of(conninfo, pid):
    """The store backends serving the connections of process ``pid``."""
    ports = {c.laddr.port for c in psutil.Process(pid).connections(kind="tcp")
             if c.status == psutil.CONN_ESTABLISHED}
    with store_conn(conninfo) as c:
        rows = c.execute("SELECT pid, client_port FROM pg_stat_activity"
                         " WHERE client_port IS NOT NULL").fetchall()
    return {p for p, port in rows if port in ports}


def fleet_store(fleet):
    return (f"host={fleet.pg.host} port={fleet.pg.port} user=postgres dbname={fleet.store_db}")


def late_write_changes_nothing(pg, table, write=None):
    """The scenario: writes to table held back by a lock, one of the holder's waiting (write(a),
    if given, makes it; else the periodic one comes), the holder stopped, the other replica
    taking over, the lock released: no write of the old holder's lands after the take-over."""
    started = time.monotonic()
    with Fleet.start(pg, leased=True) as fleet:
        a, b = fleet.control, fleet.control2
        conninfo = fleet_store(fleet)
        install_audit(conninfo)
        locker = psycopg.connect(conninfo)
        try:
            locker.execute(f"LOCK TABLE pgrelay.{table} IN SHARE ROW EXCLUSIVE MODE")

            def blocked():
                with store_conn(conninfo) as c:
                    return {r[0] for r in c.execute(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND query LIKE %s", (f"%pgrelay.{table}%",)).fetchall()}

            pending = write(a) if write else None
            wait_for(blocked, timeout=15, what="a write of the holder's to wait on the lock")
            old_backends = blocked() | backend_pids_of(conninfo, a.proc.pid)
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                wait_for(b.holds_lease, timeout=15, what="the second replica to take over")
                with store_conn(conninfo) as c:
                    [(taken_at, holder)] = c.execute(
                        "SELECT acquire_time, holder FROM pgrelay.lease").fetchall()
                locker.commit()  # the old holder's write goes on now, after the take-over
                wait_for(lambda: not blocked(), timeout=15, what="the waiting writes to end")
                # the new holder does an operation: declares a proxy
                status, body = b.api("POST", f"/deployments/{DEPLOYMENT}/proxies",
                                     {"node_id": "proxy-c"}, timeout=20)
                assert status == 201, body
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            wait_for(lambda: "stepping down" in a.log_tail(200), timeout=10,
                     what="the old holder to step down")
            assert not a.holds_lease()
            assert http(a.port, "GET", "/healthz", timeout=2)[0] == 200
            # what the old holder does once continued: it may only read now
            time.sleep(2.0)  # two housekeeping rounds and a lease attempt of the old holder
            old_backends |= backend_pids_of(conninfo, a.proc.pid)
            with store_conn(conninfo) as c:
                late = c.execute("SELECT tbl, pid, at FROM public.audit"
                                 " WHERE at > %s AND pid = ANY(%s) ORDER BY at",
                                 (taken_at, list(old_backends))).fetchall()
                assert holder != "" and not late, \
                    f"writes of the old holder after {holder} took over at {taken_at}: {late}"
                assert c.execute("SELECT count(*) FROM pgrelay.members"
                                 " WHERE node_id = 'proxy-c'").fetchone()[0] == 1
        finally:
            with contextlib.suppress(Exception):
                locker.close()
    print(f"scenario time {time.monotonic() - started:.1f}s")
    return pending


def test_a_stopped_holders_write_let_through_after_a_take_over_changes_nothing(pg):
    # every write of proxy rows held back: the holder's next flush (every 5 s) waits
    late_write_changes_nothing(pg, "proxies")


def test_a_stopped_holders_plan_upload_let_through_after_a_take_over_changes_nothing(pg):
    plan = {"id": "00000000000000b7", "node": "pg1", "database": "app", "user": "app",
            "text": "SELECT 1", "reason": "slow", "duration_ms": 1500,
            "planned_at_ms": int(time.time() * 1000), "changes": 0,
            "plan": [{"Plan": {"Node Type": "Result"}}]}

    def upload(a):
        return InThread(http, a.port, "POST", API + "/agent/plans",
                        {"node_id": "proxy-a", "plans": [plan]}, PROD_TOKEN, timeout=60)

    pending = late_write_changes_nothing(pg, "plans", upload)
    status, body = pending.result(timeout=30)
    # not stored, and the agent is told so (it uploads again to the new holder)
    assert status == 503, (status, body)
    print(f"the old holder's answer to the upload: {body}")


def store_processes(pg):
    [(datadir,)] = pg.query("SELECT setting FROM pg_settings WHERE name = 'data_directory'")
    with open(os.path.join(datadir, "postmaster.pid")) as f:
        postmaster = psutil.Process(int(f.readline()))
    return [postmaster] + postmaster.children(recursive=True)


@pytest.fixture
def two_replicas(pg):
    root = make_root()
    db = "lease_" + uuid.uuid4().hex[:10]
    pg.query(f"CREATE DATABASE {db}")
    store = f"host={pg.host} port={pg.port} user=postgres dbname={db} connect_timeout=5"
    planes = []
    try:
        for name in ("a", "b"):
            p = LeasedControlPlane(os.path.join(root, name), store)
            os.makedirs(p.workdir)
            p.start()  # ready: /healthz (a replica without the lease answers /readyz 503)
            planes.append(p)
            if name == "a":
                wait_for(p.holds_lease, timeout=10, what="the first replica's lease")
        yield planes
    finally:
        for p in planes:
            with contextlib.suppress(Exception):
                os.kill(p.proc.pid, signal.SIGCONT)
            p.stop()
        with contextlib.suppress(Exception):
            pg.query(f"DROP DATABASE IF EXISTS {db} WITH (FORCE)")
        cleanup_dir(root)


def test_a_stopped_store_makes_the_holder_step_down_at_its_renew_deadline(pg, two_replicas):
    a, b = two_replicas
    procs = store_processes(pg)
    samples = []  # (seconds since the store stopped, /healthz latency)
    reads = []    # latency of a read endpoint served from state (200, or 503 once stepped down)
    stepped_down = None
    for p in procs:
        p.suspend()
    t0 = time.monotonic()
    try:
        while time.monotonic() - t0 < LEASE_S + 2.0:
            s = time.monotonic()
            status = http(a.port, "GET", "/healthz", timeout=10)[0]
            samples.append((s - t0, time.monotonic() - s))
            assert status == 200
            s = time.monotonic()
            status = a.api("GET", "/deployments", timeout=10)[0]
            reads.append(time.monotonic() - s)
            assert status in (200, 503)
            if stepped_down is None and http(a.port, "GET", "/readyz", timeout=10)[0] == 503:
                stepped_down = time.monotonic() - t0
            time.sleep(0.05)
    finally:
        for p in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.resume()
    assert stepped_down is not None, "the holder kept acting with its store stopped"
    # the last renewal was sent at most 1 s before the store stopped: the renew deadline
    # (2 s after it) comes before the lease could end (3 s), with room for the check itself
    assert stepped_down <= RENEW_DEADLINE_S + 0.5, f"stepped down after {stepped_down:.2f}s"
    worst = max(lat for _, lat in samples)
    after = [lat for at, lat in samples if at > stepped_down]
    # no store call of the event loop waits on the stopped store (the renewal has a thread
    # of its own, the periodic writes go to the store worker)
    assert worst < 1.0, f"/healthz took {worst:.2f}s"
    assert after and max(after) < 1.0, f"/healthz after the step-down took {max(after):.2f}s"
    assert max(reads) < 1.0, f"GET /deployments took {max(reads):.2f}s"
    assert "renew deadline passed" in a.log_tail(200)
    # the store is back: one of them holds the lease again
    wait_for(lambda: a.holds_lease() or b.holds_lease(), timeout=15,
             what="a holder once the store is back")
    print(f"stepped down {stepped_down:.2f}s after the store stopped; /healthz max "
          f"{worst * 1000:.0f} ms, after the step-down {max(after) * 1000:.0f} ms; "
          f"GET /deployments max {max(reads) * 1000:.0f} ms")
