"""The fault-injection suite's fleet: pgrelay-control with its store, two proxies with agents
(proxy-a on 127.0.0.2, proxy-b on 127.0.0.3, each its own "host": see control_e2e_helpers.py),
a primary pg1 and its synchronous replica pg2 (every acknowledged commit is on pg2 too).

Each scenario builds its own fleet (``with Fleet.start(pg) as fleet:``), so that a fenced or
promoted node never leaks into the next one, and checks the safety invariants with a
``Watch`` (a thread that samples both proxies' consoles every few milliseconds) and
``Writer``s (threads writing through each proxy and remembering what was acknowledged).
"""

import contextlib
import os
import re
import signal
import threading
import time
import uuid

import psycopg

import loadgen
from cluster import Cluster
from conftest import start_together_on_free_port, wait_for
from control_e2e_helpers import (
    ControlPlane,
    http,
    cleanup_dir,
    ctl_json,
    info,
    make_root,
    render_ini,
    run_ctl,
    start_proxy,
    stop_proxy,
)
from loadgen import InThread

ADDRESSES = {"proxy-a": "127.0.0.2", "proxy-b": "127.0.0.3"}
TEST_HOLD_ENV = "PGRELAY_CONTROL_TEST_HOLD"  # pgrelay-control's test hook (pgrelay-control(8))


def postmaster_pid(node):
    with open(os.path.join(node.pgdata, "postmaster.pid")) as f:
        return int(f.readline())


class FleetControlPlane(ControlPlane):
    """pgrelay-control with extra [control] settings (``settings``: {key: value})."""

    settings = {}

    def _write_ini(self):
        super()._write_ini()
        if not self.settings:
            return
        with open(self.conf) as f:
            text = f.read()
        extra = ""
        for k, v in self.settings.items():
            line = re.compile(rf"^{re.escape(k)} = .*$", re.M)
            if line.search(text):
                text = line.sub(f"{k} = {v}", text, count=1)
            else:
                extra += f"{k} = {v}\n"
        with open(self.conf, "w") as f:
            f.write(text.replace("[control]\n", "[control]\n" + extra, 1))


class LeasedControlPlane(FleetControlPlane):
    """pgrelay-control with [lease] enabled (3 s lease, renewed every second), so that two
    of them can share the store."""

    def _write_ini(self):
        super()._write_ini()
        with open(self.conf, "a") as f:
            f.write("\n[lease]\nenabled = on\nlease_duration_secs = 3\nlease_interval_secs = 1\n")

    def ready(self):
        """Serving HTTP (a replica that does not hold the lease answers /readyz 503)."""
        try:
            return http(self.port, "GET", "/healthz", timeout=2)[0] == 200
        except OSError:
            return False

    def holds_lease(self):
        try:
            return http(self.port, "GET", "/readyz", timeout=2)[0] == 200
        except OSError:
            return False


