"""A real HA stack on loopback for the Patroni suite: one etcd, three Patroni members (each a
PostgreSQL 15 run by Patroni as the postgres user), pgrelay with its agent in front of the
three, and HAProxy with Patroni's own health check (``GET /primary``) beside it.

Everything lives in one temporary directory; every port comes from conftest's free_port().
Patroni's timing: ttl 10, loop_wait 2, retry_timeout 4 (its rule: loop_wait + 2 x
retry_timeout <= ttl). Patroni uses its ``etcd3:`` section (etcd's v3 API).

    stack = Stack.start()
    stack.leader()               # who etcd names leader now (None while the key is absent)
    stack.member("m2").postmaster_pid()
    stack.patronictl("switchover", "--leader", "m1", "--candidate", "m2", "--force")
    stack.reset()                # three members running, one leader, two streaming
    stack.stop()
"""

import base64
import contextlib
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request

import psycopg

from cluster import destroy_relay, start_ha_relay
from conftest import PG_BIN, _as_postgres, free_port, port_listening, wait_for

SCOPE = "pgrelay-patroni"
MEMBERS = ("m1", "m2", "m3")
TTL, LOOP_WAIT, RETRY_TIMEOUT = 10, 2, 4
# The agent as the leader-following tests run it: a probe every 200 ms, down after 2 failures.
AGENT = {"health_interval": "200ms", "fall": 2, "rise": 1, "health_timeout": "1s",
         "monitor_user": "postgres"}
# The proxies the suite runs in front of the cluster, side by side: pgrelay with its probes
# alone (ha_source = none, the default), pgrelay that also asks Patroni (ha_source = patroni),
# and HAProxy with Patroni's GET /primary check.
PROXIES = ("pgrelay", "pgrelay_ha", "haproxy")


def http_json(url, body=None, timeout=2.0):
    """GET (or POST ``body`` as JSON) and decode the answer; raises OSError on failure."""
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read() or b"null")


def http_status(url, timeout=1.0):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


