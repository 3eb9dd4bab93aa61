"""pgrelay's processes: worker crashes, client disconnects, and shutdown signals."""

import os
import re
import signal
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from conftest import (
    SCHED_SLACK,
    RawClient,
    admin_json,
    child_pids,
    client_port,
    error_fields,
    free_port,
    owning_worker,
    pid_alive,
    port_accepts,
    port_listening,
    process_name,
    wait_for,
    write_config,
)


def _session_works(conn):
    try:
        return conn.execute("SELECT 'alive'").fetchone() == ("alive",)
    except psycopg.Error:
        return False


def _connection_refused(port):
    """True if a new client cannot get a session: connect refused, or closed/errored
    immediately. A connection that just hangs is not 'refused'."""
    try:
        raw = RawClient(port, timeout=3)
    except ConnectionRefusedError:
        return True
    with raw:
        try:
            raw.send_startup()
            msgs = raw.read_until("ZE")
        except ConnectionResetError:
            return True
        except TimeoutError:
            return False
        return not msgs or msgs[-1][0] == "E"


@pytest.mark.deadline(60)
def test_ps_tells_the_master_its_workers_and_its_agent_apart(relay_factory):
    """An operator reading `ps -e` or `top`, or running `killall pgrelay-worker`, sees which
    process is which: the children name themselves, a re-forked worker too."""
    relay = relay_factory(workers=2)

    def ps_names():
        out = subprocess.run(["ps", "-o", "comm=", "--ppid", str(relay.pid)],
                             capture_output=True, text=True, check=True).stdout
        return sorted(out.split())

    assert process_name(relay.pid) == "pgrelay"
    assert ps_names() == ["pgrelay-agent", "pgrelay-worker", "pgrelay-worker"]
    victim = relay.worker_pids()[0]
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in child_pids(relay.pid) and len(relay.worker_pids()) == 2,
             timeout=10, what="the worker to be re-forked")
    assert ps_names() == ["pgrelay-agent", "pgrelay-worker", "pgrelay-worker"]


# --------------------------------------------------------------------------- #
# worker crash
# --------------------------------------------------------------------------- #


@pytest.mark.deadline(120)
def test_kill_9_of_a_worker_spares_other_workers_sessions_and_worker_is_replaced(
    relay_factory, pg
):
    relay = relay_factory(max_client_conn=100)
    workers = wait_for(lambda: len(relay.worker_pids()) == 2 and relay.worker_pids(),
                       timeout=10, what="2 workers")

    # open sessions until both workers hold some (pgrelay doesn't say which; /proc does)
    sessions = []  # (conn, worker pid, server backend pid)
    for _ in range(60):
        c = relay.connect()
        backend = c.execute("SELECT pg_backend_pid()").fetchone()[0]
        w = owning_worker(relay, client_port(c))
        assert w in workers, f"session not found in any worker ({w}, {workers})"
        sessions.append((c, w, backend))
        per_worker = {pid: sum(1 for s in sessions if s[1] == pid) for pid in workers}
        if min(per_worker.values()) >= 2:
            break
    assert min(per_worker.values()) >= 1, f"all sessions on one worker: {per_worker}"

    try:
        victim, survivor = workers
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: not pid_alive(victim), timeout=5, what="killed worker to die")

        for c, w, _ in sessions:
            if w == survivor:
                # sessions of the other worker carry on, including transactions
                assert _session_works(c), "session on the surviving worker broke"
                with c.transaction():
                    assert c.execute("SELECT %s::int", (w,)).fetchone() == (w,)
            else:
                with pytest.raises(psycopg.OperationalError):
                    c.execute("SELECT 1")

        # a new worker replaces the dead one
        new_workers = wait_for(
            lambda: (lambda ws: len(ws) == 2 and victim not in ws and ws)(relay.worker_pids()),
            timeout=10,
            what="a replacement worker",
        )
        assert survivor in new_workers
        replacement = (set(new_workers) - {survivor}).pop()

        # the dead worker's server connections are closed (no leaked backends)
        dead_backends = [b for _, w, b in sessions if w == victim]
        wait_for(lambda: not any(pg.pid_exists(b) for b in dead_backends), timeout=10,
                 what="the killed worker's backends to end")

        # new connections work; kill the other original worker so that only the
        # replacement can serve them
        os.kill(survivor, signal.SIGKILL)
        wait_for(lambda: not pid_alive(survivor), timeout=5, what="second worker to die")
        assert pid_alive(replacement)
        for _ in range(5):
            with relay.connect() as c:
                assert c.execute("SELECT 'new session'").fetchone() == ("new session",)
        assert relay.proc.poll() is None, "master died"
    finally:
        for c, _, _ in sessions:
            c.close()


