"""pgrelay-control: garbage, clients that leave, an unreachable store, a second instance.

Every test gets its own store (a fresh database in the session's PostgreSQL 15) and its own
bin/pgrelay-control (or $PGRELAY_CONTROL_BIN, e.g. the AddressSanitizer build) started from a
generated control.ini; agents are simulated with Python HTTP clients (SimAgent) that register,
upload metrics and long-poll for commands in a thread, answering each command as the test's
policy says (control_helpers.py). What is asserted is what agents, operators and pgrelayctl
rely on:

  * garbage on the socket never hurts the server; clients that leave held requests do not;
  * an unreachable store means not ready and 503, but no exit;
  * a second instance with the same pidfile refuses to start.
"""

import contextlib
import json
import random
import socket
import subprocess
import time

from conftest import free_port, http_call as call, pid_alive, wait_for
from control_helpers import (  # noqa: F401,F811 (fixtures used by name)
    ADMIN,
    API,
    CONTROL_BIN,
    TOKENS,
    agents,
    control,
    control_factory,
    never,
    store,
    write_ini,
)


# --------------------------------------------------------------------------- #
# robustness
# --------------------------------------------------------------------------- #


def raw_exchange(port, data, timeout=5, shutdown=True):
    """Send bytes; return whatever comes back before the server closes or timeout."""
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    try:
        with contextlib.suppress(OSError):
            s.sendall(data)
            if shutdown:
                s.shutdown(socket.SHUT_WR)
        out = b""
        with contextlib.suppress(OSError):
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    break
                out += chunk
        return out
    finally:
        s.close()


