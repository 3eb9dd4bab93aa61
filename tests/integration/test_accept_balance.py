"""New connections spread over the workers (issue 10 item 13).

Each worker accepts from its own listen socket, one per worker in an SO_REUSEPORT group that
the master opened before forking: the kernel spreads connections over them, where a single
shared socket let whichever worker won the race take a burst (one took 1,615 of 2,000 in
tests/bench/accept_balance.py). The master keeps every socket open, so connections queued on a
worker that dies are not lost: the first running worker after it accepts them until its
successor runs, and likewise for a worker that is stuck (stopped, hung) until it runs again.
"""

import json
import os
import signal
import socket
import subprocess
import threading

from conftest import PGRELAY_BIN, admin, owning_worker, wait_for

WORKERS = 4
N = 1000
BURSTS = 3
SSL_REQUEST = b"\0\0\0\x08\x04\xd2\x16\x2f"  # answered 'N' by the worker itself
CHILD_DELAY_MS = 10000  # PGRELAY_TEST_CHILD_DELAY_MS: a respawned worker serves after this
STUCK_S = 3  # WORKER_STUCK_MS: a worker not running this long has its socket taken over


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


def ssl_requests(port, n):
    """n connections that each sent an SSLRequest, non-blocking."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(SSL_REQUEST)
        s.setblocking(False)
        socks.append(s)
    return socks


def takes_new_sessions(relay, index, more):
    """A new held connection; True once worker ``index`` has a session (it accepts again)."""
    more.append(socket.create_connection(("127.0.0.1", relay.port)))
    return show(relay, "workers")[index]["sessions"] > 0


def test_connections_for_a_worker_that_dies_are_served_by_another(relay_factory):
    """Worker 1 is killed; its successor is held by the child-delay hook: the connections the
    kernel gives worker 1's socket meanwhile are answered by the next running worker (once the
    successor has not run for STUCK_S after its fork), before the successor could, and none is
    reset; then the successor takes its socket over."""
    relay = relay_factory(workers=WORKERS, max_client_conn=5000, client_startup_timeout="0",
                          env={"PGRELAY_TEST_CHILD_DELAY_MS": str(CHILD_DELAY_MS)})
    warm = []
    try:  # every worker out of the hook's delay and accepting
        wait_for(lambda: warm.append(socket.create_connection(("127.0.0.1", relay.port))) or
                 all(w["sessions"] > 0 for w in show(relay, "workers")),
                 timeout=CHILD_DELAY_MS / 1000 + 15, interval=0.05, what="every worker running")
    finally:
        for s in warm:
            s.close()
    before = {w["pid"] for w in show(relay, "workers")}
    victim = show(relay, "workers")[1]["pid"]
    # from here until its successor leaves the hook's delay, no console call: the successor
    # holds a copy of any console connection open at its fork until then (the hook's way)
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: relay.log().count("worker 1 started") == 2, timeout=5,
             what="worker 1 respawned")
    # named by the child itself just after the fork: polled, it may not have run yet
    [successor] = wait_for(lambda: set(relay.worker_pids()) - before, timeout=5,
                           what="worker 1's successor to name itself")
    socks, answers, more = ssl_requests(relay.port, 200), {}, []

    def successor_accepts():
        s = socket.create_connection(("127.0.0.1", relay.port))
        more.append(s)
        return wait_for(lambda: owning_worker(relay, s.getsockname()[1]), timeout=5,
                        what="the connection's worker") == successor

    try:
        wait_for(lambda: answered(socks, answers) == len(socks),
                 timeout=CHILD_DELAY_MS / 1000 - 2,
                 what="every connection answered before worker 1's successor runs")
        assert set(answers.values()) == {b"N"}, answers
        wait_for(successor_accepts, timeout=CHILD_DELAY_MS / 1000 + 10, interval=0.1,
                 what="worker 1's successor to accept")
    finally:
        for s in socks + more:
            s.close()


def test_connections_for_a_stopped_worker_are_served_by_another_until_it_runs(relay_factory):
    """Worker 2 stopped (SIGSTOP: alive, but its loop does not turn): past its heartbeat's
    limit (STUCK_S) the next running worker accepts from its socket, so every connection is
    answered while it is stopped; once it runs again (SIGCONT) it takes its share again."""
    relay = relay_factory(workers=WORKERS, max_client_conn=5000, client_startup_timeout="0")
    victim = show(relay, "workers")[2]["pid"]
    socks, answers, more = [], {}, []
    os.kill(victim, signal.SIGSTOP)
    try:
        socks = ssl_requests(relay.port, 200)
        wait_for(lambda: answered(socks, answers) == len(socks), timeout=10,
                 what="every connection answered while worker 2 is stopped")
        assert set(answers.values()) == {b"N"}, answers
    finally:
        os.kill(victim, signal.SIGCONT)
        for s in socks:
            s.close()
    try:
        wait_for(lambda: takes_new_sessions(relay, 2, more), timeout=10, interval=0.1,
                 what="worker 2 to accept again")
        assert show(relay, "workers")[2]["pid"] == victim  # the same process: not restarted
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
