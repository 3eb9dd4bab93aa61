#!/usr/bin/python3
"""How a burst of new connections spreads over pgrelay's workers (issue 10 item 13).

Starts bin/pgrelay (WORKERS workers, a node nobody listens on: no session gets past its
startup packet, which is all an accept needs) and, per round:

* burst: opens N TCP connections as fast as it can from T threads and holds them; then reads
  `show workers json` (live sessions per worker);
* churn: opens and closes N connections one after another from T threads (like pgbench -C);
  reads the per-worker sessions_total of `show stats json` before and after.

Prints per round the count per worker, the largest share over the fair share (1.00 = even)
and the accept4 calls that found nothing (EAGAIN), from strace -c when --strace is given.

    /usr/bin/python3 tests/bench/accept_balance.py [--bin bin/pgrelay] [-n 2000] [-w 4]
"""

import argparse
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time


def admin(sock_path, command):
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(sock_path)
        s.sendall(command.encode() + b"\n")
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
    return data.decode()


def admin_json(sock_path, command):
    return json.loads(admin(sock_path, command + " json"))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(binary, workers, root):
    port = free_port()
    sock = os.path.join(root, "admin.sock")
    ini = os.path.join(root, "pgrelay.ini")
    with open(ini, "w") as f:
        f.write(f"[pgrelay]\nlisten_addr = 127.0.0.1\nlisten_port = {port}\nworkers = {workers}\n"
                f"max_client_conn = 20000\nadmin_socket = {sock}\nlog_level = warning\n"
                "client_startup_timeout = 0\nclient_login_timeout = 0\n"
                "[node.pg1]\nhost = 127.0.0.1\nport = 1\nrole = primary\n")
    log = open(os.path.join(root, "pgrelay.log"), "w")
    proc = subprocess.Popen([binary, "-c", ini], stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 10
    while True:
        try:
            rows = admin_json(sock, "show workers")
            if len(rows) == workers and all(r["pid"] for r in rows):
                break
        except (OSError, ValueError):
            pass
        if time.monotonic() > deadline or proc.poll() is not None:
            raise SystemExit(f"pgrelay did not start: see {root}/pgrelay.log")
        time.sleep(0.05)
    return proc, port, sock


def spread(counts):
    total = sum(counts)
    fair = total / len(counts) if counts else 0
    return max(counts) / fair if fair else 0.0


def burst(port, sock, n, threads):
    """n connections opened at once from ``threads`` threads, held; live sessions per worker."""
    conns, lock = [], threading.Lock()
    go = threading.Event()

    def run(k):
        mine = []
        go.wait()
        for _ in range(k):
            s = socket.socket()
            s.connect(("127.0.0.1", port))
            mine.append(s)
        with lock:
            conns.extend(mine)

    ts = [threading.Thread(target=run, args=(n // threads + (i < n % threads),))
          for i in range(threads)]
    for t in ts:
        t.start()
    go.set()
    for t in ts:
        t.join()
    deadline = time.monotonic() + 20
    while True:
        rows = admin_json(sock, "show workers")
        counts = [r["sessions"] for r in rows]
        if sum(counts) >= n or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    for s in conns:
        s.close()
    deadline = time.monotonic() + 20
    while sum(r["sessions"] for r in admin_json(sock, "show workers")) and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    return counts


def totals(sock):
    """sessions_total per worker (show stats' rows of workers, without the total row)."""
    rows = admin_json(sock, "show stats")["workers"]
    return [w["sessions_total"] for w in rows if w["worker"] != "total"]


def churn(port, sock, n, threads):
    """n connections opened and closed one after another per thread; accepted per worker."""
    before = totals(sock)

    def run(k):
        for _ in range(k):
            with socket.create_connection(("127.0.0.1", port)) as s:
                s.sendall(b"\0\0\0\x08\x04\xd2\x16\x2f")  # SSLRequest: answered 'N' at once
                s.recv(1)

    ts = [threading.Thread(target=run, args=(n // threads + (i < n % threads),))
          for i in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    deadline = time.monotonic() + 20
    while True:
        after = totals(sock)
        counts = [a - b for a, b in zip(after, before)]
        if sum(counts) >= n or time.monotonic() > deadline:
            return counts
        time.sleep(0.05)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bin", default=os.path.join(os.path.dirname(__file__), "..", "..", "bin",
                                                  "pgrelay"))
    ap.add_argument("-n", type=int, default=2000, help="connections per round")
    ap.add_argument("-w", "--workers", type=int, default=4)
    ap.add_argument("-t", "--threads", type=int, default=8, help="client threads")
    ap.add_argument("-r", "--rounds", type=int, default=3)
    ap.add_argument("--strace", action="store_true", help="count accept4 calls (strace -c)")
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, args.n * 2 + 100)), hard))
    root = tempfile.mkdtemp(prefix="pgrelay-accept-")
    proc, port, sock = start(os.path.abspath(args.bin), args.workers, root)
    tracer = None
    try:
        if args.strace:
            pids = [str(r["pid"]) for r in admin_json(sock, "show workers")]
            tracer = subprocess.Popen(["strace", "-f", "-c", "-e", "trace=accept4", "-o",
                                       os.path.join(root, "strace.txt")] +
                                      sum((["-p", p] for p in pids), []),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1)
        for kind, fn in (("burst", burst), ("churn", churn)):
            for r in range(args.rounds):
                counts = fn(port, sock, args.n, args.threads)
                print(f"{kind} round {r + 1}: {args.n} connections, {args.workers} workers: "
                      f"per worker {counts}, max/fair {spread(counts):.2f}", flush=True)
        if tracer:
            tracer.terminate()
            tracer.wait()
            with open(os.path.join(root, "strace.txt")) as f:
                print(f.read().strip())
    finally:
        proc.terminate()
        proc.wait(15)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
