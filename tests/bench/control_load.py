#!/usr/bin/python3
"""Control-plane load benchmark (``make bench-control``): N simulated agents on one
pgrelay-control.

Each simulated agent speaks the agents' protocol of docs/protocol.md like pgrelay-agent does:
it registers, POSTs metrics (with two node observations) every second and its running queries
every 5 s on one keep-alive connection, and holds one long poll for commands on a second
connection, acknowledging every command it gets. The agents run in one asyncio process with
raw HTTP/1.1 (the client costs a fraction of what the server does).

For each N (default 100, 500, 1000, 2000) a fresh store database and a fresh control plane
(auto_declare = on) are started, the agents register, and after a warm-up the benchmark
measures for --duration seconds: the control plane's CPU (cores) and RSS, the store's CPU
(every postgres process), the metrics round trip p50 / p99 / max, then the time of
`pgrelayctl show-proxies` and the round trip of `pgrelayctl maintenance on` (every proxy
acknowledged) and `off`, with the store's CPU seconds during `on`. The 1-minute load average
is printed beside each row: the machine is shared, so figures taken under load say so. The
store's CPU is small (under 0.005 cores at 2,000 agents: the proxies' rows are one statement
per 500 every 5 s), hence three decimals.

BENCH_CONTROL_PERF=DIR records `perf record` of the control plane during each maintenance step
into DIR/mnt-on-N.data and DIR/mnt-off-N.data (BENCH_CONTROL_PERF_GRAPH=dwarf for stacks without
frame pointers).

Run as root with Debian's /usr/bin/python3 (psycopg 3), after `make`.
"""

import argparse
import asyncio
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.abspath(os.path.join(HERE, "..", ".."))
sys.path.insert(0, os.path.join(HERE, "..", "integration"))

import psycopg  # noqa: E402

from conftest import PG_BIN, _as_postgres, free_port, wait_for  # noqa: E402

CONTROL_BIN = os.environ.get("PGRELAY_CONTROL_BIN", os.path.join(REPO, "bin", "pgrelay-control"))
CTL_BIN = os.environ.get("PGRELAYCTL_BIN", os.path.join(REPO, "bin", "pgrelayctl"))
ADMIN = "bench-admin-token"
TOKEN = "bench-agent-token"
DEPLOYMENT = "bench"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --------------------------------------------------------------------------- #
# processes
# --------------------------------------------------------------------------- #


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_mib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def postgres_cpu(postmaster):
    """CPU seconds of the postmaster and its children (the store's backends)."""
    total = 0.0
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(pid) == postmaster or int(fields[1]) == postmaster:
                total += (int(fields[11]) + int(fields[12])) / CLK_TCK
        except (OSError, IndexError, ValueError):
            continue
    return total