def test_a_crash_looping_worker_is_restarted_with_growing_delays_and_counted(relay_factory):
    """A worker that dies young is re-forked after 100 ms, then 200, then 400...: a crash loop
    cannot fork-bomb the host. Each death is logged with its cause; show workers counts it."""
    relay = relay_factory(workers=1, agent="off")
    pids = [wait_for(lambda: relay.worker_pids(), timeout=10, what="the worker")[0]]
    for _ in range(3):
        os.kill(pids[-1], signal.SIGKILL)
        pids.append(wait_for(lambda: (lambda ws: ws and ws[0] not in pids and ws[0])(
            relay.worker_pids()), timeout=10, what="a replacement worker"))
    deaths = re.findall(r"worker 0 \(pid (\d+)\) was killed by signal 9 \(Killed\) after "
                        r"\d+ ms; \d+ session\(s\) lost; restarting in (\d+) ms", relay.log())
    assert [int(p) for p, _ in deaths] == pids[:3], relay.log_tail()
    assert [int(d) for _, d in deaths] == [100, 200, 400], deaths
    rows = admin_json(relay, "show workers")
    assert [(w["pid"], w["restarts"]) for w in rows] == [(pids[-1], 3)], rows
    with relay.connect() as c:
        assert c.execute("SELECT 'served'").fetchone() == ("served",)


# --------------------------------------------------------------------------- #
# client disconnects
# --------------------------------------------------------------------------- #


# A FIN only ends the client's sending side: the statement runs on, as on a direct connection
# (test_relay_hardening.py); a reset client can read nothing more, so pgrelay cancels for it.
@pytest.mark.parametrize("reset", [True], ids=["rst"])
def test_client_disconnecting_mid_query_frees_its_server_session(relay, pg, reset):
    app = f"disc-{uuid.uuid4().hex[:10]}"
    raw = RawClient(relay.port)
    raw.login(application_name=app)
    raw.send_query("SELECT pg_sleep(60)")
    backend = wait_for(lambda: pg.active_query_pid(app), timeout=10, what="pg_sleep to start")
    raw.close(reset=reset)
    wait_for(lambda: not pg.pid_exists(backend), timeout=5,
             what=f"server backend {backend} to end after the client left")


def test_client_disconnecting_while_idle_frees_its_server_session(relay, pg):
    app = f"disc-idle-{uuid.uuid4().hex[:10]}"
    raw = RawClient(relay.port)
    raw.login(application_name=app)
    assert raw.simple_query("SELECT 1")[-1][0] == "Z"
    backend = wait_for(lambda: pg.backend_pids(app), timeout=5, what="backend")[0]
    raw.close(reset=True)
    wait_for(lambda: not pg.pid_exists(backend), timeout=5, what="idle backend to end")


def test_client_disconnecting_inside_transaction_rolls_it_back(relay, pg):
    table = f"disc_tx_{uuid.uuid4().hex[:8]}"
    pg.query(f"CREATE TABLE {table} (id int)")
    app = f"disc-tx-{uuid.uuid4().hex[:10]}"
    raw = RawClient(relay.port)
    raw.login(application_name=app)
    raw.simple_query(f"BEGIN; INSERT INTO {table} VALUES (1)")
    backend = pg.backend_pids(app)[0]
    raw.close()
    wait_for(lambda: not pg.pid_exists(backend), timeout=5, what="backend to end")
    assert pg.query(f"SELECT count(*) FROM {table}") == [(0,)]


# --------------------------------------------------------------------------- #
# shutdown signals
# --------------------------------------------------------------------------- #


@pytest.mark.deadline(90)
def test_sigterm_lets_a_running_transaction_commit_then_exits(relay_factory, pg):
    relay = relay_factory(shutdown_timeout="20s")
    table = f"term_{uuid.uuid4().hex[:8]}"
    pg.query(f"CREATE TABLE {table} (id int)")
    app = f"term-{uuid.uuid4().hex[:8]}"

    tx = relay.connect(autocommit=False)
    tx.execute(f"INSERT INTO {table} VALUES (1)")
    idle = RawClient(relay.port)
    idle.login(application_name=app)
    idle_backend = pg.backend_pids(app)[0]
    busy = relay.connect(application_name=app + "-busy")
    busy_result = {}
    busy_thread = threading.Thread(
        target=lambda: busy_result.update(r=busy.execute("SELECT pg_sleep(1.5), 'done'").fetchone()[1]),
        daemon=True,
    )
    busy_thread.start()
    wait_for(lambda: pg.active_query_pid(app + "-busy"), timeout=10, what="busy query")
    workers = relay.worker_pids()

    relay.signal(signal.SIGTERM)

    # idle sessions are told to go away (FATAL 57P01) and closed
    msgs = idle.read_to_eof()
    fields = error_fields(msgs)
    assert fields and fields.get("C") == "57P01" and fields.get("S") == "FATAL", msgs
    wait_for(lambda: not pg.pid_exists(idle_backend), timeout=5, what="idle backend to end")

    # no new sessions
    wait_for(lambda: _connection_refused(relay.port), timeout=5,
             what="new connections to be refused")

    # the running query finishes normally
    busy_thread.join(10)
    assert busy_result.get("r") == "done"

    # the open transaction continues and commits
    assert relay.proc.poll() is None, "master exited while a transaction was still open"
    tx.execute(f"INSERT INTO {table} VALUES (2)")
    assert tx.execute("SELECT count(*) FROM " + table).fetchone() == (2,)
    tx.commit()
    assert pg.query(f"SELECT id FROM {table} ORDER BY id") == [(1,), (2,)]

    # with its last transaction over, the session ends and the master exits
    tx.close()
    busy.close()

    assert relay.wait_exit(10) == 0
    assert not port_accepts(relay.port)
    wait_for(lambda: not any(pid_alive(w) for w in workers), timeout=5, what="workers to exit")


