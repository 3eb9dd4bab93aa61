"""A PostgreSQL 15 primary with streaming replicas, and a pgrelay that follows its write leader.

Used by the failover tests (test_failover_*.py, failover_helpers.py) and tests/bench/failover.py;
``make_cluster`` is their fixture. Everything runs on loopback, each node
in its own temporary directory owned by postgres, on its own port.

    cluster = Cluster.create(replicas=2)          # pg1 primary, pg2 + pg3 streaming replicas
    relay = start_ha_relay(cluster, agent={"health_interval": "200ms"}, read_listen_port=0)
    cluster.stop_node("pg1", mode="immediate")
    cluster["pg2"].promote()
    ...
    relay.stop(); cluster.destroy()

Node settings: max_connections = 200 on every node (a replica needs at least the primary's
value), wal_level = replica, hot_standby = on, fsync = off, wal_keep_size so replicas need no
slot. Replicas are made with ``pg_basebackup -R -X stream`` (standby.signal and
primary_conninfo written by -R); each node's port, socket directory, cluster_name (the
walreceiver's application_name) and synchronous_standby_names live in its own node.conf,
included at the end of postgresql.conf.

Admin console helpers (``admin``, ``admin_json``) talk to the relay's Unix socket like
``echo line | socat - UNIX-CONNECT:sock``.
"""

import contextlib
import os
import shutil
import signal
import tempfile
import time

import psycopg
import pytest

from pgserver import PgEndpoint

from conftest import (  # noqa: F401  (admin is re-exported for the failover tests)
    PG_BIN,
    PGRELAY_BIN,
    admin,
    admin_json,
    admin_socket,
    _LIVE_RELAYS,
    PortTaken,
    _as_postgres,
    _discard_relay,
    free_port,
    on_a_free_port,
    port_listening,
    spawn_relay,
    start_on_free_port,
    wait_for,
    write_config,
)

MAX_CONNECTIONS = 200

BASE_CONF = f"""
# --- pgrelay test cluster
listen_addresses = '127.0.0.1'
max_connections = {MAX_CONNECTIONS}
wal_level = replica
hot_standby = on
max_wal_senders = 10
wal_keep_size = 512MB
fsync = off
full_page_writes = off
shared_buffers = 32MB
max_wal_size = 1GB
wal_receiver_status_interval = 1s
hot_standby_feedback = off
log_min_messages = warning
log_line_prefix = '%m [%p] '
include_if_exists = 'node.conf'
"""


class NodeError(RuntimeError):
    pass