class Etcd:
    """One etcd 3.4 member, its data in ``root``/etcd."""

    def __init__(self, root):
        self.client_port, self.peer_port = free_port(), free_port()
        self.datadir = os.path.join(root, "etcd")
        self.log_path = os.path.join(root, "etcd.log")
        url = f"http://127.0.0.1:{self.client_port}"
        peer = f"http://127.0.0.1:{self.peer_port}"
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(
                ["etcd", "--name", "e1", "--data-dir", self.datadir,
                 "--listen-client-urls", url, "--advertise-client-urls", url,
                 "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                 "--initial-cluster", f"e1={peer}", "--initial-cluster-state", "new",
                 "--enable-v2=false"],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True)
        self.url = url
        wait_for(lambda: http_status(f"{url}/health") == 200 or self.proc.poll() is not None,
                 timeout=30, what="etcd to answer /health")
        assert self.proc.poll() is None, "etcd exited:\n" + self.log()

    def log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-3000:]

    def get(self, key):
        """The value of ``key`` (str), or None when it is absent."""
        b64 = base64.b64encode(key.encode()).decode()
        answer = http_json(f"{self.url}/v3/kv/range", {"key": b64}, timeout=1.0)
        kvs = answer.get("kvs") or []
        return base64.b64decode(kvs[0]["value"]).decode() if kvs else None

    def stop(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class Member:
    """One Patroni member and the PostgreSQL it runs."""

    def __init__(self, stack, name):
        self.stack = stack
        self.name = name
        self.pg_port, self.api_port = free_port(), free_port()
        self.dir = os.path.join(stack.root, name)
        self.pgdata = os.path.join(self.dir, "data")
        self.config = os.path.join(self.dir, "patroni.yml")
        self.log_path = os.path.join(self.dir, "patroni.log")
        self.proc = None
        os.makedirs(self.dir)
        self._write_config()
        shutil.chown(self.dir, "postgres", "postgres")

    def _write_config(self):
        # YAML by hand: JSON is YAML, so each part is written with json.dumps.
        conf = {
            "scope": SCOPE,
            "name": self.name,
            "log": {"level": "INFO"},
            "restapi": {"listen": f"127.0.0.1:{self.api_port}",
                        "connect_address": f"127.0.0.1:{self.api_port}"},
            "etcd3": {"host": f"127.0.0.1:{self.stack.etcd.client_port}"},
            "bootstrap": {
                "dcs": {
                    "ttl": TTL, "loop_wait": LOOP_WAIT, "retry_timeout": RETRY_TIMEOUT,
                    "maximum_lag_on_failover": 16 * 1024 * 1024,
                    "postgresql": {
                        "use_pg_rewind": True,
                        "parameters": {"max_connections": 200, "max_wal_senders": 10,
                                       "wal_keep_size": "256MB", "hot_standby": "on",
                                       "wal_level": "replica", "fsync": "off",
                                       "wal_receiver_status_interval": "1s"},
                    },
                },
                "initdb": [{"encoding": "UTF8"}, {"locale": "C"}],
                "pg_hba": ["local all all trust", "host all all 127.0.0.1/32 trust",
                           "host replication all 127.0.0.1/32 trust"],
            },
            "postgresql": {
                "listen": f"127.0.0.1:{self.pg_port}",
                "connect_address": f"127.0.0.1:{self.pg_port}",
                "data_dir": self.pgdata,
                "bin_dir": PG_BIN,
                "pgpass": os.path.join(self.dir, "pgpass"),
                # A replica made again (patronictl reinit) must not wait for a spread checkpoint.
                "basebackup": [{"checkpoint": "fast"}],
                "authentication": {"superuser": {"username": "postgres"},
                                   "replication": {"username": "postgres"},
                                   "rewind": {"username": "postgres"}},
                "parameters": {"unix_socket_directories": self.dir,
                               "log_min_messages": "warning"},
            },
            "tags": {"nofailover": False, "noloadbalance": False},
        }
        with open(self.config, "w") as f:
            json.dump(conf, f, indent=1)

    def start(self):
        """Start Patroni as postgres (its own session, so that kill -9 of it alone is possible)."""
        log = open(self.log_path, "a")
        env = dict(os.environ, HOME=self.dir, PATH=f"{PG_BIN}:{os.environ.get('PATH', '')}")
        self.proc = subprocess.Popen(["patroni", self.config], stdin=subprocess.DEVNULL,
                                     stdout=log, stderr=subprocess.STDOUT, user="postgres",
                                     group="postgres", extra_groups=[], env=env, cwd=self.dir,
                                     start_new_session=True)
        log.close()

    def patroni_pid(self):
        return self.proc.pid if self.proc and self.proc.poll() is None else None

    def postmaster_pid(self):
        """The postmaster's pid from postmaster.pid if that process lives, else None."""
        try:
            with open(os.path.join(self.pgdata, "postmaster.pid")) as f:
                pid = int(f.readline())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return None
        return pid

    def postgres_pids(self):
        """The postmaster and its children."""
        pm = self.postmaster_pid()
        if pm is None:
            return []
        from conftest import child_pids
        return [pm, *child_pids(pm)]

    def stop_everything(self):
        """SIGSTOP Patroni and every PostgreSQL process of this member; returns the pids to
        SIGCONT. The postmaster is stopped before its children are listed: a list read first
        misses a backend forked between the read and the postmaster's stop, which then goes on
        serving its session (a proxy's write session acknowledged writes on a "stopped" old
        leader after etcd had named another member)."""
        from conftest import child_pids
        stopped = []
        for pid in (self.patroni_pid(), self.postmaster_pid()):
            assert pid, f"{self.name}: Patroni or its postmaster is not running"
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        for pid in child_pids(stopped[1]):
            with contextlib.suppress(ProcessLookupError):  # a short-lived child may be gone
                os.kill(pid, signal.SIGSTOP)
                stopped.append(pid)
        return stopped

    def api(self, path):
        return http_json(f"http://127.0.0.1:{self.api_port}{path}")

    def connect(self, **kw):
        return psycopg.connect(host="127.0.0.1", port=self.pg_port, user="postgres",
                               dbname="postgres", connect_timeout=3, autocommit=True, **kw)

    def is_primary(self):
        """It answers a fresh session and is not in recovery (False when it refuses)."""
        try:
            return not self.query("SELECT pg_is_in_recovery()")[0][0]
        except psycopg.Error:
            return False

    def query(self, sql, params=None):
        with self.connect() as c:
            cur = c.execute(sql, params)
            return cur.fetchall() if cur.description is not None else None

    def relay_node(self, role):
        return (self.name, {"host": "127.0.0.1", "port": self.pg_port, "role": role})

    def log(self, n=4000):
        with open(self.log_path, errors="replace") as f:
            return f.read()[-n:]

    def kill(self):
        """Patroni and its PostgreSQL, at once (teardown)."""
        pids = self.postgres_pids()
        if self.proc and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
                os.kill(pid, signal.SIGKILL)
        if os.path.isdir(self.pgdata):
            _as_postgres([f"{PG_BIN}/pg_ctl", "-D", self.pgdata, "-m", "immediate", "-w", "stop"])


class HAProxy:
    """HAProxy as Patroni's documentation puts it in front of a cluster: a write port whose
    servers are checked with GET /primary on each member's REST API, and a read port checked
    with GET /replica; sessions on a server marked down are shut at once."""

    def __init__(self, stack):
        self.port, self.read_port = free_port(), free_port()
        self.cfg = os.path.join(stack.root, "haproxy.cfg")
        self.log_path = os.path.join(stack.root, "haproxy.log")

        def servers(check):
            return "".join(f"    server {m.name} 127.0.0.1:{m.pg_port} check port {m.api_port}\n"
                           for m in stack.members.values())
        with open(self.cfg, "w") as f:
            f.write(f"""global
    maxconn 1000
defaults
    mode tcp
    timeout connect 2s
    timeout client 60s
    timeout server 60s
    timeout check 1s
listen write
    bind 127.0.0.1:{self.port}
    option httpchk GET /primary
    http-check expect status 200
    default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions
{servers('/primary')}listen read
    bind 127.0.0.1:{self.read_port}
    balance leastconn
    option httpchk GET /replica
    http-check expect status 200
    default-server inter 1s fall 2 rise 2 on-marked-down shutdown-sessions
{servers('/replica')}""")
        with open(self.log_path, "w") as log:
            self.proc = subprocess.Popen(["haproxy", "-f", self.cfg, "-db"],
                                         stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        wait_for(lambda: port_listening(self.port) or self.proc.poll() is not None,
                 timeout=15, what="haproxy to listen")
        assert self.proc.poll() is None, "haproxy exited"

    def conninfo(self, read=False):
        return (f"host=127.0.0.1 port={self.read_port if read else self.port} user=postgres "
                "dbname=postgres sslmode=disable connect_timeout=5")

    def stop(self):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)


class Stack:
    """etcd + three Patroni members + pgrelay + HAProxy."""

    def __init__(self):
        self.root = tempfile.mkdtemp(prefix="pgrelay-patroni-")
        os.chmod(self.root, 0o755)
        self.etcd = None
        self.members = {}
        self.relay = None     # ha_source = none
        self.relay_ha = None  # ha_source = patroni
        self.haproxy = None

    @classmethod
    def start(cls):
        stack = cls()
        try:
            stack.etcd = Etcd(stack.root)
            for name in MEMBERS:
                stack.members[name] = Member(stack, name)
            # m1 bootstraps alone, so that pgrelay's configured primary is the real one.
            stack.members["m1"].start()
            wait_for(lambda: stack.leader() == "m1", timeout=90,
                     what="m1 to bootstrap and take the leader key")
            for name in MEMBERS[1:]:
                stack.members[name].start()
            stack.wait_healthy(timeout=120)
            nodes = [m.relay_node("primary" if m.name == "m1" else "replica")
                     for m in stack.members.values()]
            stack.relay = start_ha_relay(_NoCluster(), agent=AGENT, nodes=nodes,
                                         read_listen_port="auto", workers=2,
                                         max_client_conn=500)
            urls = ", ".join(f"http://127.0.0.1:{m.api_port}" for m in stack.members.values())
            stack.relay_ha = start_ha_relay(_NoCluster(), nodes=nodes, read_listen_port="auto",
                                            workers=2, max_client_conn=500,
                                            agent=dict(AGENT, ha_source="patroni",
                                                       ha_patroni_urls=urls))
            stack.haproxy = HAProxy(stack)
            return stack
        except BaseException:
            stack.report()
            stack.stop()
            raise

    def member(self, name):
        return self.members[name]

    def proxy_ports(self, src):
        """(write port, read port) of one of PROXIES."""
        p = {"pgrelay": self.relay, "pgrelay_ha": self.relay_ha, "haproxy": self.haproxy}[src]
        return p.port, p.read_port

    def leader(self, strict=False):
        """The member etcd names leader now, or None when the leader key is absent. etcd that
        does not answer in time (a loaded machine) gives None too, so that the conditions the
        suite waits on wait it out; ``strict``: raise OSError or ValueError instead."""
        try:
            return self.etcd.get(f"/service/{SCOPE}/leader")
        except (OSError, ValueError):
            if strict:
                raise
            return None

    def cluster_view(self):
        """Patroni's GET /cluster from the first member that answers."""
        for m in self.members.values():
            with contextlib.suppress(OSError, ValueError):
                return m.api("/cluster")
        return None

    def streaming_replicas(self, leader):
        """Names of the members streaming from ``leader`` (pg_stat_replication on it)."""
        try:
            rows = self.members[leader].query(
                "SELECT application_name FROM pg_stat_replication WHERE state = 'streaming'")
        except psycopg.Error:
            return set()
        return {r[0] for r in rows}

    def healthy(self):
        """One leader that etcd names and that is a primary, the two others streaming from it,
        Patroni not paused; returns the leader's name or None."""
        leader = self.leader()
        if leader is None:
            return None
        view = self.cluster_view() or {}
        if view.get("pause"):
            return None
        others = set(MEMBERS) - {leader}
        if self.streaming_replicas(leader) != others:
            return None
        states = {m["name"]: m for m in view.get("members", [])}
        if any(states.get(n, {}).get("state") != "running" for n in MEMBERS):
            return None
        return leader

    def run_on_leader(self, sql):
        """Run ``sql`` on the member etcd names leader, in a session that saw it out of
        recovery; its name, or None when there is no such member or it refused or dropped the
        session (Patroni may be restarting or demoting it): a caller waits on this."""
        leader = self.leader()
        if leader not in self.members:
            return None
        try:
            with self.members[leader].connect() as conn:
                if conn.execute("SELECT pg_is_in_recovery()").fetchone()[0]:
                    return None
                conn.execute(sql)
        except psycopg.Error:
            return None
        return leader

    def wait_healthy(self, timeout=90):
        return wait_for(self.healthy, timeout=timeout, interval=0.3,
                        what="one leader and two streaming replicas")

    def patronictl(self, *args, timeout=60, check=True):
        env = dict(os.environ, HOME=self.root)
        r = subprocess.run(["patronictl", "-c", self.members["m1"].config, *args],
                           stdin=subprocess.DEVNULL, capture_output=True, text=True,
                           timeout=timeout, env=env)
        if check:
            assert r.returncode == 0, f"patronictl {' '.join(args)}: {r.stdout}{r.stderr}"
        return r

    def reset(self, timeout=120):
        """Back to three members running, one leader, two streaming: resume every stopped
        process, start any Patroni that is gone, resume Patroni if paused, reinit a member that
        does not stream within a while."""
        for m in self.members.values():
            for pid in ([m.patroni_pid()] if m.patroni_pid() else []) + m.postgres_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGCONT)
            if m.patroni_pid() is None:
                m.start()
        view = self.cluster_view() or {}
        if view.get("pause"):
            self.patronictl("resume", "--wait", SCOPE)
        deadline = time.monotonic() + timeout
        try:
            return wait_for(self.healthy, timeout=30, interval=0.3,
                            what="the cluster to heal by itself")
        except AssertionError:
            leader = self.leader()
            if leader:
                for name in set(MEMBERS) - {leader} - self.streaming_replicas(leader):
                    self.patronictl("reinit", "--force", "--wait", SCOPE, name, check=False,
                                    timeout=90)
            return wait_for(self.healthy, timeout=max(10, deadline - time.monotonic()),
                            interval=0.3, what="the cluster to heal after reinit")

    def report(self):
        """The logs' tails, for a failure."""
        print("==== etcd\n" + (self.etcd.log() if self.etcd else ""))
        for m in self.members.values():
            with contextlib.suppress(OSError):
                print(f"==== patroni {m.name}\n" + m.log(3000))
        if self.relay:
            print("==== pgrelay\n" + self.relay.log_tail(80))
        if self.relay_ha:
            print("==== pgrelay (ha_source = patroni)\n" + self.relay_ha.log_tail(80))

    def stop(self):
        if self.haproxy:
            self.haproxy.stop()
        for relay in (self.relay, self.relay_ha):
            if relay:
                with contextlib.suppress(Exception):
                    destroy_relay(relay)
        for m in self.members.values():
            with contextlib.suppress(Exception):
                m.kill()
        if self.etcd:
            self.etcd.stop()
        if os.environ.get("PATRONI_KEEP"):
            print(f"[patroni] logs and data kept in {self.root} (PATRONI_KEEP)")
        else:
            shutil.rmtree(self.root, ignore_errors=True)


class _NoCluster:
    """start_ha_relay wants a cluster object; the nodes are given explicitly."""
    relay_pinned = False
