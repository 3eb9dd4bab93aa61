#!/usr/bin/python3
"""Memory per idle session of a proxy.

Opens N client sessions through a proxy, runs one `SELECT 1` on each (so that
every session is fully set up end to end: for PgBouncer in session mode that
is when a server connection gets bound to the client), leaves them idle and
compares the memory of the proxy's processes (the given PID and all its
descendants) before and after.  Memory is read from /proc/<pid>/smaps_rollup:
PSS is the honest sum for forked workers that share pages, RSS is shown too.

Prints one line of key=value pairs (consumed by bench.sh / report.py).

Run with Debian's /usr/bin/python3 (it has psycopg 3).
"""

import argparse
import os
import sys
import time

import psycopg

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "integration"))
from procs import process_tree  # noqa: E402


def memory_kib(root):
    """(sum of Pss, sum of Rss, number of processes) over the process tree (zombies, which
    hold no memory, left out), KiB."""
    pss = rss = n = 0
    for pid in process_tree(root):
        try:
            with open(f"/proc/{pid}/smaps_rollup") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        n += 1
        for line in lines:
            key, _, rest = line.partition(":")
            if key == "Pss":
                pss += int(rest.split()[0])
            elif key == "Rss":
                rss += int(rest.split()[0])
    return pss, rss, n


def server_backends(args):
    """Client backends on the PostgreSQL server (counted over a direct connection)."""
    if not args.direct_port:
        return -1
    with psycopg.connect(host=args.host, port=args.direct_port, user=args.user,
                         dbname=args.dbname, sslmode="disable", gssencmode="disable",
                         autocommit=True) as conn:
        return conn.execute(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()").fetchone()[0]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pid", type=int, required=True, help="proxy (master) pid")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True, help="proxy port")
    ap.add_argument("--direct-port", type=int, default=0, help="PostgreSQL port (to count backends)")
    ap.add_argument("--user", default="postgres")
    ap.add_argument("--dbname", default="postgres")
    ap.add_argument("--sessions", type=int, default=1000)
    ap.add_argument("--sslmode", default="disable", help="libpq sslmode toward the proxy")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds to wait before measuring")
    args = ap.parse_args()

    time.sleep(args.settle)
    base_pss, base_rss, base_n = memory_kib(args.pid)

    conns = []
    t0 = time.monotonic()
    try:
        for i in range(args.sessions):
            conn = psycopg.connect(host=args.host, port=args.port, user=args.user,
                                   dbname=args.dbname, sslmode=args.sslmode,
                                   gssencmode="disable", autocommit=True,
                                   connect_timeout=30, application_name=f"idle{i}")
            conn.execute("SELECT 1").fetchone()
            conns.append(conn)
    except Exception as e:  # report how far we got, then fail
        print(f"idle_sessions: session {len(conns) + 1} of {args.sessions} failed: "
              f"{type(e).__name__}: {e}".strip(), file=sys.stderr)
        for c in conns:
            c.close()
        return 1
    open_secs = time.monotonic() - t0

    time.sleep(args.settle)
    pss, rss, n = memory_kib(args.pid)
    backends = server_backends(args)

    # all sessions still alive?
    alive = sum(1 for c in conns if not c.closed and c.execute("SELECT 1").fetchone()[0] == 1)
    for c in conns:
        c.close()

    s = args.sessions
    print(f"sessions={s} alive={alive} procs={n} base_procs={base_n} "
          f"base_pss_kib={base_pss} pss_kib={pss} base_rss_kib={base_rss} rss_kib={rss} "
          f"pss_per_session_kib={(pss - base_pss) / s:.1f} "
          f"rss_per_session_kib={(rss - base_rss) / s:.1f} "
          f"server_backends={backends} open_secs={open_secs:.1f}")
    return 0 if alive == s else 1


if __name__ == "__main__":
    sys.exit(main())
