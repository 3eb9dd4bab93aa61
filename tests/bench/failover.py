#!/usr/bin/python3
"""Failover benchmark: how fast pgrelay follows a new write leader (``make bench-failover``).

For each health_interval (1s = the default, and 200ms), on a fresh PostgreSQL 15 cluster
per repetition (pg1 primary, pg2 + pg3 streaming replicas, as in the integration tests;
pgrelay with 2 workers, fall = 2, rise = 1):

Failover (pg_ctl stop -m immediate of pg1, then SELECT pg_promote() on pg2):
  (a) detection    pg_promote() called -> `show info json` names pg2 (admin polled every 5 ms)
  (b) first write  pg_promote() called -> first INSERT through pgrelay that succeeds on pg2
                   (a client retrying every 10 ms, reconnecting after each error)
  (c) propagation  agent log line "write leader: ... -> pg2 (epoch N)" -> the last worker's
                   "routing epoch ... -> N" line (log timestamps, ms precision)
  and the writes that reached a node that was not the leader (an INSERT answered by a node
  in recovery, refused as read-only, or committed on the old leader after the decision).

Planned switchover under pgbench -c 8 (simple protocol) through pgrelay:
  pg_promote() on pg2 while pg1 runs (split brain: pgrelay keeps pg1), then `set leader pg2`:
  (a) set leader -> show info names pg2, (c) propagation as above, (d) pgbench clients
  aborted by the FATAL 57P01 leader-change close, other server errors, failed transactions,
  and writes committed on pg1 after the decision (the retrying writer runs here too).

Prints a table (median, min, max over the repetitions) and writes it to
$BENCH_FAILOVER_OUT (default bench-failover-results.txt). Targets, reported not asserted:
detection <= 2 x health_interval, propagation <= 50 ms, zero writes to a non-leader.

Run as root with Debian's /usr/bin/python3 (psycopg 3), after `make`.
"""

import argparse
import collections
import datetime
import os
import re
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

import psycopg  # noqa: E402

from cluster import (  # noqa: E402
    Cluster,
    admin,
    destroy_relay,
    log_lines,
    show_info,
    start_ha_relay,
)
from conftest import PG_BIN, wait_for  # noqa: E402

LOG_RE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3}) \[(.+?) pid (\d+)\] (\w+): (.*)$")


def log_time(stamp):
    """A pgrelay log timestamp (local time, ms) as a Unix time."""
    return datetime.datetime.strptime(stamp, "%Y-%m-%d %H:%M:%S.%f").timestamp()


def parse_log(text):
    out = []
    for line in text.splitlines():
        m = LOG_RE.match(line)
        if m:
            out.append((log_time(m.group(1)), m.group(2), int(m.group(3)), m.group(4),
                        m.group(5)))
    return out


def propagation(relay, to_node, workers):
    """(decision unix time, epoch, ms until the last worker logged the new epoch, missing)."""
    entries = parse_log(relay.log())
    decision = None
    for ts, who, pid, level, msg in entries:
        m = re.match(r"write leader: (\S+) -> (\S+) \(epoch (\d+)\)", msg)
        if who == "agent" and m and m.group(2) == to_node:
            decision = (ts, int(m.group(3)))
    if decision is None:
        return None, None, None, workers
    ts_a, epoch = decision
    seen = {}
    for ts, who, pid, level, msg in entries:
        m = re.match(r"routing epoch (\d+) -> (\d+)", msg)
        if who.startswith("worker") and m and int(m.group(2)) == epoch:
            seen.setdefault(pid, ts)
    if not seen:
        return ts_a, epoch, None, workers
    return ts_a, epoch, (max(seen.values()) - ts_a) * 1000.0, workers - len(seen)


