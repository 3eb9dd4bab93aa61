"""Running the programs as an operator does: pgrelay-agent by hand (pgrelay-agent(8), RUNNING
BY HAND) and the init script's restart, force-reload, and SIGKILL after STOP_TIMEOUT
(pgrelay(8), FILES; etc/init.d/pgrelay)."""

import contextlib
import os
import re
import signal
import subprocess
import tempfile
import time

import psycopg
import pytest

from conftest import (PGRELAY_BIN, SCHED_SLACK, admin, admin_json, child_pids, free_port,
                      pid_alive, wait_admin_ready, wait_for, write_config)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
AGENT_BIN = os.path.join(os.path.dirname(PGRELAY_BIN), "pgrelay-agent")
INIT_SCRIPT = os.path.join(REPO, "etc", "init.d", "pgrelay")


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


# --------------------------------------------------------------------------- #
# pgrelay-agent by hand
# --------------------------------------------------------------------------- #


@pytest.mark.deadline(60)
def test_pgrelay_agent_by_hand_logs_decisions_only_and_rereads_its_file_on_sighup(
        relay_factory, pg, tmp_path):
    relay = relay_factory()
    before = admin_json(relay, "show info")
    # A file in which the configured primary is gone: the agent would move the leader.
    conf, log = str(tmp_path / "agent.ini"), str(tmp_path / "agent.log")
    nodes = [("x", {"host": "127.0.0.1", "port": free_port(), "role": "primary"}),
             ("a", {"host": "127.0.0.1", "port": pg.port, "role": "replica"})]
    agent = {"agent": {"monitor_user": "postgres", "health_interval": "200ms"}}
    write_config(conf, relay.port, pg, nodes=nodes, sections=agent)
    with open(log, "w") as logf:
        p = subprocess.Popen([AGENT_BIN, "-c", conf, "-v"], stdin=subprocess.DEVNULL,
                             stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "running by hand" in read(log) and
                 re.search(r"write leader: \S+ -> a ", read(log)),
                 timeout=15, what="the agent's probes and its decision in its log")
        # It decided only for its log: the running pgrelay routes as before.
        after = admin_json(relay, "show info")
        assert (after["epoch"], after["write_leader"]) == (before["epoch"],
                                                          before["write_leader"]), after
        # SIGHUP re-reads the file: a third node appears in what it probes.
        with open(conf, "a") as f:
            f.write(f"\n[node.b]\nhost = 127.0.0.1\nport = {pg.port}\nrole = replica\n")
        p.send_signal(signal.SIGHUP)
        wait_for(lambda: "configuration reloaded: 3 node(s)" in read(log), timeout=10,
                 what="the reload in the agent's log")
        wait_for(lambda: "node b" in read(log), timeout=10, what="a line about node b")
        p.send_signal(signal.SIGTERM)
        assert p.wait(timeout=10) == 0, read(log)
        assert "stopping" in read(log)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait(timeout=10)


def test_pgrelay_agent_wrong_usage_exits_2():
    r = subprocess.run([AGENT_BIN, "--no-such-flag"], capture_output=True, text=True,
                       timeout=10)
    assert r.returncode == 2 and "--help" in r.stderr, (r.returncode, r.stderr)


# --------------------------------------------------------------------------- #
# the init script
# --------------------------------------------------------------------------- #


class InitScript:
    """etc/init.d/pgrelay from the source tree, with DAEMON, CONFIG and PIDFILE in the
    environment (as /etc/default/pgrelay would set them) and RUN_AS root."""

    def __init__(self, root, pg, stop_timeout, **extra):
        self.root = root
        self.port = free_port()
        self.conf = os.path.join(root, "pgrelay.ini")
        self.pidfile = os.path.join(root, "run", "pgrelay.pid")
        self.sock = os.path.join(root, "run", "admin.sock")
        self.logfile = os.path.join(root, "log", "pgrelay.log")
        write_config(self.conf, self.port, pg, {"logfile": self.logfile,
                                                "admin_socket": self.sock, **extra})
        self.env = dict(os.environ, DAEMON=PGRELAY_BIN, CONFIG=self.conf, PIDFILE=self.pidfile,
                        RUN_AS="root", PGRELAY_DEFAULTS="/nonexistent",
                        STOP_TIMEOUT=str(stop_timeout))

    def __call__(self, action):
        return subprocess.run(["sh", INIT_SCRIPT, action], env=self.env, capture_output=True,
                              text=True, timeout=90, stdin=subprocess.DEVNULL)

    def pid(self):
        text = read(self.pidfile).strip()
        return int(text) if text.isdigit() else None

    def started(self):
        pid = wait_for(self.pid, timeout=10, what="the pidfile")
        wait_admin_ready(self.sock)
        return pid

    def info(self):
        return dict(line.split(None, 1) for line in admin(self.sock, "show info").strip()
                    .split("\n"))

    def kill_all(self):
        pid = self.pid()
        if pid and pid_alive(pid):
            for p in [pid, *child_pids(pid)]:
                try:
                    os.kill(p, signal.SIGKILL)
                except ProcessLookupError:
                    pass


