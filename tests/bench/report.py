#!/usr/bin/python3
"""Format the raw results of bench.sh as plain-text tables.

Inputs (tab-separated, written by bench.sh):
  cases.tsv   case_key  description                    (in run order)
  runs.tsv    case_key  target  run  status  tps  txns  cpu_ticks  wall_seconds  p50_ms  p99_ms
              status is "ok" or "FAIL"; cpu_ticks is -1 when there is no proxy (direct);
              p50_ms/p99_ms the run's transaction latency percentiles, -1 when unknown
  memory.tsv  target  key=value ...                   (output of idle_sessions.py, or FAIL)

Usage: report.py DIR CLK_TCK TARGET... > table.txt
"""

import statistics
import sys


def median(values):
    return statistics.median(values) if values else None


def fmt(value, spec, missing="-"):
    return missing if value is None else format(value, spec)


def throughput_tables(d, clk_tck, targets):
    cases = []
    with open(f"{d}/cases.tsv") as f:
        for line in f:
            key, desc = line.rstrip("\n").split("\t", 1)
            cases.append((key, desc))
    runs = {}
    with open(f"{d}/runs.tsv") as f:
        for line in f:
            f = line.rstrip("\n").split("\t")
            key, target, _run, status, tps, txns, ticks, wall = f[:8]
            p50, p99 = (float(f[8]), float(f[9])) if len(f) >= 10 else (-1.0, -1.0)
            runs.setdefault((key, target), []).append(
                (status, float(tps), int(txns), int(ticks), float(wall), p50, p99))

    out = []
    head = (f"{'target':<16} {'median TPS':>11} {'min - max TPS':>19} {'vs direct':>9} "
            f"{'proxy CPU':>9} {'CPU us/txn':>10} {'p50 ms':>7} {'p99 ms':>7}  {'runs':>4}")
    for key, desc in cases:
        out.append(f"== {desc}")
        out.append(head)
        out.append("-" * len(head))
        direct = direct_tls = None
        rows = []
        for target in targets:
            rs = runs.get((key, target), [])
            ok = [r for r in rs if r[0] == "ok"]
            fails = len(rs) - len(ok)
            tps = [r[1] for r in ok]
            med = median(tps)
            if target == "direct":
                direct = med
            if target == "direct_tls":
                direct_tls = med
            cores = [r[3] / clk_tck / r[4] for r in ok if r[3] >= 0 and r[4] > 0]
            us_txn = [r[3] / clk_tck * 1e6 / r[2] for r in ok if r[3] >= 0 and r[2] > 0]
            p50 = median([r[5] for r in ok if r[5] >= 0])
            p99 = median([r[6] for r in ok if r[6] >= 0])
            rows.append((target, med, tps, median(cores), median(us_txn), p50, p99, len(ok),
                         fails))
        for target, med, tps, cores, us_txn, p50, p99, nok, fails in rows:
            # TLS targets (names with _tls) against PostgreSQL's own TLS, the others in clear
            base = direct_tls if "_tls" in target else direct
            ratio = med / base if med is not None and base else None
            span = f"{min(tps):.0f} - {max(tps):.0f}" if tps else "-"
            runs_col = f"{nok}" if not fails else f"{nok}+{fails}F"
            out.append(f"{target:<16} {fmt(med, '11.0f', 'FAIL'):>11} {span:>19} "
                       f"{fmt(ratio, '9.2f'):>9} {fmt(cores, '9.2f'):>9} "
                       f"{fmt(us_txn, '10.1f'):>10} {fmt(p50, '7.2f'):>7} {fmt(p99, '7.2f'):>7}"
                       f"  {runs_col:>4}")
        out.append("")
    return out


def memory_table(d):
    try:
        with open(f"{d}/memory.tsv") as f:
            lines = [line.rstrip("\n") for line in f if line.strip()]
    except FileNotFoundError:
        return []
    if not lines:
        return []
    out = []
    head = (f"{'target':<16} {'sessions':>8} {'procs':>5} {'PSS before':>10} {'PSS after':>10} "
            f"{'KiB/session':>11} {'RSS KiB/sess':>12} {'PG backends':>11}")
    sessions = None
    rows = []
    for line in lines:
        target, _, rest = line.partition("\t")
        kv = dict(item.split("=", 1) for item in rest.split() if "=" in item)
        if "pss_per_session_kib" not in kv:
            rows.append(f"{target:<16} FAIL  {rest}")
            continue
        sessions = kv["sessions"]
        rows.append(
            f"{target:<16} {kv['sessions']:>8} {kv['procs']:>5} "
            f"{int(kv['base_pss_kib']) / 1024:>7.1f}MiB {int(kv['pss_kib']) / 1024:>7.1f}MiB "
            f"{float(kv['pss_per_session_kib']):>11.1f} {float(kv['rss_per_session_kib']):>12.1f} "
            f"{kv['server_backends']:>11}")
    out.append(f"== memory per idle session ({sessions or '?'} idle sessions, each after one SELECT 1;"
               f" sum of PSS over all proxy processes)")
    out.append(head)
    out.append("-" * len(head))
    out.extend(rows)
    out.append("")
    return out


def main():
    d, clk_tck, targets = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
    out = throughput_tables(d, clk_tck, targets) + memory_table(d)
    print("\n".join(out))


if __name__ == "__main__":
    main()