class Writer(threading.Thread):
    """INSERT ... RETURNING through pgrelay's write port every 10 ms, reconnecting after any
    error. Records (unix time done, port, in_recovery, server's clock_timestamp() at the
    INSERT) and (unix time, sqlstate, message)."""

    def __init__(self, relay):
        super().__init__(daemon=True)
        self.relay = relay
        self.stop_flag = threading.Event()
        self.ok = []
        self.errors = []

    def run(self):
        conn = None
        while not self.stop_flag.is_set():
            try:
                if conn is None:
                    conn = psycopg.connect(
                        self.relay.conninfo(connect_timeout=2, application_name="bench-writer"),
                        autocommit=True,
                    )
                port, rec, at = conn.execute(
                    "INSERT INTO fb (port) VALUES (inet_server_port())"
                    " RETURNING inet_server_port(), pg_is_in_recovery(),"
                    " extract(epoch FROM clock_timestamp())::float8"
                ).fetchone()
                self.ok.append((time.time(), port, rec, at))
            except psycopg.Error as e:
                self.errors.append((time.time(), e.sqlstate, str(e).strip().split("\n")[0]))
                if conn is not None:
                    conn.close()
                conn = None
            time.sleep(0.01)
        if conn is not None:
            conn.close()

    def stop(self):
        self.stop_flag.set()
        self.join(20)

    def first_on(self, port, after):
        for t, p, _, _ in self.ok:
            if p == port and t >= after:
                return t
        return None

    def non_leader_writes(self, old_port, decision_ts):
        """Writes that reached a node in recovery (answered so, or refused as read-only), and
        INSERTs executed on the old leader after the agent's decision (server clock; such a
        statement was in flight when the workers switched)."""
        in_recovery = sum(1 for *_, rec, _ in self.ok if rec)
        read_only = sum(1 for _, st, m in self.errors if st == "25006" or "read-only" in m)
        late = sum(1 for _, p, _, at in self.ok
                   if p == old_port and decision_ts and at > decision_ts)
        return in_recovery + read_only, late


class LeaderWatch(threading.Thread):
    """Polls `show info json` every 5 ms; records when write_leader first equals a name."""

    def __init__(self, relay, name):
        super().__init__(daemon=True)
        self.relay, self.name = relay, name
        self.stop_flag = threading.Event()
        self.seen_at = None
        self.polls = 0

    def run(self):
        while not self.stop_flag.is_set() and self.seen_at is None:
            try:
                if show_info(self.relay).get("write_leader") == self.name:
                    self.seen_at = time.time()
            except (OSError, ValueError, AssertionError):
                pass
            self.polls += 1
            time.sleep(0.005)

    def stop(self):
        self.stop_flag.set()
        self.join(5)


def start_relay(cluster, interval, **extra):
    return start_ha_relay(
        cluster,
        agent={"health_interval": interval, "fall": 2, "rise": 1},
        workers=2,
        read_listen_port="auto",
        **extra,
    )