@pytest.fixture
def init_script(pg):
    made = []

    def make(stop_timeout=35, **extra):
        root = tempfile.mkdtemp(prefix="pgrelay-init-")
        s = InitScript(root, pg, stop_timeout, **extra)
        made.append(s)
        return s

    yield make
    for s in made:
        s.kill_all()
        subprocess.run(["rm", "-rf", s.root])


def _serves(port):
    with psycopg.connect(host="127.0.0.1", port=port, user="postgres", dbname="postgres",
                         sslmode="disable", connect_timeout=10, autocommit=True) as c:
        return c.execute("SELECT 'served'").fetchone()[0] == "served"


@pytest.mark.deadline(90)
def test_init_script_restart_replaces_the_daemon(init_script):
    init = init_script()
    r = init("start")
    assert r.returncode == 0, r.stdout + r.stderr
    first = init.started()
    workers = child_pids(first)
    assert _serves(init.port)
    r = init("restart")
    assert r.returncode == 0, r.stdout + r.stderr
    second = init.started()
    assert second != first
    assert not pid_alive(first) and not any(pid_alive(w) for w in workers)
    assert init.info()["pid"] == str(second)
    assert _serves(init.port)
    assert init("stop").returncode == 0
    assert not pid_alive(second)


@pytest.mark.deadline(90)
def test_init_script_force_reload_reloads_in_place_and_refuses_a_broken_file(init_script):
    init = init_script()
    assert init("start").returncode == 0
    pid = init.started()
    r = init("force-reload")
    assert r.returncode == 0, r.stdout + r.stderr
    wait_for(lambda: init.info()["reloads"] == "1", what="the reload to be counted")
    assert init.info()["pid"] == str(pid)
    with open(init.conf, "a") as f:
        f.write("no_such_key = 1\n")
    r = init("force-reload")
    assert r.returncode == 1 and "no_such_key" in r.stderr, r.stdout + r.stderr
    # Refused before signalling: a round trip of the console after it, and still 1 reload.
    assert init.info()["reloads"] == "1"
    assert init.info()["reloads"] == "1"
    assert _serves(init.port)
    assert init("stop").returncode == 0


@pytest.mark.deadline(90)
def test_init_script_stop_kills_a_daemon_still_draining_after_stop_timeout(init_script):
    # shutdown_timeout would let the open transaction run for 60 s; STOP_TIMEOUT is 2 s.
    init = init_script(stop_timeout=2, shutdown_timeout="60s")
    assert init("start").returncode == 0
    pid = init.started()
    workers = child_pids(pid)
    tx = psycopg.connect(host="127.0.0.1", port=init.port, user="postgres", dbname="postgres",
                         sslmode="disable", connect_timeout=10)
    try:
        tx.execute("SELECT 1")  # a transaction is open now
        t0 = time.monotonic()
        r = init("stop")
        took = time.monotonic() - t0
        assert r.returncode == 0, r.stdout + r.stderr
        # TERM, STOP_TIMEOUT (2 s) of draining, then KILL
        assert 2 <= took < 2 + SCHED_SLACK, took
        assert not pid_alive(pid)
        assert not os.path.exists(init.pidfile)
        assert "graceful shutdown" in read(init.logfile)
        # The port and the console are free for the next start at once. (The workers, whose
        # master was killed, drain their open sessions for up to shutdown_timeout: keep
        # STOP_TIMEOUT above it, as /etc/default/pgrelay says.)
        r = init("start")
        assert r.returncode == 0, r.stdout + r.stderr
        assert init.started() != pid
        assert _serves(init.port)
    finally:
        tx.close()
        for w in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(w, signal.SIGKILL)