class Node(PgEndpoint):
    """One PostgreSQL server of the cluster; connect(): a direct connection to it (bypassing
    pgrelay)."""

    CONNECT_TIMEOUT = 5

    def __init__(self, cluster, name, port):
        self.cluster = cluster
        self.name = name
        self.root = os.path.join(cluster.root, name)  # socket dir, log
        self.pgdata = os.path.join(self.root, "data")
        self.logfile = os.path.join(self.root, "postgres.log")
        self.port = port
        self.host = "127.0.0.1"
        self.sync_standbys = ""

    def __repr__(self):
        return f"<Node {self.name} :{self.port}>"

    # -- configuration
    def write_node_conf(self):
        with open(os.path.join(self.pgdata, "node.conf"), "w") as f:
            f.write(
                f"port = {self.port}\n"
                f"unix_socket_directories = '{self.root}'\n"
                f"cluster_name = '{self.name}'\n"
                f"synchronous_standby_names = '{self.sync_standbys}'\n"
            )
        shutil.chown(os.path.join(self.pgdata, "node.conf"), "postgres", "postgres")

    # -- connections (conninfo, connect, query: PgEndpoint)
    def scalar(self, sql, params=None):
        return self.query(sql, params)[0][0]

    # -- state
    def is_running(self):
        r = _as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.pgdata, "status"])
        return r.returncode == 0

    def answers(self):
        try:
            self.query("SELECT 1")
            return True
        except psycopg.Error:
            return False

    def in_recovery(self):
        return self.scalar("SELECT pg_is_in_recovery()")

    def postmaster_pid(self):
        """The running postmaster's pid (first line of postmaster.pid)."""
        with open(os.path.join(self.pgdata, "postmaster.pid")) as f:
            return int(f.readline())

    # -- control
    def start(self, timeout=60):
        """pg_ctl start. If the port was taken meanwhile (a port of free_port()'s, so only by
        another test's daemon): before pgrelay knows the port, pick another; after, wait for it
        to become free again (procs.on_a_free_port)."""

        def attempt(port, n):
            if port != self.port:
                self.port = port
                self.write_node_conf()
            try:
                offset = os.path.getsize(self.logfile)
            except OSError:
                offset = 0
            r = _as_postgres(
                [f"{PG_BIN}/pg_ctl", "-D", self.pgdata, "-l", self.logfile, "-w", "-t",
                 str(timeout), "start"]
            )
            if r.returncode == 0:
                return
            log = self.log_since(offset)
            if "could not bind" not in log and "already in use" not in log:
                raise NodeError(f"pg_ctl start {self.name} failed: {r.stdout}{r.stderr}\n{log}")
            raise PortTaken(log)

        try:
            on_a_free_port(attempt, attempts=12, first=self.port, pause=0.5,
                           port=self.port if self.cluster.relay_pinned else None)
        except PortTaken:
            raise NodeError(f"pg_ctl start {self.name}: port {self.port} kept being taken") from None

    def stop(self, mode="fast"):
        """pg_ctl stop -m MODE (immediate = crash-like: no shutdown checkpoint)."""
        r = _as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.pgdata, "-m", mode, "-w", "-t", "60",
                          "stop"])
        if r.returncode != 0 and self.is_running():
            raise NodeError(f"pg_ctl stop {self.name} failed: {r.stdout}{r.stderr}")

    def promote(self, wait=True):
        """SELECT pg_promote(): end recovery; returns once promotion is done (wait=True)."""
        ok = self.scalar("SELECT pg_promote(wait => %s, wait_seconds => 60)", (wait,))
        if wait and not ok:
            raise NodeError(f"pg_promote() on {self.name} returned false")
        return ok

    def pause_replay(self):
        self.query("SELECT pg_wal_replay_pause()")

    def resume_replay(self):
        self.query("SELECT pg_wal_replay_resume()")

    def replay_lsn(self):
        return self.scalar("SELECT pg_last_wal_replay_lsn()")

    def log_since(self, offset):
        try:
            with open(self.logfile, errors="replace") as f:
                f.seek(offset)
                return f.read()
        except OSError:
            return ""

    def log_tail(self, n=40):
        try:
            with open(self.logfile, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError as e:
            return f"<no log: {e}>"

    def relay_node(self, role):
        return (self.name, {"host": self.host, "port": self.port, "role": role})


class Cluster:
    """pg1 = primary, pg2..pgN = streaming replicas of pg1."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="pgrelay-ha-")
        os.chmod(self.root, 0o755)
        self.nodes = []
        self.relay_pinned = False  # set once a pgrelay was configured with the ports

    def __getitem__(self, name):
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    @property
    def primary(self):
        return self.nodes[0]

    @property
    def replicas(self):
        return self.nodes[1:]

    @classmethod
    def create(cls, replicas=2, sync_standby=None):
        """A running primary with ``replicas`` streaming replicas.

        ``sync_standby``: name of a replica the primary commits synchronously to
        (synchronous_standby_names = 'FIRST 1 (name)', synchronous_commit = on), so that
        every commit a client saw succeed is on that replica too."""
        c = cls()
        try:
            c._create_primary(sync_standby)
            for i in range(replicas):
                c.add_replica(f"pg{i + 2}", c.primary)
            c.wait_streaming(c.primary, replicas)
            return c
        except BaseException:
            c.destroy()
            raise

    def _mkroot(self, name):
        root = os.path.join(self.root, name)
        os.mkdir(root)
        shutil.chown(root, "postgres", "postgres")
        os.chmod(root, 0o700)
        return root

    def _create_primary(self, sync_standby):
        node = Node(self, "pg1", free_port())
        self._mkroot(node.name)
        r = _as_postgres(
            [f"{PG_BIN}/initdb", "-D", node.pgdata, "--auth=trust", "-U", "postgres", "-E",
             "UTF8", "--locale=C", "--no-sync"]
        )
        if r.returncode != 0:
            raise NodeError("initdb failed: " + r.stdout + r.stderr)
        with open(os.path.join(node.pgdata, "postgresql.conf"), "a") as f:
            f.write(BASE_CONF)
        if sync_standby:
            node.sync_standbys = f"FIRST 1 ({sync_standby})"
        node.write_node_conf()
        self.nodes.append(node)
        node.start()

    def add_replica(self, name, source):
        """pg_basebackup -R -X stream from ``source``, then start it."""
        node = Node(self, name, free_port())
        if not os.path.isdir(node.root):
            self._mkroot(name)
        r = _as_postgres(
            [f"{PG_BIN}/pg_basebackup", "-D", node.pgdata, "-R", "-X", "stream", "-c", "fast",
             "-h", source.host, "-p", str(source.port), "-U", "postgres", "--no-sync"]
        )
        if r.returncode != 0:
            raise NodeError(f"pg_basebackup for {name} failed: {r.stdout}{r.stderr}")
        # node.conf came over from the source: make it this node's own
        node.write_node_conf()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(os.path.join(node.pgdata, "postmaster.opts"))
        self.nodes.append(node)
        node.start()
        return node

    def rebuild_as_replica(self, name, source):
        """Turn node ``name`` (stopped or not) into a fresh replica of ``source``, same port."""
        node = self[name]
        if node.is_running():
            node.stop("immediate")
        shutil.rmtree(node.pgdata)
        r = _as_postgres(
            [f"{PG_BIN}/pg_basebackup", "-D", node.pgdata, "-R", "-X", "stream", "-c", "fast",
             "-h", source.host, "-p", str(source.port), "-U", "postgres", "--no-sync"]
        )
        if r.returncode != 0:
            raise NodeError(f"pg_basebackup for {name} failed: {r.stdout}{r.stderr}")
        node.sync_standbys = ""
        node.write_node_conf()
        node.start()
        return node

    def stop_node(self, name, mode="immediate"):
        self[name].stop(mode)

    def wait_streaming(self, primary, count, timeout=60):
        """Until ``primary`` has ``count`` walsenders in state streaming."""
        wait_for(
            lambda: primary.scalar(
                "SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'"
            ) >= count,
            timeout=timeout,
            interval=0.1,
            what=f"{count} streaming replica(s) of {primary.name}",
        )

    def wait_caught_up(self, replica, primary=None, timeout=60):
        """Until ``replica`` has replayed the primary's current WAL position."""
        primary = primary or self.primary
        target = primary.scalar("SELECT pg_current_wal_lsn()")
        wait_for(
            lambda: replica.scalar(
                "SELECT coalesce(pg_last_wal_replay_lsn() >= %s::pg_lsn, false)", (str(target),)
            ),
            timeout=timeout,
            interval=0.05,
            what=f"{replica.name} to replay up to {target}",
        )

    def relay_nodes(self):
        """[node.*] sections for pgrelay: pg1 role = primary, the others role = replica."""
        return [n.relay_node("primary" if i == 0 else "replica") for i, n in enumerate(self.nodes)]

    def destroy(self):
        for n in self.nodes:
            with contextlib.suppress(Exception):
                _as_postgres([f"{PG_BIN}/pg_ctl", "-D", n.pgdata, "-m", "immediate", "-w",
                              "stop"])
        shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()


@pytest.fixture
def make_cluster():
    """``make_cluster(**Cluster.create's keys)``: a new cluster, destroyed at teardown."""
    made = []

    def make(**kw):
        c = Cluster.create(**kw)
        made.append(c)
        return c

    yield make
    for c in made:
        c.destroy()


# --------------------------------------------------------------------------- #
# pgrelay in front of the cluster
# --------------------------------------------------------------------------- #





def show_info(relay):
    return admin_json(relay, "show info")


def show_nodes(relay):
    return {n["name"]: n for n in admin_json(relay, "show nodes")}


def wait_probe_rounds(relay, rounds=3, timeout=15.0):
    """Wait until the agent has finished ``rounds`` probes of every node, each started after
    the previous round was seen (show nodes' probe_age_ms): "a few probe rounds", counted."""
    for _ in range(rounds):
        since = time.monotonic()

        def probed_since():
            age_limit = (time.monotonic() - since) * 1000
            return all(n["probe_age_ms"] is not None and n["probe_age_ms"] < age_limit
                       for n in show_nodes(relay).values())

        wait_for(probed_since, timeout=timeout, interval=0.02, what="a probe round of every node")


def leader_history(relay):
    return admin_json(relay, "show leader history")


def start_ha_relay(cluster, agent=None, nodes=None, wait=True, control=None, **extra):
    """Start pgrelay in front of ``cluster``; ``agent``: [agent] keys, ``control``: [control]
    keys, ``extra``: [pgrelay] keys.

    Waits until the TCP port listens, the admin socket answers and the agent has probed
    every node (show nodes: no health 'unknown') with a write leader chosen."""
    if not os.access(PGRELAY_BIN, os.X_OK):
        raise RuntimeError(f"pgrelay binary not found at {PGRELAY_BIN} (run make)")
    workdir = tempfile.mkdtemp(prefix="pgrelay-ha-relay-")
    agent = dict(agent or {})
    agent.setdefault("monitor_user", "postgres")
    nodes = nodes if nodes is not None else cluster.relay_nodes()
    cluster.relay_pinned = True

    def launch(port, attempt):
        if "read_listen_port" in extra and extra["read_listen_port"] == "auto":
            settings = dict(extra, read_listen_port=free_port())
        else:
            settings = dict(extra)
        conf = os.path.join(workdir, "pgrelay.ini")
        log_path = os.path.join(workdir, f"pgrelay-{attempt}.log")
        write_config(conf, port, None, settings, nodes)
        with open(conf, "a") as f:
            f.write("\n[agent]\n" + "".join(f"{k} = {v}\n" for k, v in agent.items()))
            if control:
                f.write("\n[control]\n" + "".join(f"{k} = {v}\n" for k, v in control.items()))
        relay = spawn_relay(workdir, port, conf, log_path)
        relay.read_port = settings.get("read_listen_port") or None
        relay.settings = settings
        return relay

    if not wait:
        return launch(free_port(), 0)
    relay = start_on_free_port(
        launch,
        lambda r: port_listening(r.port) and (not r.read_port or port_listening(r.read_port)),
        _discard_relay,
        "pgrelay",
    )
    wait_relay_ready(relay)
    return relay


def wait_relay_ready(relay, timeout=15):
    path = admin_socket(relay)

    def ready():
        try:
            nodes = admin_json(path, "show nodes")
            info = admin_json(path, "show info")
        except (OSError, ValueError):
            return False
        return info.get("write_leader") and all(n["health"] != "unknown" for n in nodes)

    wait_for(ready, timeout=timeout, what="pgrelay admin socket and a first probe of every node")


def stop_relay(relay):
    relay.stop()
    with contextlib.suppress(ValueError):
        _LIVE_RELAYS.remove(relay)


def destroy_relay(relay):
    stop_relay(relay)
    shutil.rmtree(relay.workdir, ignore_errors=True)


def log_lines(relay, needle):
    return [line for line in relay.log().splitlines() if needle in line]


def agent_kill9(relay):
    pid = relay.agent_pid()
    if pid:
        os.kill(pid, signal.SIGKILL)
    return pid
