"""The p99 that ``show latency`` computes from pgrelay's histogram agrees with the p99 of
pgbench's own per-transaction latency log, within a bucket: pgbench runs a mix of fast
statements and 5% pg_sleep(0.03) through pgrelay and logs every transaction (-l)."""

import glob
import math
import os
import shutil
import subprocess
import tempfile

import pytest

from conftest import admin_json, require

BOUNDS_MS = [0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000,
             30000, 60000]
SCRIPT = """\\set r random(1, 100)
SELECT CASE WHEN :r <= 5 THEN pg_sleep(0.03) END;
"""
CLIENTS, PER_CLIENT = 4, 200


def bucket_of(ms):
    """Index of the bucket (lo, hi] holding ms; len(BOUNDS_MS) past the last bound."""
    for i, hi in enumerate(BOUNDS_MS):
        if ms <= hi:
            return i
    return len(BOUNDS_MS)


def test_show_latency_p99_agrees_with_pgbench_log_within_a_bucket(relay_factory):
    require(shutil.which("pgbench"), "pgbench (postgresql-client)")
    r = relay_factory(workers=2)
    work = tempfile.mkdtemp(prefix="pgrelay-pgbench-")
    try:
        script = os.path.join(work, "mix.sql")
        with open(script, "w") as f:
            f.write(SCRIPT)
        env = dict(os.environ, PGSSLMODE="disable", PGGSSENCMODE="disable")
        p = subprocess.run(
            ["pgbench", "-n", "-M", "simple", "-h", "127.0.0.1", "-p", str(r.port), "-U",
             "postgres", "-c", str(CLIENTS), "-j", "2", "-t", str(PER_CLIENT), "-f", script,
             "-l", "--log-prefix", os.path.join(work, "log"), "postgres"],
            capture_output=True, text=True, timeout=120, env=env, cwd=work)
        assert p.returncode == 0, p.stdout + p.stderr
        latencies_ms = []
        for path in glob.glob(os.path.join(work, "log*")):
            with open(path) as f:
                for line in f:
                    latencies_ms.append(int(line.split()[2]) / 1000.0)  # 3rd field: us
        assert len(latencies_ms) == CLIENTS * PER_CLIENT
        latencies_ms.sort()
        pgbench_p99 = latencies_ms[math.ceil(0.99 * len(latencies_ms)) - 1]

        [row] = [x for x in admin_json(r, "show latency") if x["statements"]]
        assert row["statements"] == CLIENTS * PER_CLIENT, row
        assert bucket_of(row["p99_ms"]) == bucket_of(pgbench_p99), (row, pgbench_p99)
        # and the fast majority is fast in both
        assert bucket_of(row["p50_ms"]) <= bucket_of(5) and latencies_ms[len(latencies_ms) // 2] < 25
    finally:
        shutil.rmtree(work, ignore_errors=True)