class Fleet:
    def __init__(self, pg):
        self.pg = pg
        self.root = make_root()
        self.store_db = "faults_" + uuid.uuid4().hex[:10]
        self.control = None
        self.control2 = None  # a second replica sharing the store (leased fleets)
        self.cluster = None
        self.proxies = {}
        self.listen_port = None
        self.started = time.monotonic()
        self.control_settings = {}
        self.control_hosts = {}

    @classmethod
    def start(cls, pg, hold=None, leased=False, control_settings=None, control_hosts=None):
        """A running fleet; ``hold`` sets the control plane's test hook (hold at that step).
        ``leased``: two control-plane replicas with leases, the first one holding it (only it
        gets ``hold``), both in the proxies' endpoint list. ``control_settings``: extra
        [control] keys of control.ini ({key: value}). ``control_hosts``: {node_id: address}
        a proxy reaches the control plane at instead of 127.0.0.1 (with listen_addr =
        0.0.0.0), so that a firewall rule can cut that proxy off alone."""
        f = cls(pg)
        f.control_settings = dict(control_settings or {})
        f.control_hosts = dict(control_hosts or {})
        try:
            f._start(hold, leased)
        except BaseException:
            f.destroy()
            raise
        return f

    def _start(self, hold, leased=False):
        self.pg.query(f"CREATE DATABASE {self.store_db}")
        store = (f"host={self.pg.host} port={self.pg.port} user=postgres dbname={self.store_db} "
                 "connect_timeout=5")
        kind = LeasedControlPlane if leased else FleetControlPlane
        self.control = kind(os.path.join(self.root, "control"), store)
        self.control.settings = self.control_settings
        os.makedirs(self.control.workdir)
        self.start_control(hold)
        if leased:
            wait_for(self.control.holds_lease, timeout=10, what="the first replica's lease")
            self.control2 = kind(os.path.join(self.root, "control2"), store)
            self.control2.settings = self.control_settings
            os.makedirs(self.control2.workdir)
            self.control2.start()
        self.cluster = Cluster.create(replicas=1, sync_standby="pg2")
        self.cluster.relay_pinned = True

        def start_proxies(port):
            self.listen_port = port
            for node_id, address in ADDRESSES.items():
                self.proxies[node_id] = start_proxy(self.root, node_id, address,
                                                    self.ini(node_id))

        def discard_proxies():
            for r in self.proxies.values():
                stop_proxy(r)
            self.proxies.clear()

        start_together_on_free_port(start_proxies, discard_proxies)
        wait_for(lambda: set(self.live_proxies()) >= set(ADDRESSES), timeout=15,
                 what="both proxies registered and live")
        wait_for(lambda: self.control.deployment()["leader"] == "pg1", timeout=10,
                 interval=0.1, what="the control plane to settle pg1 as the write leader")
        wait_for(lambda: all(info(r)["write_leader"] == "pg1" for r in self.proxies.values()),
                 timeout=10, what="both proxies routing to pg1")

    def start_control(self, hold=None):
        """(Re)start pgrelay-control, with the test hook set to ``hold`` or unset."""
        old = os.environ.pop(TEST_HOLD_ENV, None)
        try:
            if hold:
                os.environ[TEST_HOLD_ENV] = hold
            self.control.start()
        finally:
            os.environ.pop(TEST_HOLD_ENV, None)
            if old is not None:
                os.environ[TEST_HOLD_ENV] = old

    def destroy(self):
        for r in self.proxies.values():
            with contextlib.suppress(Exception):
                stop_proxy(r)
        for c in (self.control, self.control2):
            if c:
                with contextlib.suppress(Exception):
                    os.kill(c.proc.pid, signal.SIGCONT)
                c.stop()
        if self.cluster is not None:
            for n in self.cluster.nodes:  # a test may leave a node stopped with SIGSTOP
                with contextlib.suppress(Exception):
                    os.kill(postmaster_pid(n), signal.SIGCONT)
            self.cluster.destroy()
        with contextlib.suppress(Exception):
            self.pg.query(f"DROP DATABASE IF EXISTS {self.store_db} WITH (FORCE)")
        if os.environ.get("PGRELAY_E2E_KEEP"):
            print(f"faults: logs kept in {self.root}")
        else:
            cleanup_dir(self.root)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()

    # -- helpers
    @property
    def a(self):
        return self.proxies["proxy-a"]

    @property
    def b(self):
        return self.proxies["proxy-b"]

    def ini(self, node_id=None):
        host = self.control_hosts.get(node_id)
        urls = ",".join(c.url.replace("127.0.0.1", host) if host else c.url
                        for c in (self.control, self.control2) if c)
        return render_ini(self.listen_port, os.path.join(self.root, "host"), urls,
                          self.cluster.relay_nodes())

    def ctl(self, *args, **kw):
        return run_ctl(self.control, *args, **kw)

    def ctl_json(self, *args, **kw):
        return ctl_json(self.control, *args, **kw)

    def live_proxies(self):
        return {k: v for k, v in self.control.proxies().items() if v["live"]}

    def agent_pid(self, node_id):
        return self.proxies[node_id].agent_pid()

    def new_session_runs(self, relay, timeout=2.0):
        """A new session through ``relay`` runs a statement within ``timeout`` seconds (a held
        one is left to finish or fail in its thread)."""

        def run():
            try:
                with psycopg.connect(relay.conninfo(connect_timeout=10), autocommit=True) as c:
                    return c.execute("SELECT 1").fetchone()[0] == 1
            except psycopg.Error:
                return False

        session = InThread(run)
        return session.finished_within(timeout) and session.value is True


