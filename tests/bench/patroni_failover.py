#!/usr/bin/python3
"""Failover benchmark under Patroni (``make bench-failover``, after failover.py): pgrelay with
ha_source = none, pgrelay with ha_source = patroni, and HAProxy with Patroni's GET /primary
check, side by side in the same runs.

Runs the Patroni suite (tests/patroni: one etcd, three Patroni members, the three proxies in
front, a write load and a reader through each) BENCH_PATRONI_RUNS times (default 1), collects
the figures each scenario records (PATRONI_FIGURES), and prints per scenario and metric the
median over the runs for each proxy:

  write outage (s)     the longest stretch without an acknowledged write during the scenario
  failed operations    writes or logins that got an error (a retry costs one each)
  no SQLSTATE          of those, errors that were a bare close, reset or hang
  wrong-node writes    acknowledged writes that committed on a member etcd did not name leader
  lost writes          acknowledged writes missing on the final leader (Patroni's own
                       discards counted apart: "discarded")
  read outage (s)      the longest stretch without a read through the read port

The table is appended to $BENCH_FAILOVER_OUT (default bench-failover-results.txt). A scenario
whose invariants failed still has its figures; the suite's verdict is printed per run.
"""

import collections
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
PROXIES = ("pgrelay", "pgrelay_ha", "haproxy")
LABELS = {"pgrelay": "pgrelay none", "pgrelay_ha": "pgrelay patroni", "haproxy": "HAProxy"}
METRICS = (("write_outage_s", "write outage (s)", "{:.2f}"),
           ("failed_ops", "failed operations", "{:.0f}"),
           ("errors_without_sqlstate", "no SQLSTATE", "{:.0f}"),
           ("wrong_node_writes", "wrong-node writes", "{:.0f}"),
           ("lost_writes", "lost writes", "{:.0f}"),
           ("discarded_by_patroni", "discarded by Patroni", "{:.0f}"),
           ("read_outage_s", "read outage (s)", "{:.2f}"))


def main():
    runs = int(os.environ.get("BENCH_PATRONI_RUNS", "1"))
    out = os.environ.get("BENCH_FAILOVER_OUT", "bench-failover-results.txt")
    pgrelay = os.environ.get("PGRELAY_BIN", os.path.join(ROOT, "bin", "pgrelay"))
    figures = collections.defaultdict(lambda: collections.defaultdict(list))
    order = []
    verdicts = []
    t0 = time.time()
    for i in range(runs):
        with tempfile.NamedTemporaryFile(prefix="patroni-figures-", suffix=".jsonl") as f:
            env = dict(os.environ, PATRONI_FIGURES=f.name, PGRELAY_BIN=pgrelay)
            print(f"[{time.time() - t0:6.1f}s] Patroni suite, run {i + 1}/{runs}", flush=True)
            r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                os.path.join(ROOT, "tests", "patroni")], env=env, cwd=ROOT,
                               stdin=subprocess.DEVNULL, capture_output=True, text=True)
            tail = (r.stdout.strip().splitlines() or ["(no output)"])[-1]
            verdicts.append(f"run {i + 1}: {tail}")
            print("  " + tail, flush=True)
            with open(f.name) as lines:
                for line in lines:
                    row = json.loads(line)
                    if row["scenario"] not in order:
                        order.append(row["scenario"])
                    for key, _, _ in METRICS:
                        figures[(row["scenario"], row["proxy"])][key].append(row[key])
    width = max(len(label) for _, label, _ in METRICS)
    lines = [f"Patroni scenarios: median over {runs} run(s) of tests/patroni "
             f"(ttl 10, loop_wait 2, retry_timeout 4; {time.strftime('%Y-%m-%d %H:%M')})", ""]
    for scenario in order:
        lines.append(f"{scenario:<{width + 2}}" + "".join(f"{LABELS[p]:>17}" for p in PROXIES))
        for key, label, fmt in METRICS:
            cells = []
            for p in PROXIES:
                vals = figures[(scenario, p)][key]
                cells.append(fmt.format(statistics.median(vals)) if vals else "-")
            lines.append(f"  {label:<{width}}" + "".join(f"{c:>17}" for c in cells))
        lines.append("")
    lines += verdicts
    table = "\n".join(lines) + "\n"
    print("\n" + table)
    with open(out, "a") as f:
        f.write("\n" + table)
    print(f"appended to {out} ({time.time() - t0:.0f}s)")


if __name__ == "__main__":
    main()