@pytest.mark.deadline(60)
def test_sigterm_closes_a_transaction_that_outlives_shutdown_timeout(relay_factory, pg):
    relay = relay_factory(shutdown_timeout="2s")
    tx = relay.connect(autocommit=False)
    tx.execute("SELECT 1")
    backend = tx.execute("SELECT pg_backend_pid()").fetchone()[0]
    t0 = time.monotonic()
    relay.signal(signal.SIGTERM)
    assert relay.wait_exit(15) == 0
    elapsed = time.monotonic() - t0
    # pgrelay(8): the session is closed at shutdown_timeout (2 s), by its worker: not before,
    # and not by the master's SIGKILL 5 s after the deadline.
    assert 1.9 <= elapsed < 2 + SCHED_SLACK, f"exited after {elapsed:.1f}s, shutdown_timeout=2s"
    assert "still running after the shutdown deadline" not in relay.log(), relay.log()
    with pytest.raises(psycopg.OperationalError):
        tx.execute("SELECT 1")
    tx.close()
    wait_for(lambda: not pg.pid_exists(backend), timeout=5, what="backend to end")


@pytest.mark.deadline(60)
def test_sigint_closes_sessions_immediately_and_exits(relay_factory, pg):
    relay = relay_factory(shutdown_timeout="30s")
    table = f"int_{uuid.uuid4().hex[:8]}"
    pg.query(f"CREATE TABLE {table} (id int)")
    idle = relay.connect()
    tx = relay.connect(autocommit=False)
    tx.execute(f"INSERT INTO {table} VALUES (1)")
    backends = [c.execute("SELECT pg_backend_pid()").fetchone()[0] for c in (idle, tx)]
    workers = relay.worker_pids()

    relay.signal(signal.SIGINT)
    assert relay.wait_exit(5) == 0

    for c in (idle, tx):
        with pytest.raises(psycopg.OperationalError):
            c.execute("SELECT 1")
        c.close()
    assert not port_accepts(relay.port)
    wait_for(lambda: not any(pid_alive(w) for w in workers), timeout=5, what="workers to exit")
    wait_for(lambda: not any(pg.pid_exists(b) for b in backends), timeout=5,
             what="server backends to end")
    # the unfinished transaction was not committed
    assert pg.query(f"SELECT count(*) FROM {table}") == [(0,)]


@pytest.mark.deadline(60)
def test_sigquit_exits_immediately(relay_factory):
    relay = relay_factory()
    c = relay.connect(autocommit=False)
    c.execute("SELECT 1")
    workers = relay.worker_pids()
    relay.signal(signal.SIGQUIT)
    assert relay.wait_exit(5) == 0
    wait_for(lambda: not any(pid_alive(w) for w in workers), timeout=5, what="workers to exit")
    assert not port_accepts(relay.port)
    with pytest.raises(psycopg.OperationalError):
        c.execute("SELECT 1")
    c.close()


# --------------------------------------------------------------------------- #
# daemon mode
# --------------------------------------------------------------------------- #


@pytest.mark.deadline(60)
def test_daemon_mode_detaches_writes_pidfile_and_serves(pg, tmp_path, daemons):
    port = free_port()
    conf = str(tmp_path / "pgrelay.ini")
    logfile = str(tmp_path / "daemon.log")
    write_config(conf, port, pg, extra={"logfile": logfile})
    d = daemons(conf, tmp_path / "pgrelay.pid")
    r = d.run()
    assert r.returncode == 0, r.stderr
    pid = d.wait_pid()
    assert pid_alive(pid)
    wait_for(lambda: port_listening(port), timeout=5, what="daemon to listen")
    c = psycopg.connect(f"host=127.0.0.1 port={port} user=postgres dbname=postgres "
                        "sslmode=disable connect_timeout=10", autocommit=True)
    with c:
        assert c.execute("SELECT 'daemon'").fetchone() == ("daemon",)

    # a second instance with the same pidfile refuses to start
    r = d.run()
    assert r.returncode == 1, r.stderr
    assert "already running" in r.stderr, r.stderr
    assert d.pid() == pid

    d.stop()
    assert not port_accepts(port)
    # its log lines went to the configured log file
    with open(logfile) as f:
        assert f"pid {pid}]" in f.read()