def direct_write_fails(node, table):
    """A fresh client's BEGIN READ WRITE; INSERT; COMMIT on ``node`` does not commit. Returns
    the error text (AssertionError when it committed)."""
    try:
        with node.connect(autocommit=True, connect_timeout=3) as c:
            # a commit that waits for a synchronous standby that is gone is cancelled after
            # 3 s: PostgreSQL then reports it committed (it is, locally)
            cancel = threading.Timer(3.0, c.cancel)
            cancel.start()
            try:
                c.execute("BEGIN READ WRITE")
                c.execute(f"INSERT INTO {table} (proxy, n) VALUES ('direct', -1)")
                c.execute("COMMIT")
            finally:
                cancel.cancel()
    except psycopg.Error as e:
        return str(e).strip()
    raise AssertionError(f"a direct write committed on {node.name}")


# --------------------------------------------------------------------------- #
# invariants
# --------------------------------------------------------------------------- #


class Watch:
    """Samples ``show info`` of every proxy every few ms until stopped, and checks:

    * at no moment do two unpaused proxies route writes to different nodes;
    * every pause has an end time, and no proxy is still paused past it (plus ``slack``).
    """

    def __init__(self, fleet, slack=1.5):
        self.fleet = fleet
        self.slack = slack
        self.samples = 0
        self.violations = []
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        while not self._stop.is_set():
            routes = {}
            for node_id, relay in self.fleet.proxies.items():
                try:
                    own = info(relay)
                except Exception:  # noqa: BLE001 - a proxy being restarted
                    continue
                now = time.time()
                if own["maintenance"] == "on":
                    until = own.get("maintenance_until")
                    if not until:
                        self._violate(f"{node_id} paused with no end time: {own}")
                    elif now > _parse_time(until) + self.slack:
                        self._violate(f"{node_id} still paused {now - _parse_time(until):.1f}s "
                                      f"past its end time {until}")
                elif own["write_leader"]:
                    routes[node_id] = own["write_leader"]
            if len(set(routes.values())) > 1:
                self._violate(f"proxies route writes to different nodes: {routes}")
            self.samples += 1
            self._stop.wait(0.02)

    def _violate(self, what):
        if len(self.violations) < 20:
            self.violations.append(what)

    def stop(self):
        self._stop.set()
        self.thread.join(10)

    def check(self):
        self.stop()
        assert self.samples > 0, "the watch took no sample"
        assert not self.violations, self.violations


def _parse_time(text):
    """show info's time: "YYYY-MM-DD HH:MM:SS", local time, whole seconds."""
    return time.mktime(time.strptime(text, "%Y-%m-%d %H:%M:%S"))


class Writer(loadgen.Writer):
    """Writes (proxy, n) rows through one proxy, one autocommit INSERT at a time
    (statement_timeout 5 s), reconnecting after errors; ``acked``: each n whose commit was
    acknowledged. Runs from its creation until finish()."""

    def __init__(self, relay, table, tag):
        def insert(conn, n):
            conn.execute(f"INSERT INTO {table} (proxy, n) VALUES (%s, %s)", (tag, n))

        super().__init__(relay, insert, pause=0.05, interval=0.01, connect_timeout=2,
                         setup=lambda conn: conn.execute("SET statement_timeout = 5000"))
        self.table, self.tag = table, tag
        self.start()

    @property
    def acked(self):
        return [n for n, *_ in self.ok]

    def finish(self):
        self.stop(timeout=15)


def assert_no_acknowledged_write_lost(node, table, writers):
    rows = set(node.query(f"SELECT proxy, n FROM {table}"))
    for w in writers:
        missing = [i for i in w.acked if (w.tag, i) not in rows]
        assert not missing, f"{w.tag}: acknowledged rows missing on {node.name}: {missing[:10]}"
