"""Operating pgrelay: reload, log reopening, daemon mode with a pidfile, and the init script
(pgrelay(8) SIGNALS, OPTIONS, FILES; pgrelay.ini(5) on what a reload changes)."""

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import psycopg
import pytest

from conftest import (
    admin,
    admin_socket,
    PGRELAY_BIN,
    error_fields,
    free_port,
    pid_alive,
    port_listening,
    wait_for,
    write_config,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #




def wait_admin_ready(path):
    """The admin socket may come a moment after the TCP port: poll until it answers."""

    def answers_show_info():
        try:
            return "version" in admin(path, "show info", timeout=2)
        except OSError:
            return False

    wait_for(answers_show_info, timeout=10, what=f"admin socket {path} to answer")


@pytest.fixture
def relay_factory(relay_factory):
    """conftest's relay_factory, returning relays whose admin socket answers."""

    def start(**extra):
        r = relay_factory(**extra)
        wait_admin_ready(admin_socket(r))
        return r

    return start


def show(path, topic):
    out = admin(path, f"show {topic} json")
    return json.loads(out.strip())


def config_values(path):
    return {row["key"]: row["value"] for row in show(path, "config")}


def rewrite_config(relay, pg, **extra):
    """Rewrite the relay's file as start_relay wrote it, with ``extra`` [pgrelay] keys."""
    write_config(relay.conf_path, relay.port, pg, extra)


def backend_pid(conn):
    return conn.execute("SELECT pg_backend_pid()").fetchone()[0]


def works(port):
    with psycopg.connect(
        host="127.0.0.1", port=port, user="postgres", dbname="postgres",
        sslmode="disable", connect_timeout=10, autocommit=True,
    ) as c:
        return c.execute("SELECT 'served'").fetchone()[0] == "served"


def read(path):
    try:
        with open(path, errors="replace") as f:
            return f.read()
    except FileNotFoundError:
        return ""


def send_short_startup_packet(port):
    """A startup packet of length 4 (< 8): the worker logs it with our address.
    Returns the client port that the log line names."""
    with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
        s.sendall(struct.pack("!i", 4))
        with contextlib.suppress(OSError):
            s.recv(4096)
        return s.getsockname()[1]


def kill_daemon(pid):
    """Last-resort cleanup of a detached pgrelay (its own session and process group)."""
    if pid and pid_alive(pid):
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pid, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def tmpdir_keep():
    d = tempfile.mkdtemp(prefix="pgrelay-ops-")
    yield d
    shutil.rmtree(d, ignore_errors=True)


# --------------------------------------------------------------------------- #
# reload
# --------------------------------------------------------------------------- #


def test_sighup_applies_a_changed_timeout_and_keeps_live_sessions(relay_factory, pg):
    r = relay_factory(server_connect_timeout="5s")
    sock = admin_socket(r)
    with r.connect() as live:
        pid_before = backend_pid(live)
        rewrite_config(r, pg, server_connect_timeout="3s")
        r.signal(signal.SIGHUP)
        wait_for(lambda: config_values(sock)["server_connect_timeout"] == "3s",
                 what="show config to report server_connect_timeout 3s")
        assert show(sock, "info")["reloads"] == 1
        assert backend_pid(live) == pid_before, "the session was reconnected by the reload"
    assert works(r.port)
    assert "SIGHUP" in r.log()


def test_reload_command_applies_a_changed_login_timeout_in_the_workers(relay_factory, pg):
    r = relay_factory(client_login_timeout="60s")
    sock = admin_socket(r)
    with r.connect() as live:
        pid_before = backend_pid(live)
        rewrite_config(r, pg, client_login_timeout="1s")
        answer = admin(sock, "reload")
        assert answer.startswith("reloaded"), answer
        assert config_values(sock)["client_login_timeout"] == "1s"
        # The workers use it: a client that never sends its startup packet is dropped.
        with r.raw(timeout=10) as idle:
            started = time.monotonic()
            msgs = idle.read_to_eof()
            waited = time.monotonic() - started
        assert waited < 5, f"login timeout of 1s took {waited:.1f}s"
        fields = error_fields(msgs)
        assert fields and fields["C"] == "08P01", msgs
        assert backend_pid(live) == pid_before


def test_reload_refuses_a_broken_file_and_keeps_the_running_configuration(relay_factory, pg):
    r = relay_factory(server_connect_timeout="5s")
    sock = admin_socket(r)
    with r.connect() as live:
        rewrite_config(r, pg, server_connect_timeout="3s", no_such_key="1")
        with open(r.conf_path) as f:
            bad_line = 1 + [i for i, line in enumerate(f) if line.startswith("no_such_key")][0]
        answer = admin(sock, "reload")
        assert answer.startswith("error: ") and answer.count("\n") == 2, answer
        log = wait_for(lambda: (lambda t: t if "no_such_key" in t else None)(r.log()),
                       what="the error in the log")
        assert re.search(rf"{re.escape(r.conf_path)}:{bad_line}:.*no_such_key", log), log
        values = config_values(sock)
        assert values["server_connect_timeout"] == "5s", "a rejected file changed the config"
        assert show(sock, "info")["reloads"] == 0
        assert live.execute("SELECT 1").fetchone()[0] == 1
    assert works(r.port)
    # The same file by SIGHUP: rejected too, pgrelay goes on.
    r.signal(signal.SIGHUP)
    wait_for(lambda: r.log().count("no_such_key") >= 2, what="the second rejection logged")
    assert r.proc.poll() is None
    assert config_values(sock)["server_connect_timeout"] == "5s"
    assert works(r.port)


def test_reload_keeps_a_restart_only_key_and_says_so(relay_factory, pg):
    r = relay_factory()
    sock = admin_socket(r)
    new_port = free_port()
    write_config(r.conf_path, new_port, pg)
    answer = admin(sock, "reload")
    assert answer.startswith("reloaded") and "restart" in answer, answer
    log = r.log()
    assert re.search(rf"listen_port changed from {r.port} to {new_port}.*restart", log), log
    assert config_values(sock)["listen_port"] == str(r.port)
    assert works(r.port)
    assert not port_listening(new_port)


# --------------------------------------------------------------------------- #
# SIGUSR1: log rotation
# --------------------------------------------------------------------------- #


def test_sigusr1_reopens_the_log_file_after_it_was_moved(relay_factory, tmpdir_keep):
    logfile = os.path.join(tmpdir_keep, "pgrelay.log")
    r = relay_factory(logfile=logfile)
    sock = admin_socket(r)
    wait_for(lambda: "ready" in read(logfile), what="start-up lines in the logfile")
    rotated = logfile + ".1"
    os.rename(logfile, rotated)
    r.signal(signal.SIGUSR1)
    wait_for(lambda: "SIGUSR1" in read(logfile), what="a new log file with the SIGUSR1 line")

    # A master line and a worker line after the reopen.
    assert admin(sock, "reload").startswith("reloaded")
    client_port = send_short_startup_packet(r.port)
    marker = f"127.0.0.1:{client_port}"
    wait_for(lambda: "reloaded" in read(logfile) and marker in read(logfile),
             what="the reload and the bad client logged in the new file")
    old = read(rotated)
    assert "reloaded" not in old and marker not in old, old[-2000:]
    assert "ready" in old  # what was there before the move stays there


# --------------------------------------------------------------------------- #
# daemon mode and the pidfile
# --------------------------------------------------------------------------- #


def _daemon_config(dirpath, pg, name, **extra):
    os.makedirs(os.path.join(dirpath, name), exist_ok=True)
    conf = os.path.join(dirpath, name, "pgrelay.ini")
    port = free_port()
    write_config(conf, port, pg, extra)
    return conf, port


def test_daemon_with_pidfile_detaches_refuses_a_second_instance_and_cleans_up(pg, tmpdir_keep):
    pidfile = os.path.join(tmpdir_keep, "p.pid")
    log = os.path.join(tmpdir_keep, "one.log")
    conf, port = _daemon_config(tmpdir_keep, pg, "one", logfile=log)
    pid = None
    try:
        started = time.monotonic()
        r = subprocess.run([PGRELAY_BIN, "-d", "-p", pidfile, "-c", conf],
                           capture_output=True, text=True, timeout=15)
        assert r.returncode == 0, r.stderr
        assert time.monotonic() - started < 5, "pgrelay -d did not return quickly"
        pid = int(wait_for(lambda: read(pidfile).strip(), what="the pidfile"))
        assert pid_alive(pid)
        wait_for(lambda: works(port), what="the daemon to serve queries")
        sock = os.path.join(tmpdir_keep, "one", "admin.sock")
        wait_admin_ready(sock)
        assert show(sock, "info")["pid"] == pid

        # A second instance with the same pidfile (own port and admin socket) refuses.
        conf2, port2 = _daemon_config(tmpdir_keep, pg, "two", logfile=os.path.join(tmpdir_keep, "two.log"))
        r2 = subprocess.run([PGRELAY_BIN, "-d", "-p", pidfile, "-c", conf2],
                            capture_output=True, text=True, timeout=15)
        assert r2.returncode == 1, (r2.returncode, r2.stderr)
        assert "already running" in r2.stderr, r2.stderr
        assert str(pid) in r2.stderr
        assert not port_listening(port2)
        assert read(pidfile).strip() == str(pid)
        assert works(port)

        # Stop: SIGTERM to the pid in the file; the pidfile goes away.
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pid_alive(pid), timeout=15, what="the daemon to exit")
        wait_for(lambda: not os.path.exists(pidfile), timeout=5, what="the pidfile removed")
        assert "stopped" in read(log)
    finally:
        kill_daemon(pid)


