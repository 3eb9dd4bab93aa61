"""`pause` says how many sessions are still busy, and `pause wait` answers once every session is
at a safe point, as PgBouncer's PAUSE does (issue 13 item 7)."""

import socket
import threading
import time

from conftest import admin, admin_json, admin_socket, wait_for


def open_admin(relay, line):
    """A console connection that sent ``line`` and keeps its write side open."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(admin_socket(relay))
    s.sendall(line.encode() + b"\n")
    return s


def read_answer(s, timeout):
    s.settimeout(timeout)
    chunks = []
    while True:
        data = s.recv(65536)
        if not data:
            return b"".join(chunks).decode()
        chunks.append(data)


def answered_within(s, seconds):
    """True when pgrelay wrote anything on s within ``seconds``."""
    s.settimeout(seconds)
    try:
        return s.recv(1, socket.MSG_PEEK) != b""
    except socket.timeout:
        return False


def test_pause_counts_the_sessions_still_in_a_transaction(relay):
    idle = relay.connect()
    in_tx = relay.connect(autocommit=False)
    try:
        in_tx.execute("SELECT 1")  # BEGIN sent: the session is inside a transaction
        answer = admin(relay, "pause")
        assert answer.startswith("maintenance on"), answer
        assert "1 session(s) busy (0 running a statement, 1 in a transaction)" in answer, answer
        in_tx.commit()
        assert "no session is busy" in admin(relay, "pause"), "a second pause counts again"
    finally:
        admin(relay, "resume")
        idle.close()
        in_tx.close()


def test_pause_wait_answers_when_the_last_transaction_ends(relay):
    in_tx = relay.connect(autocommit=False)
    try:
        in_tx.execute("SELECT 1")
        s = open_admin(relay, "pause wait")
        try:
            # still in a transaction: no answer (0.5 s is a bound on a negative, not a sync)
            assert not answered_within(s, 0.5)
            assert admin_json(relay, "show info")["maintenance"] == "on"
            in_tx.commit()  # the transaction may end while paused
            answer = read_answer(s, 10)
        finally:
            s.close()
        assert answer.startswith("maintenance on: every session is at a safe point"), answer
        assert answer.endswith("\n\n"), answer
        # the next statement of that session is held until resume
        done = threading.Event()

        def next_statement():
            in_tx.execute("SELECT 2")
            in_tx.commit()
            done.set()

        t = threading.Thread(target=next_statement)
        t.start()
        assert not done.wait(0.5), "a statement ran while paused"
        assert admin(relay, "resume").startswith("maintenance off")
        assert done.wait(10)
        t.join()
    finally:
        admin(relay, "resume")
        in_tx.close()


def test_pause_wait_waits_for_a_running_statement(relay):
    conn = relay.connect()
    started = threading.Event()
    result = {}

    def long_statement():
        started.set()
        result["row"] = conn.execute("SELECT pg_sleep(1), 42").fetchone()

    t = threading.Thread(target=long_statement)
    try:
        t.start()
        started.wait(5)
        wait_for(lambda: "active" in admin(relay, "show clients"), what="the statement to run")
        t0 = time.monotonic()
        answer = admin(relay, "pause wait", timeout=15)
        assert answer.startswith("maintenance on: every session is at a safe point"), answer
        t.join(10)
        assert result["row"][1] == 42  # the running statement finished normally
        assert time.monotonic() - t0 < 5
    finally:
        admin(relay, "resume")
        t.join(10)
        conn.close()


def test_pause_wait_with_a_timeout_says_what_is_still_busy_and_stays_paused(relay):
    in_tx = relay.connect(autocommit=False)
    try:
        in_tx.execute("SELECT 1")
        answer = admin(relay, "pause wait 300ms")
        assert answer.startswith("error: 1 session(s) still busy after"), answer
        assert "1 in a transaction); maintenance stays on" in answer, answer
        assert admin_json(relay, "show info")["maintenance"] == "on"
    finally:
        admin(relay, "resume")
        in_tx.close()


def test_resume_ends_a_pause_wait_with_an_error(relay):
    in_tx = relay.connect(autocommit=False)
    try:
        in_tx.execute("SELECT 1")
        s = open_admin(relay, "pause wait")
        try:
            assert not answered_within(s, 0.3)
            admin(relay, "resume")
            answer = read_answer(s, 10)
        finally:
            s.close()
        assert answer.startswith("error: resumed after"), answer
    finally:
        admin(relay, "resume")
        in_tx.close()


def test_pause_wait_in_usage_and_help(relay):
    assert "pause wait" in admin(relay, "help")
    assert admin(relay, "pause wait soon").startswith("error: \"soon\" is not a duration")
    assert admin_json(relay, "show info")["maintenance"] == "off"  # a refused one pauses nothing