class Store:
    """A throwaway PostgreSQL 15 for the control plane's store."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="pgrelay-bench-control-")
        shutil.chown(self.dir, "postgres", "postgres")
        os.chmod(self.dir, 0o700)
        self.data = os.path.join(self.dir, "data")
        self.port = free_port()
        r = _as_postgres([f"{PG_BIN}/initdb", "-D", self.data, "--auth=trust", "-U", "postgres",
                          "--locale=C", "--no-sync"])
        assert r.returncode == 0, r.stdout + r.stderr
        with open(os.path.join(self.data, "postgresql.conf"), "a") as f:
            f.write(f"listen_addresses = '127.0.0.1'\nport = {self.port}\n"
                    f"unix_socket_directories = '{self.dir}'\nfsync = off\n"
                    "full_page_writes = off\nlog_min_messages = warning\n")
        r = _as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.data, "-l",
                          os.path.join(self.dir, "pg.log"), "-w", "start"])
        assert r.returncode == 0, r.stdout + r.stderr
        with open(os.path.join(self.data, "postmaster.pid")) as f:
            self.pid = int(f.readline())

    def new_db(self, name):
        with psycopg.connect(self.conninfo("postgres"), autocommit=True) as c:
            c.execute(f"DROP DATABASE IF EXISTS {name}")
            c.execute(f"CREATE DATABASE {name}")
        return self.conninfo(name)

    def conninfo(self, db):
        return f"host=127.0.0.1 port={self.port} user=postgres dbname={db}"

    def stop(self):
        _as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.data, "-m", "immediate", "-w", "stop"])
        shutil.rmtree(self.dir, ignore_errors=True)


class Control:
    def __init__(self, store_conninfo, workdir):
        self.port = free_port()
        self.conf = os.path.join(workdir, "control.ini")
        self.log_path = os.path.join(workdir, "control.log")
        with open(self.conf, "w") as f:
            f.write(f"[control]\nlisten_addr = 127.0.0.1\nlisten_port = {self.port}\n"
                    f"store = {store_conninfo}\nadmin_tokens = {ADMIN}\nauto_declare = on\n"
                    "proxy_timeout = 10s\nlog_level = warning\n\n"
                    f"[deployment.{DEPLOYMENT}]\ntoken = {TOKEN}\n")
        with open(self.log_path, "w") as logf:
            self.proc = subprocess.Popen([CONTROL_BIN, "-c", self.conf], stdout=logf,
                                         stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        wait_for(self.ready, timeout=20, what="pgrelay-control ready")

    def ready(self):
        try:
            r = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code}",
                                f"http://127.0.0.1:{self.port}/readyz"],
                               capture_output=True, text=True, timeout=5)
            return r.stdout == "200"
        except subprocess.TimeoutExpired:
            return False

    def ctl(self, *args, timeout=120):
        env = dict(os.environ, PGRELAYCTL_ENDPOINT=f"http://127.0.0.1:{self.port}",
                   PGRELAYCTL_TOKEN=ADMIN, PGRELAYCTL_DEPLOYMENT=DEPLOYMENT)
        t0 = time.monotonic()
        r = subprocess.run([CTL_BIN, *args], capture_output=True, text=True, env=env,
                           timeout=timeout)
        return time.monotonic() - t0, r

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


# --------------------------------------------------------------------------- #
# simulated agents
# --------------------------------------------------------------------------- #


class Conn:
    """One keep-alive HTTP/1.1 connection (reconnects after an error)."""

    def __init__(self, port):
        self.port = port
        self.reader = self.writer = None

    async def request(self, method, path, body=None, timeout=60):
        if self.writer is None:
            self.reader, self.writer = await asyncio.open_connection("127.0.0.1", self.port)
        data = json.dumps(body).encode() if body is not None else b""
        head = (f"{method} {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                f"Authorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n\r\n").encode()
        try:
            self.writer.write(head + data)
            return await asyncio.wait_for(self._answer(), timeout)
        except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
            self.close()
            raise

    async def _answer(self):
        status_line = await self.reader.readline()
        if not status_line:
            raise ConnectionResetError("closed")
        status = int(status_line.split()[1])
        length, close = 0, False
        while True:
            line = await self.reader.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            k, _, v = line.decode().partition(":")
            if k.lower() == "content-length":
                length = int(v)
            elif k.lower() == "connection" and "close" in v.lower():
                close = True
        payload = await self.reader.readexactly(length) if length else b""
        if close:
            self.close()
        return status, json.loads(payload) if payload.startswith(b"{") else None

    def close(self):
        if self.writer:
            self.writer.close()
        self.reader = self.writer = None


def node_obs():
    return [{"name": "pg1", "host": "10.0.0.1", "port": 5432, "role": "primary", "health": "up",
             "in_recovery": False, "lsn": 123456, "lag_bytes": 0, "write_sessions": 3,
             "read_sessions": 0, "statements": 1000, "bytes_in": 1, "bytes_out": 1, "errors": 0,
             "latency_us": 10, "statements_completed": 1000},
            {"name": "pg2", "host": "10.0.0.2", "port": 5432, "role": "replica", "health": "up",
             "in_recovery": True, "lsn": 123400, "lag_bytes": 56, "write_sessions": 0,
             "read_sessions": 1, "statements": 10, "bytes_in": 1, "bytes_out": 1, "errors": 0,
             "latency_us": 10, "statements_completed": 10}]


class Agent:
    def __init__(self, port, node_id, stats):
        self.node_id = node_id
        self.reports = Conn(port)
        self.polls = Conn(port)
        self.stats = stats
        self.epoch = 0
        self.leader = None
        self.maintenance = False

    async def post(self, path, body):
        return await self.reports.request("POST", "/api/v1/agent" + path,
                                          dict(body, node_id=self.node_id))

    async def register(self):
        while True:
            try:
                status, _ = await self.post("/register", {
                    "hostname": "bench", "version": "bench", "listen": ["10.0.0.9:6432"],
                    "config_version": 0, "epoch": self.epoch, "leader": self.leader,
                    "maintenance": False})
                if status == 200:
                    return
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                pass
            await asyncio.sleep(1)

    async def report_loop(self, stop):
        n = 0
        statements = 0
        while not stop.is_set():
            started = time.monotonic()
            statements += 100
            body = {"ts_ms": int(time.time() * 1000), "clients": 3, "statements": statements,
                    "bytes_in": statements * 50, "bytes_out": statements * 80, "errors": 0,
                    "latency_us": statements * 200, "statements_completed": statements,
                    "maintenance": self.maintenance, "epoch": self.epoch,
                    "leader": self.leader or "pg1", "config_version": 0, "nodes": node_obs()}
            try:
                status, answer = await self.post("/metrics", body)
                elapsed = time.monotonic() - started
                if status == 200:
                    self.stats.metrics(elapsed)
                    self.epoch = answer.get("epoch", self.epoch)
                    self.leader = answer.get("leader") or self.leader
                else:
                    self.stats.failures += 1
                if n % 5 == 0:
                    await self.post("/queries", {"queries": [
                        {"session": 1, "duration_ms": 12, "client": "10.1.1.1:5000",
                         "user": "app", "database": "app", "node": "pg1", "state": "active",
                         "text": "SELECT * FROM t WHERE id = $1"}]})
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                self.stats.failures += 1
            n += 1
            left = 1.0 - (time.monotonic() - started)
            if left > 0:
                try:
                    await asyncio.wait_for(stop.wait(), left)
                except asyncio.TimeoutError:
                    pass

    async def poll_loop(self, stop):
        while not stop.is_set():
            try:
                status, answer = await self.polls.request(
                    "GET", f"/api/v1/agent/commands?node_id={self.node_id}&wait_s=25", timeout=40)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                await asyncio.sleep(0.5)
                continue
            if status != 200 or not answer:
                await asyncio.sleep(0.5)
                continue
            for cmd in answer.get("commands", []):
                if cmd["type"] == "maintenance":
                    self.maintenance = bool(cmd["args"].get("on"))
                try:
                    await self.polls.request("POST", f"/api/v1/agent/commands/{cmd['id']}/ack",
                                             {"node_id": self.node_id, "ok": True,
                                              "detail": "done"})
                except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError, ValueError):
                    pass

    def close(self):
        self.reports.close()
        self.polls.close()


class Stats:
    def __init__(self):
        self.recording = False
        self.latencies = []
        self.failures = 0

    def metrics(self, elapsed):
        if self.recording:
            self.latencies.append(elapsed)


def start_perf(control, name):
    """perf record of the control plane into BENCH_CONTROL_PERF/name.data, if that is set."""
    where = os.environ.get("BENCH_CONTROL_PERF")
    if not where:
        return None
    os.makedirs(where, exist_ok=True)
    graph = os.environ.get("BENCH_CONTROL_PERF_GRAPH", "fp")  # dwarf: stacks without frame pointers
    proc = subprocess.Popen(["perf", "record", "-q", "--call-graph", graph, "-p",
                             str(control.proc.pid), "-o",
                             os.path.join(where, name + ".data")],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(0.3)  # perf attaches before the step starts
    return proc


def stop_perf(proc):
    if proc:
        proc.send_signal(2)
        proc.wait(timeout=30)


def pct(values, p):
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p / 100))]


async def run_fleet(control, n, duration, warmup, say):
    stats = Stats()
    stop = asyncio.Event()
    agents = [Agent(control.port, f"bench-{i:05d}", stats) for i in range(n)]
    # register in batches, as a fleet that comes up does
    for i in range(0, n, 100):
        await asyncio.gather(*(a.register() for a in agents[i:i + 100]))
    tasks = []
    for i, a in enumerate(agents):
        tasks.append(asyncio.create_task(a.poll_loop(stop)))
        tasks.append(asyncio.create_task(a.report_loop(stop)))
        if i % 50 == 49:  # spread the reports over the second
            await asyncio.sleep(50 / n)
    await asyncio.sleep(warmup)
    stats.recording = True
    cpu0, pg0, t0 = cpu_seconds(control.proc.pid), postgres_cpu(control.store_pid), time.monotonic()
    me0 = time.process_time()
    await asyncio.sleep(duration)
    cpu1, pg1, t1 = cpu_seconds(control.proc.pid), postgres_cpu(control.store_pid), time.monotonic()
    me1 = time.process_time()
    stats.recording = False
    row = {"n": n, "cpu": (cpu1 - cpu0) / (t1 - t0), "store_cpu": (pg1 - pg0) / (t1 - t0),
           "rss": rss_mib(control.proc.pid), "p50": pct(stats.latencies, 50) * 1000,
           "p99": pct(stats.latencies, 99) * 1000,
           "max": (max(stats.latencies) if stats.latencies else float("nan")) * 1000,
           "rate": len(stats.latencies) / (t1 - t0), "failures": stats.failures,
           "load": os.getloadavg()[0], "client": (me1 - me0) / (t1 - t0)}
    loop = asyncio.get_running_loop()
    show = []
    for _ in range(3):
        secs, r = await loop.run_in_executor(None, control.ctl, "show-proxies")
        show.append(secs if r.returncode == 0 else float("nan"))
        if r.returncode != 0:
            say(f"  show-proxies failed ({r.returncode}) after {secs:.2f} s: "
                f"{(r.stdout + r.stderr)[-300:]}")
    row["show"] = statistics.median(show)
    perf = start_perf(control, f"mnt-on-{n}")
    pg0 = postgres_cpu(control.store_pid)
    secs, r = await loop.run_in_executor(None, control.ctl, "maintenance", "on")
    row["st_mnt"] = postgres_cpu(control.store_pid) - pg0
    stop_perf(perf)
    row["mnt_on"] = secs if r.returncode == 0 else float("nan")
    if r.returncode != 0:
        say(f"  maintenance on failed ({r.returncode}): {(r.stdout + r.stderr)[-300:]}")
    reached = sum(a.maintenance for a in agents)
    row["reached"] = reached
    perf = start_perf(control, f"mnt-off-{n}")
    secs, r = await loop.run_in_executor(None, control.ctl, "maintenance", "off")
    stop_perf(perf)
    row["mnt_off"] = secs if r.returncode == 0 else float("nan")
    stop.set()
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    for a in agents:
        a.close()
    return row


HEADER = ("{:>5} {:>6} {:>8} {:>8} {:>8} {:>8} {:>9} {:>6} {:>8} {:>8} {:>7} {:>8} {:>8} {:>5} "
          "{:>5} {:>6}"
          .format("N", "cpu", "rss_MiB", "st_cpu", "p50_ms", "p99_ms", "max_ms", "req/s",
                  "show_s", "mnt_on_s", "st_mnt", "reached", "mnt_off", "fail", "load", "client"))
ROW = ("{n:>5} {cpu:>6.2f} {rss:>8.1f} {store_cpu:>8.3f} {p50:>8.1f} {p99:>8.1f} {max:>9.1f} "
       "{rate:>6.0f} {show:>8.2f} {mnt_on:>8.2f} {st_mnt:>7.2f} {reached:>8} {mnt_off:>8.2f} "
       "{failures:>5} {load:>5.2f} {client:>6.2f}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default=os.environ.get("BENCH_CONTROL_N", "100,500,1000,2000"),
                    help="comma-separated fleet sizes")
    ap.add_argument("--duration", type=float,
                    default=float(os.environ.get("BENCH_CONTROL_SECONDS", "10")),
                    help="seconds measured per fleet size")
    ap.add_argument("--warmup", type=float, default=5.0)
    ap.add_argument("--out", default=os.environ.get("BENCH_CONTROL_OUT",
                                                    "bench-control-results.txt"))
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    lines = []

    def say(msg):
        print(msg, flush=True)
        lines.append(msg)

    say(f"bench-control {time.strftime('%Y-%m-%d %H:%M:%S')}: {os.cpu_count()} CPUs, "
        f"{args.duration:.0f} s measured per size after {args.warmup:.0f} s warm-up")
    say(HEADER)
    store = Store()
    try:
        for n in (int(x) for x in args.n.split(",")):
            workdir = tempfile.mkdtemp(prefix="pgrelay-bench-ctl-")
            control = Control(store.new_db(f"bench_{n}"), workdir)
            control.store_pid = store.pid
            try:
                row = asyncio.run(run_fleet(control, n, args.duration, args.warmup, say))
                say(ROW.format(**row))
            finally:
                control.stop()
                shutil.rmtree(workdir, ignore_errors=True)
    finally:
        store.stop()
    say("cpu, st_cpu: cores of the control plane and of the store (the postmaster and its "
        "backends) while measured; p50/p99/max: metrics round "
        "trip; show_s: pgrelayctl show-proxies (median of 3); mnt_on_s: maintenance on until "
        "every proxy acknowledged; st_mnt: CPU seconds of the store during it; reached: simulated agents in maintenance afterwards; fail: "
        "failed agent calls; load: 1-minute load average; client: cores of the simulated agents")
    with open(args.out, "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