def test_garbage_never_hurts_the_server(control, agents):
    rnd = random.Random(1234)
    a = agents(control, "proxy-a")
    # random bytes, with and without a request line
    for _ in range(20):
        raw_exchange(control.port, bytes(rnd.randrange(256) for _ in range(rnd.randrange(1, 3000))))
    raw_exchange(control.port, b"GET /healthz HTTP/1.1\r\n" + b"\xff" * 5000 + b"\r\n\r\n")
    # huge headers
    answer = raw_exchange(control.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: "
                          + b"a" * 200000 + b"\r\n\r\n")
    assert not answer.startswith(b"HTTP/1.1 200")
    many = b"".join(b"X-H%d: v\r\n" % i for i in range(5000))
    raw_exchange(control.port, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + many + b"\r\n")
    # a body larger than 4 MiB is 413 (refused on its Content-Length, before it is sent)
    answer = raw_exchange(control.port, b"POST /api/v1/agent/metrics HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 5000000\r\n\r\n{", shutdown=False)
    assert answer.startswith(b"HTTP/1.1 413"), answer[:100]
    # truncated bodies and connections closed half-way
    raw_exchange(control.port, b"POST /api/v1/agent/metrics HTTP/1.1\r\nHost: x\r\n"
                 b"Authorization: Bearer " + TOKENS["prod"].encode()
                 + b"\r\nContent-Length: 1000\r\n\r\n{\"node_id\":")
    raw_exchange(control.port, b"POST /api/v1/agent/register HTTP/1.1\r\nHost: x\r\n"
                 b"Transfer-Encoding: chunked\r\n\r\nzz\r\nnot hex\r\n")
    # deeply nested and odd JSON
    for raw in (b"[" * 100000, b'{"node_id": "a", "nodes": [' + b"[" * 5000 + b"]",
                b'{"node_id": "a\\u0000b"}', b"null", b'"text"', b"{}" * 1000):
        status, answer = control.agent("POST", "/metrics", raw=raw)
        assert status == 400, (raw[:40], answer)
    # a long poll whose client goes away, then a command for it
    agents(control, "gone", poll=False)
    s = socket.create_connection(("127.0.0.1", control.port))
    s.sendall(b"GET /api/v1/agent/commands?node_id=gone&wait_s=30 HTTP/1.1\r\nHost: x\r\n"
              b"Authorization: Bearer " + TOKENS["prod"].encode() + b"\r\n\r\n")
    wait_for(lambda: control.polling("gone"), what="the poll of gone to be parked")
    s.close()
    wait_for(lambda: not control.polling("gone"), what="the hang-up to be noticed")
    status, answer = control.admin("POST", "/deployments/prod/maintenance",
                                   {"on": True, "timeout_s": 1})
    assert status == 504  # "gone" never answers; proxy-a does
    assert {p["node_id"]: p["ok"] for p in answer["proxies"]} == {"gone": False,
                                                                   "proxy-a": True}
    # many connections at once, each abandoned mid-request
    socks = [socket.create_connection(("127.0.0.1", control.port)) for _ in range(100)]
    for i, s in enumerate(socks):
        request = (b"POST /api/v1/agent/register HTTP/1.1\r\nContent-Length: 60\r\n"
                   b"Authorization: Bearer " + TOKENS["prod"].encode()
                   + b'\r\n\r\n{"node_id": "abandoned-%d"}' % i)
        s.sendall(request[: len(request) * i // len(socks)])
    for s in socks:
        s.close()
    # still serving, and still correct
    assert pid_alive(control.pid)
    assert control.call("GET", "/healthz") == (200, "ok\n")
    assert a.metrics(clients=1)["epoch"] == 0
    assert set(control.proxies()) == {"proxy-a", "gone"}


def test_clients_that_leave_held_requests_do_not_hurt(control, agents):
    silent = agents(control, "proxy-a", policy=never)
    # an operator gives up on a held request; the orchestration still ends by itself
    raw = json.dumps({"on": True, "timeout_s": 1}).encode()
    s = socket.create_connection(("127.0.0.1", control.port))
    s.sendall(b"POST /api/v1/deployments/prod/maintenance HTTP/1.1\r\nHost: x\r\n"
              b"Authorization: Bearer " + ADMIN.encode()
              + b"\r\nContent-Length: %d\r\n\r\n" % len(raw) + raw)
    wait_for(lambda: silent.types() == ["maintenance"], what="the maintenance to be under way")
    s.close()
    # a long poll whose client leaves before its wait ends
    agents(control, "leaver", poll=False)
    s = socket.create_connection(("127.0.0.1", control.port))
    s.sendall(b"GET /api/v1/agent/commands?node_id=leaver&wait_s=30 HTTP/1.1\r\nHost: x\r\n"
              b"Authorization: Bearer " + TOKENS["prod"].encode() + b"\r\n\r\n")
    wait_for(lambda: control.polling("leaver"), what="the poll of leaver to be parked")
    s.close()
    wait_for(lambda: not control.polling("leaver"), what="the hang-up to be noticed")
    assert control.call("GET", "/healthz") == (200, "ok\n")
    # the first orchestration is over: a new one may start
    status, _ = control.admin("POST", "/deployments/stage/maintenance", {"on": False})
    assert status == 200
    wait_for(lambda: control.admin("POST", "/deployments/prod/reload",
                                   {"timeout_s": 1})[0] == 504, what="prod to be free again")


def test_unreachable_store_means_not_ready_and_503_but_no_exit(tmp_path):
    dead = f"host=127.0.0.1 port={free_port()} user=postgres dbname=x connect_timeout=2"
    port = free_port()
    conf = tmp_path / "control.ini"
    write_ini(conf, port, dead)
    log_path = tmp_path / "control.log"
    with open(log_path, "w") as logf:
        proc = subprocess.Popen([CONTROL_BIN, "-c", str(conf)], stdout=logf,
                                stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _healthy(port), what="the process to answer /healthz")
        status, text = call(port, "GET", "/readyz")
        assert status == 503 and "store" in text
        status, answer = call(port, "GET", API + "/deployments", token=ADMIN)
        assert status == 503 and "store" in answer["error"]
        time.sleep(1.5)  # a few retries
        assert proc.poll() is None  # it keeps retrying instead of exiting
        assert log_path.read_text().count("not reachable") <= 2  # logged once, not per retry
    finally:
        proc.terminate()
        assert proc.wait(timeout=15) == 0
    assert "Sanitizer" not in log_path.read_text()


def _healthy(port):
    try:
        return call(port, "GET", "/healthz", timeout=2)[0] == 200
    except OSError:
        return False


def test_a_second_instance_with_the_same_pidfile_refuses(control_factory, tmp_path, store):
    pidfile = tmp_path / "control.pid"
    conf = tmp_path / "control.ini"
    port = free_port()
    write_ini(conf, port, store)
    first = subprocess.Popen([CONTROL_BIN, "-c", str(conf), "-p", str(pidfile)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port), what="the first instance")
        assert pidfile.read_text().strip() == str(first.pid)
        p = subprocess.run([CONTROL_BIN, "-c", str(conf), "-p", str(pidfile)],
                           capture_output=True, text=True, timeout=10)
        assert p.returncode == 1 and "already running" in p.stderr
    finally:
        first.terminate()
        assert first.wait(timeout=15) == 0
    assert not pidfile.exists()