def run_failover(interval, say):
    c = Cluster.create(replicas=2)
    relay = None
    try:
        pg1, pg2 = c.nodes[0], c.nodes[1]
        pg1.query("CREATE TABLE fb (id bigserial, port int)")
        c.wait_caught_up(pg2)
        relay = start_relay(c, interval)
        writer = Writer(relay)
        writer.start()
        wait_for(lambda: len(writer.ok) >= 20, timeout=20, what="writes before the failover")
        watch = LeaderWatch(relay, "pg2")
        watch.start()
        pg1.stop("immediate")
        t_promote = time.time()
        pg2.promote()
        t_promoted = time.time()
        try:
            wait_for(lambda: watch.seen_at and writer.first_on(pg2.port, t_promote),
                     timeout=60, interval=0.01, what="pg2 named leader and written to")
        finally:
            time.sleep(0.3)
            watch.stop()
            writer.stop()
        ts_a, epoch, prop_ms, missing = propagation(relay, "pg2", 2)
        bad, late = writer.non_leader_writes(pg1.port, ts_a)
        r = {
            "promote_s": t_promoted - t_promote,
            "detect_s": watch.seen_at - t_promote,
            "first_write_s": writer.first_on(pg2.port, t_promote) - t_promote,
            "decision_s": ts_a - t_promote if ts_a else None,
            "propagation_ms": prop_ms,
            "workers_missing": missing,
            "non_leader_writes": bad + late,
            "write_errors": len([e for e in writer.errors if e[0] >= t_promote - 1]),
        }
        say(f"  failover interval={interval}: " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
        return r
    finally:
        if relay is not None:
            destroy_relay(relay)
        c.destroy()


def run_switchover(interval, say, duration=8):
    c = Cluster.create(replicas=2)
    relay = None
    bench = None
    try:
        pg1, pg2 = c.nodes[0], c.nodes[1]
        r = subprocess.run(
            [f"{PG_BIN}/pgbench", "-i", "-s", "1", "-q", "-h", pg1.host, "-p", str(pg1.port),
             "-U", "postgres", "postgres"], capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise RuntimeError("pgbench -i failed: " + r.stderr)
        pg1.query("CREATE TABLE fb (id bigserial, port int)")
        c.wait_caught_up(pg2)
        relay = start_relay(c, interval, leader_change_grace="10s")
        bench = subprocess.Popen(
            [f"{PG_BIN}/pgbench", "-n", "-c", "8", "-j", "2", "-T", str(duration), "-M",
             "simple", "-h", "127.0.0.1", "-p", str(relay.port), "-U", "postgres", "postgres"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        writer = Writer(relay)
        writer.start()
        time.sleep(2.0)
        pg2.promote()
        wait_for(lambda: log_lines(relay, "SPLIT BRAIN"), timeout=30, interval=0.02,
                 what="SPLIT BRAIN in the log")
        watch = LeaderWatch(relay, "pg2")
        watch.start()
        t_set = time.time()
        answer = admin(relay, "set leader pg2")
        if answer.startswith("error"):
            raise RuntimeError(f"set leader pg2: {answer}")
        try:
            wait_for(lambda: watch.seen_at and writer.first_on(pg2.port, t_set), timeout=30,
                     interval=0.01, what="pg2 named leader and written to")
            out, _ = bench.communicate(timeout=duration + 30)
        finally:
            watch.stop()
            writer.stop()
        ts_a, epoch, prop_ms, missing = propagation(relay, "pg2", 2)
        bad, late = writer.non_leader_writes(pg1.port, ts_a)
        errors = re.findall(r"(?:FATAL|ERROR):\s+(.*)", out)
        failed = re.search(r"number of failed transactions: (\d+)", out)
        processed = re.search(r"number of transactions actually processed: (\d+)", out)
        res = {
            "detect_s": watch.seen_at - t_set,
            "first_write_s": writer.first_on(pg2.port, t_set) - t_set,
            "propagation_ms": prop_ms,
            "workers_missing": missing,
            "aborted_clients": len(set(re.findall(r"client (\d+) (?:script \d+ )?aborted", out))),
            "closed_57P01": sum("write leader changed" in e for e in errors),
            "other_errors": sum("write leader changed" not in e for e in errors),
            "failed_tx": int(failed.group(1)) if failed else None,
            "processed_tx": int(processed.group(1)) if processed else None,
            "non_leader_writes": bad,
            "old_leader_writes_after_decision": late,
        }
        say(f"  switchover interval={interval}: " + ", ".join(
            f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
        if res["other_errors"]:
            say("    other pgbench errors: " + "; ".join(
                e for e in errors if "write leader changed" not in e)[:500])
        return res
    finally:
        if bench is not None and bench.poll() is None:
            bench.kill()
            bench.communicate()
        if relay is not None:
            destroy_relay(relay)
        c.destroy()


def summarize(values, scale=1.0, fmt="{:.3f}"):
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-", "-", "-", 0
    return (fmt.format(statistics.median(vals)), fmt.format(min(vals)), fmt.format(max(vals)),
            len(vals))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--intervals", default="1s,200ms")
    ap.add_argument("--out", default=os.environ.get("BENCH_FAILOVER_OUT",
                                                    "bench-failover-results.txt"))
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (PostgreSQL is started as the postgres user with runuser)")

    def say(msg):
        print(msg, flush=True)

    intervals = args.intervals.split(",")
    results = collections.OrderedDict()
    t0 = time.time()
    for interval in intervals:
        fo, sw = [], []
        for i in range(args.reps):
            say(f"[{time.time() - t0:6.1f}s] failover {i + 1}/{args.reps}, health_interval {interval}")
            try:
                fo.append(run_failover(interval, say))
            except Exception as e:  # keep going: report what failed
                say(f"  failover run failed: {e}")
        for i in range(args.reps):
            say(f"[{time.time() - t0:6.1f}s] switchover {i + 1}/{args.reps}, health_interval {interval}")
            try:
                sw.append(run_switchover(interval, say))
            except Exception as e:
                say(f"  switchover run failed: {e}")
        results[interval] = (fo, sw)

    def ms(interval):
        m = re.fullmatch(r"(\d+)(ms|s)", interval)
        return int(m.group(1)) * (1 if m.group(2) == "ms" else 1000)

    rows = []
    for interval, (fo, sw) in results.items():
        hi = ms(interval)
        rows += [
            (interval, "failover: pg_promote() -> show info names new leader (ms)",
             summarize([r["detect_s"] for r in fo], 1000, "{:.0f}"), f"<= {2 * hi} ms"),
            (interval, "failover: pg_promote() -> agent decision in log (ms)",
             summarize([r["decision_s"] for r in fo], 1000, "{:.0f}"), ""),
            (interval, "failover: pg_promote() -> first write on new leader (ms)",
             summarize([r["first_write_s"] for r in fo], 1000, "{:.0f}"), ""),
            (interval, "failover: pg_promote() itself took (ms)",
             summarize([r["promote_s"] for r in fo], 1000, "{:.0f}"), ""),
            (interval, "failover: propagation decision -> last worker (ms)",
             summarize([r["propagation_ms"] for r in fo], 1, "{:.0f}"), "<= 50 ms"),
            (interval, "failover: writes that reached a non-leader",
             summarize([r["non_leader_writes"] for r in fo], 1, "{:.0f}"), "0"),
            (interval, "failover: failed write attempts (retry every 10 ms)",
             summarize([r["write_errors"] for r in fo], 1, "{:.0f}"), ""),
            (interval, "switchover: set leader -> show info names new leader (ms)",
             summarize([r["detect_s"] for r in sw], 1000, "{:.0f}"), ""),
            (interval, "switchover: set leader -> first write on new leader (ms)",
             summarize([r["first_write_s"] for r in sw], 1000, "{:.0f}"), ""),
            (interval, "switchover: propagation decision -> last worker (ms)",
             summarize([r["propagation_ms"] for r in sw], 1, "{:.0f}"), "<= 50 ms"),
            (interval, "switchover: pgbench clients aborted (of 8)",
             summarize([r["aborted_clients"] for r in sw], 1, "{:.0f}"), ""),
            (interval, "switchover: pgbench FATAL 57P01 'write leader changed'",
             summarize([r["closed_57P01"] for r in sw], 1, "{:.0f}"), ""),
            (interval, "switchover: pgbench other server errors",
             summarize([r["other_errors"] for r in sw], 1, "{:.0f}"), "0"),
            (interval, "switchover: pgbench failed transactions",
             summarize([r["failed_tx"] for r in sw], 1, "{:.0f}"), "0"),
            (interval, "switchover: pgbench transactions processed",
             summarize([r["processed_tx"] for r in sw], 1, "{:.0f}"), ""),
            (interval, "switchover: writes that reached a node in recovery",
             summarize([r["non_leader_writes"] for r in sw], 1, "{:.0f}"), "0"),
            (interval, "switchover: INSERTs run on old leader after the decision",
             summarize([r["old_leader_writes_after_decision"] for r in sw], 1, "{:.0f}"), "0"),
        ]
    width = max(len(r[1]) for r in rows)
    lines = [
        "pgrelay failover benchmark ({} repetitions per row; fresh PG 15 cluster per run;"
        " fall = 2, rise = 1, 2 workers; {})".format(args.reps, time.strftime("%Y-%m-%d %H:%M")),
        "",
        f"{'interval':<9} {'metric':<{width}} {'median':>8} {'min':>8} {'max':>8} {'n':>3}  target",
    ]
    for interval, name, (med, lo, hi, n), target in rows:
        lines.append(f"{interval:<9} {name:<{width}} {med:>8} {lo:>8} {hi:>8} {n:>3}  {target}")
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    with open(args.out, "w") as f:
        f.write(table)
    print(f"written to {args.out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