def test_daemon_mode_needs_a_logfile_or_syslog(pg, tmpdir_keep):
    conf, port = _daemon_config(tmpdir_keep, pg, "nolog")
    r = subprocess.run([PGRELAY_BIN, "-d", "-c", conf], capture_output=True, text=True, timeout=15)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "logfile" in r.stderr, r.stderr
    assert not port_listening(port)


# --------------------------------------------------------------------------- #
# the init script of an installed tree
# --------------------------------------------------------------------------- #


def _uid_of(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return [int(x) for x in line.split()[1:]]
    raise AssertionError("no Uid line")


@pytest.mark.deadline(110)
def test_init_script_starts_reloads_and_stops_the_daemon_as_run_as(pg, tmpdir_keep):
    root = tmpdir_keep
    os.chmod(root, 0o755)  # postgres must reach the binary, config and directories
    mk = subprocess.run(["make", "-C", REPO, "install", f"DESTDIR={root}", "PREFIX=/usr"],
                        capture_output=True, text=True, timeout=300)
    assert mk.returncode == 0, mk.stdout[-3000:] + mk.stderr[-3000:]
    script = os.path.join(root, "etc/init.d/pgrelay")
    daemon = os.path.join(root, "usr/sbin/pgrelay")
    assert os.access(script, os.X_OK) and os.access(daemon, os.X_OK)

    logdir = os.path.join(root, "var/log/pgrelay")
    rundir = os.path.join(root, "run")
    for d in (logdir, rundir):
        os.makedirs(d, exist_ok=True)
        shutil.chown(d, "postgres", "postgres")
    conf = os.path.join(root, "etc/pgrelay/pgrelay.ini")
    port = free_port()
    sock = os.path.join(rundir, "admin.sock")
    logfile = os.path.join(logdir, "pgrelay.log")
    write_config(conf, port, pg, {"logfile": logfile, "admin_socket": sock, "shutdown_timeout": "5s"})
    pidfile = os.path.join(rundir, "pgrelay.pid")
    env = dict(os.environ, DAEMON=daemon, CONFIG=conf, PIDFILE=pidfile, RUN_AS="postgres",
               PGRELAY_DEFAULTS="/nonexistent", STOP_TIMEOUT="15")

    def init(action):
        return subprocess.run([script, action], env=env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    pid = None
    try:
        r = init("start")
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(wait_for(lambda: read(pidfile).strip(), what="the pidfile"))
        assert pid_alive(pid)
        uid = _uid_of(pid)
        postgres_uid = int(subprocess.run(["id", "-u", "postgres"], capture_output=True, text=True).stdout)
        assert uid == [postgres_uid] * 4, f"daemon runs with uids {uid}, not postgres"
        wait_for(lambda: works(port), what="the daemon to serve queries")
        wait_admin_ready(sock)

        r = init("status")
        assert r.returncode == 0 and "running" in r.stdout, r.stdout + r.stderr

        r = init("reload")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: show(sock, "info")["reloads"] == 1, what="the reload to happen")

        # A broken file: reload refuses before signalling; the daemon goes on as it was.
        with open(conf, "a") as f:
            f.write("no_such_key = 1\n")
        r = init("reload")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "no_such_key" in r.stderr, r.stderr
        time.sleep(0.3)  # a wrongly sent SIGHUP would be handled by now
        info = show(sock, "info")
        assert info["pid"] == pid and info["reloads"] == 1
        assert works(port)

        r = init("stop")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not pid_alive(pid)
        assert not os.path.exists(pidfile)

        r = init("status")
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
        assert "not running" in r.stdout
    finally:
        kill_daemon(pid)
