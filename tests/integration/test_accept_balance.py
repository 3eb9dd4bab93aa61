"""New connections spread over the workers (issue 10 item 13).

Each worker accepts from its own listen socket, one per worker in an SO_REUSEPORT group that
the master opened before forking: the kernel spreads connections over them, where a single
shared socket let whichever worker won the race take a burst (one took 1,615 of 2,000 in
tests/bench/accept_balance.py). The master keeps every socket open, so connections queued on a
worker that dies are not lost: the first live worker after it accepts them until the master
has started its successor, which then takes its socket over.
"""

import json
import os
import signal
import socket
import subprocess
import threading

from conftest import PGRELAY_BIN, admin, wait_for

WORKERS = 4
N = 1000
BURSTS = 3
SSL_REQUEST = b"\0\0\0\x08\x04\xd2\x16\x2f"  # answered 'N' by the worker itself
CHILD_DELAY_MS = 6000  # PGRELAY_TEST_CHILD_DELAY_MS: a respawned worker serves after this


def show(relay, what):
    return json.loads(admin(relay, f"show {what} json"))


def assert_fair(counts, what):
    """No worker took more than 1.5 times its fair share, or less than half of it (a kernel
    hash over 1,000 client ports lands within a few percent; the accept race did not)."""
    fair = sum(counts) / len(counts)
    assert max(counts) <= 1.5 * fair and min(counts) >= 0.5 * fair, \
        f"{what}: per worker {counts} (fair share {fair:.0f})"


def in_threads(n, threads, fn):
    ts = [threading.Thread(target=fn, args=(n // threads + (i < n % threads),))
          for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def test_a_burst_of_connections_spreads_over_the_workers(relay_factory):
    relay = relay_factory(workers=WORKERS, max_client_conn=5000, client_startup_timeout="0")
    # held: N connections opened at once from 8 threads, three times
    for burst in range(BURSTS):
        held, lock = [], threading.Lock()

        def open_many(k):
            mine = [socket.create_connection(("127.0.0.1", relay.port)) for _ in range(k)]
            with lock:
                held.extend(mine)

        try:
            in_threads(N, 8, open_many)
            counts = wait_for(lambda: (lambda c: c if sum(c) >= N else None)(
                [w["sessions"] for w in show(relay, "workers")]), timeout=20,
                what=f"{N} sessions accepted")
            assert_fair(counts, f"burst {burst + 1} held open")
        finally:
            for s in held:
                s.close()
        wait_for(lambda: sum(w["sessions"] for w in show(relay, "workers")) == 0, timeout=20,
                 what="the burst's sessions to end")

    # churn: connections opened and closed one after another, as by pgbench -C
    def totals():
        return [w["sessions_total"] for w in show(relay, "stats")["workers"]
                if w["worker"] != "total"]

    before = totals()

    def churn(k):
        for _ in range(k):
            with socket.create_connection(("127.0.0.1", relay.port)) as s:
                s.sendall(SSL_REQUEST)
                assert s.recv(1) == b"N"

    in_threads(N, 4, churn)
    counts = wait_for(lambda: (lambda c: c if sum(c) >= N else None)(
        [a - b for a, b in zip(totals(), before)]), timeout=20, what=f"{N} sessions counted")
    assert_fair(counts, "one connection after another")


def answered(socks, answers):
    """Read the one-byte answer of every socket that has one (non-blocking)."""
    for i, s in enumerate(socks):
        if i in answers:
            continue
        try:
            b = s.recv(1)
        except BlockingIOError:
            continue
        answers[i] = b
    return len(answers)


def test_connections_queued_on_a_worker_that_dies_are_served_by_another(relay_factory):
    """Worker 1 stopped (SIGSTOP): the connections the kernel gives its socket wait there; it
    is then killed, and its successor is held by the child-delay hook: the next live worker
    serves them all, long before the successor could, and none is reset."""
    relay = relay_factory(workers=WORKERS, max_client_conn=5000, client_startup_timeout="0",
                          env={"PGRELAY_TEST_CHILD_DELAY_MS": str(CHILD_DELAY_MS)})
    wait_for(lambda: all(w["pid"] for w in show(relay, "workers")), timeout=20,
             what="every worker started")
    victim = show(relay, "workers")[1]["pid"]
    # the workers leave the hook's delay before they accept: every one answers first
    socks, answers = [], {}
    os.kill(victim, signal.SIGSTOP)
    try:
        for _ in range(200):
            s = socket.create_connection(("127.0.0.1", relay.port))
            s.sendall(SSL_REQUEST)
            s.setblocking(False)
            socks.append(s)
        wait_for(lambda: answered(socks, answers) >= 100, timeout=20,
                 what="the live workers to answer their share")
        pending = len(socks) - answered(socks, answers)
        assert pending > 0, "no connection was queued on the stopped worker"
        os.kill(victim, signal.SIGKILL)
        wait_for(lambda: answered(socks, answers) == len(socks),
                 timeout=CHILD_DELAY_MS / 1000 * 0.7,
                 what=f"the {pending} connections queued on the dead worker to be answered "
                      "before its successor runs")
        assert set(answers.values()) == {b"N"}, answers
        rows = show(relay, "workers")
        assert rows[1]["pid"] != victim
    finally:
        for s in socks:
            s.close()
        try:
            os.kill(victim, signal.SIGCONT)
        except ProcessLookupError:
            pass
    # its successor takes its socket over once out of the hook's delay (and the neighbour
    # stops taking from it): new connections reach worker 1 again
    more = []

    def worker_1_serves():
        s = socket.create_connection(("127.0.0.1", relay.port))
        more.append(s)
        return show(relay, "workers")[1]["sessions"] > 0

    try:
        wait_for(worker_1_serves, timeout=CHILD_DELAY_MS / 1000 + 10, interval=0.1,
                 what="worker 1's successor to accept")
    finally:
        for s in more:
            s.close()


def test_a_second_pgrelay_on_the_same_port_is_refused_not_let_into_the_group(relay_factory):
    """SO_REUSEPORT would let another process of the same user bind the port too and take a
    share of the connections: a second pgrelay started on the port by mistake fails at start
    with "Address already in use", as it did with one shared socket."""
    relay = relay_factory(workers=WORKERS)
    with open(relay.conf_path) as f:
        text = f.read()
    other = os.path.join(relay.workdir, "second.ini")
    with open(other, "w") as f:
        f.write(text.replace(os.path.join(relay.workdir, "admin.sock"),
                             os.path.join(relay.workdir, "second.sock")))
    p = subprocess.run([PGRELAY_BIN, "-c", other], capture_output=True, text=True, timeout=20)
    assert p.returncode != 0, p.stderr
    assert f"cannot listen on 127.0.0.1:{relay.port}: bind: Address already in use" \
        in p.stdout + p.stderr, (p.stdout, p.stderr)
    # the first one still takes every connection
    for _ in range(20):
        with socket.create_connection(("127.0.0.1", relay.port)) as s:
            s.sendall(SSL_REQUEST)
            assert s.recv(1) == b"N"
