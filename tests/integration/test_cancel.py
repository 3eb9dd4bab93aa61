"""Query cancellation through pgrelay (CancelRequest may reach any worker)."""

import re
import struct
import threading
import time
import uuid

from psycopg import errors

from conftest import CANCEL_REQUEST_CODE, SCHED_SLACK, RawClient, client_port, owning_worker, wait_for
from loadgen import InThread


def query_in_thread(conn, sql):
    """``sql`` on ``conn`` in a thread; its rows become .value, an exception .error."""
    return InThread(lambda: conn.execute(sql).fetchall())


def start_sleep(relay, pg, seconds=30):
    app = f"cancel-{uuid.uuid4().hex[:10]}"
    conn = relay.connect(application_name=app)
    q = query_in_thread(conn, f"SELECT pg_sleep({seconds})")
    backend = wait_for(
        lambda: pg.active_query_pid(app), timeout=10, what="pg_sleep to start on the server"
    )
    return conn, q, backend


def test_cancel_interrupts_running_query_repeatedly(relay, pg):
    # 12 rounds x 2 workers: the cancel connection lands on a random worker, so both
    # "same worker" and "other worker" cancels are exercised with near certainty
    for round_ in range(12):
        conn, q, _ = start_sleep(relay, pg)
        with conn:
            cancelled_at = time.monotonic()
            conn.cancel()
            q.join(10)
            assert isinstance(q.error, errors.QueryCanceled), f"round {round_}: {q.error!r}"
            assert q.error.sqlstate == "57014"
            # no promise of speed (pgrelay(8) makes none): only that the cancel, not the end
            # of the 30 s sleep, ended it
            took = q.finished_at - cancelled_at
            assert took < SCHED_SLACK, f"round {round_}: took {took:.2f}s"
            # the session survives the cancel
            assert conn.execute("SELECT 'after cancel'").fetchone() == ("after cancel",)


def test_cancel_hits_only_the_targeted_session(relay, pg):
    conn_a, qa, _ = start_sleep(relay, pg, seconds=3)
    conn_b, qb, _ = start_sleep(relay, pg, seconds=30)
    with conn_a, conn_b:
        conn_b.cancel()
        qb.join(10)
        assert isinstance(qb.error, errors.QueryCanceled)
        qa.join(15)
        assert qa.error is None, f"untargeted session was disturbed: {qa.error!r}"
        assert qa.value is not None and len(qa.value) == 1


SLOT_BITS = 20  # proxy/cancel.c: the low 20 bits of pgrelay's key pid name a session slot + 1


def test_cancel_request_with_wrong_key_cancels_nothing(relay, pg):
    conn, q, backend_pid = start_sleep(relay, pg, seconds=2)
    with conn:
        key_pid = conn.info.backend_pid  # pgrelay's key, not the backend's
        assert key_pid != backend_pid
        cases = [
            # the session's key pid with a wrong secret
            (key_pid, 12345, "cancel request with a wrong secret for session"),
            # the session's slot with another tag: a session that is not there
            (key_pid ^ (1 << SLOT_BITS), 0, "cancel request for a session that does not exist"),
            # slot 0 names no session at all
            (1 << SLOT_BITS, 1, "cancel request with an unknown key"),
            # the backend's own pid: pgrelay keys are the only ones that count
            (backend_pid, 0, "; ignored"),
        ]
        for pid, key, logged in cases:
            mark = len(relay.log())
            with RawClient(relay.port) as raw:
                me = "127.0.0.1:%d" % raw.sock.getsockname()[1]
                raw.send(struct.pack("!iIiI", 16, CANCEL_REQUEST_CODE, pid, key))
                # pgrelay closes the cancel connection without answering
                assert raw.read_message() is None
            wait_for(lambda: [line for line in relay.log()[mark:].splitlines()
                              if f"client {me}: " in line and logged in line],
                     timeout=5, what=f"{logged!r} logged for the cancel of pid {pid}")
        q.join(15)
        assert q.error is None, f"query was cancelled by a wrong key: {q.error!r}"


def test_a_cancel_accepted_by_another_worker_reaches_the_node(relay_factory, pg):
    """The cancel's connection lands on whichever worker accepts it first; repeat until one
    lands on another worker than the session's, and check that worker forwarded it."""
    relay = relay_factory(log_level="debug")
    for round_ in range(60):
        conn, q, _ = start_sleep(relay, pg)
        with conn:
            owner = owning_worker(relay, client_port(conn))
            assert owner, "no worker holds the session"
            mark = len(relay.log())
            conn.cancel()
            q.join(10)
            assert isinstance(q.error, errors.QueryCanceled), f"round {round_}: {q.error!r}"
            forwarded = wait_for(
                lambda: re.findall(r"\[worker \d+ pid (\d+)\] debug: client \S+: forwarding "
                                   r"cancel", relay.log()[mark:]),
                timeout=5, what="the forwarding worker's log line")
            if int(forwarded[-1]) != owner:
                return
    raise AssertionError("60 cancels all landed on the session's own worker")


def test_cancel_of_idle_session_is_harmless(relay_factory):
    relay = relay_factory(log_level="debug")
    with relay.connect() as conn:
        conn.execute("SELECT 1")
        mark = len(relay.log())
        conn.cancel()
        # The cancel really went to the node (an idle backend ignores it) ...
        wait_for(lambda: "forwarding cancel of session" in relay.log()[mark:], timeout=5,
                 what="the cancel to be forwarded")
        # ... and neither the session nor its next statement pays for it.
        assert conn.execute("SELECT pg_sleep(0.3), 'still here'").fetchone()[1] == "still here"
        assert conn.execute("SELECT 'and after'").fetchone() == ("and after",)


def test_cancel_inside_transaction_aborts_only_the_statement(relay, pg):
    app = f"cancel-tx-{uuid.uuid4().hex[:8]}"
    with relay.connect(application_name=app, autocommit=False) as conn:
        conn.execute("SELECT 1")
        q = query_in_thread(conn, "SELECT pg_sleep(30)")
        wait_for(lambda: pg.active_query_pid(app), timeout=10, what="pg_sleep")
        conn.cancel()
        q.join(10)
        assert isinstance(q.error, errors.QueryCanceled)
        conn.rollback()
        assert conn.execute("SELECT 5").fetchone() == (5,)
        conn.commit()


def test_cancels_from_many_sessions_concurrently(relay, pg):
    sessions = [start_sleep(relay, pg) for _ in range(20)]
    try:
        t0 = time.monotonic()
        threads = [threading.Thread(target=c.cancel) for c, _, _ in sessions]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        for conn, q, _ in sessions:
            q.join(10)
            assert isinstance(q.error, errors.QueryCanceled), repr(q.error)
            # not a promise of speed: only that no cancel waited for the 30 s sleep to end
            assert q.finished_at - t0 < 10, q.finished_at - t0
    finally:
        for conn, _, _ in sessions:
            conn.close()
