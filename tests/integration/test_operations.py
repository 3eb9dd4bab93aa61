"""Operating pgrelay: reload, log reopening, daemon mode with a pidfile, and the init script
(pgrelay(8) SIGNALS, OPTIONS, FILES; pgrelay.ini(5) on what a reload changes)."""

import contextlib
import fnmatch
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
    SCHED_SLACK,
    admin,
    admin_socket,
    PGRELAY_BIN,
    RawClient,
    client_port,
    error_fields,
    free_port,
    owning_worker,
    pid_alive,
    port_listening,
    wait_admin_ready,
    wait_for,
    write_config,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))


# --------------------------------------------------------------------------- #
# helpers
# --------------------------------------------------------------------------- #




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
        # the reloaded 1 s, not the 60 s the worker started with
        assert 0.9 <= waited < 1 + SCHED_SLACK, f"login timeout of 1s took {waited:.1f}s"
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


def refused_sqlstate(port):
    """Log in on a raw socket; the SQLSTATE of the ErrorResponse that ends it, or None when
    the login succeeded."""
    with RawClient(port, timeout=10) as c:
        c.send_startup()
        msgs = c.read_until("ZE")
        fields = error_fields(msgs)
        return fields["C"] if fields else None


def clients(sock):
    return show(sock, "info")["clients"]


def test_reload_lowering_max_client_conn_refuses_the_next_session_and_keeps_the_open_ones(
        relay_factory, pg):
    r = relay_factory(max_client_conn=5)
    sock = admin_socket(r)
    live = [r.connect() for _ in range(3)]
    try:
        pids = [backend_pid(c) for c in live]
        assert refused_sqlstate(r.port) is None, "a 4th session under max_client_conn = 5"
        wait_for(lambda: clients(sock) == 3, what="the 4th session gone")

        rewrite_config(r, pg, max_client_conn=2)
        answer = admin(sock, "reload")
        assert answer.startswith("reloaded") and "restart" not in answer, answer
        assert config_values(sock)["max_client_conn"] == "2"
        assert show(sock, "info")["max_client_conn"] == 2
        # The workers use it at once: the next session is over the limit.
        assert refused_sqlstate(r.port) == "53300"
        # The sessions already open stay, on the same backends.
        assert [backend_pid(c) for c in live] == pids
        wait_for(lambda: clients(sock) == 3, what="the refused session gone")

        # Under the new limit again (1 open, the next is the 2nd): served.
        for c in live[1:]:
            c.close()
        wait_for(lambda: clients(sock) == 1, what="two sessions closed")
        assert refused_sqlstate(r.port) is None
        assert backend_pid(live[0]) == pids[0]
    finally:
        for c in live:
            c.close()


def test_reload_raising_max_client_conn_above_its_start_value_needs_a_restart(relay_factory, pg):
    r = relay_factory(max_client_conn=3)
    sock = admin_socket(r)
    rewrite_config(r, pg, max_client_conn=1)
    assert admin(sock, "reload").startswith("reloaded")
    assert config_values(sock)["max_client_conn"] == "1"

    # Back up to the start value: allowed.
    rewrite_config(r, pg, max_client_conn=3)
    answer = admin(sock, "reload")
    assert answer.startswith("reloaded") and "restart" not in answer, answer
    assert config_values(sock)["max_client_conn"] == "3"

    # Above it: the session slots were made at start; the start value stays, and both the
    # answer and the log say so.
    rewrite_config(r, pg, max_client_conn=500)
    answer = admin(sock, "reload")
    assert answer.startswith("reloaded") and "restart" in answer, answer
    assert config_values(sock)["max_client_conn"] == "3"
    assert re.search(r"max_client_conn 500 is more than the 3 session slots made at start; "
                     r"raising it above 3 needs a restart, using 3", r.log()), r.log()
    with r.connect() as a, r.connect() as b, r.connect() as c:
        assert all(backend_pid(x) for x in (a, b, c))
        assert refused_sqlstate(r.port) == "53300"


def test_reload_raising_log_level_to_debug_takes_effect_in_master_and_workers(relay_factory, pg):
    r = relay_factory(log_level="info")
    sock = admin_socket(r)
    with r.connect() as live:
        pid_before = backend_pid(live)
        port_before = client_port(live)
        admin(sock, "show info")
        log = r.log()
        assert " debug: " not in log, "debug lines at log_level = info"

        rewrite_config(r, pg, log_level="debug")
        assert admin(sock, "reload").startswith("reloaded")
        assert config_values(sock)["log_level"] == "debug"
        workers = r.worker_pids()
        assert len(workers) == 2
        # Each worker takes the new level from shared memory and logs at debug from then on.
        for w in workers:
            wait_for(lambda w=w: f"pid {w}] debug: settings reloaded" in r.log(),
                     what=f"worker {w} to log at debug level")
        admin(sock, "show info")  # the master logs the console connection at debug level
        wait_for(lambda: re.search(r"\[master pid \d+\] debug: admin socket: uid \d+ connected",
                                   r.log()), what="a debug line from the master")
        with r.connect() as fresh:
            port = client_port(fresh)
            fresh.execute("SELECT 1")
        wait_for(lambda: f"client 127.0.0.1:{port}: user=postgres database=postgres" in r.log(),
                 what="the new session's debug line")
        assert f"127.0.0.1:{port_before}: user=" not in r.log()
        assert backend_pid(live) == pid_before, "the reload dropped a session"

        # And back: debug lines stop, in the master at once and in each worker once it has
        # followed the poke (a worker at info level says nothing when it does: so open
        # sessions until each worker has served one without a debug line).
        rewrite_config(r, pg, log_level="info")
        assert admin(sock, "reload").startswith("reloaded")
        wait_for(lambda: config_values(sock)["log_level"] == "info", what="log_level info")
        quiet_on = set()

        def a_quiet_session():
            mark = len(r.log())
            with r.connect() as quiet:
                port = client_port(quiet)
                owner = owning_worker(r, port)
                quiet.execute("SELECT 1")
            # its worker has logged all it will about it once it has freed its slot
            wait_for(lambda: not [c for c in show(sock, "clients")
                                  if c["client"] == f"127.0.0.1:{port}"],
                     what="the session to leave show clients")
            if " debug: " not in r.log()[mark:]:
                quiet_on.add(owner)
            return quiet_on == set(workers)

        wait_for(a_quiet_session, timeout=10, what="a session without debug lines on each worker")
        mark = len(r.log())
        admin(sock, "show info")
        with r.connect() as quiet:
            quiet.execute("SELECT 1")
        assert " debug: " not in r.log()[mark:], r.log()[mark:]


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


def test_daemon_with_pidfile_detaches_refuses_a_second_instance_and_cleans_up(pg, tmpdir_keep,
                                                                           daemons):
    log = os.path.join(tmpdir_keep, "one.log")
    conf, port = _daemon_config(tmpdir_keep, pg, "one", logfile=log)
    d = daemons(conf, os.path.join(tmpdir_keep, "p.pid"))
    r = d.run()
    assert r.returncode == 0, r.stderr
    pid = d.wait_pid()
    assert pid_alive(pid)
    wait_for(lambda: works(port), what="the daemon to serve queries")
    sock = os.path.join(tmpdir_keep, "one", "admin.sock")
    wait_admin_ready(sock)
    assert show(sock, "info")["pid"] == pid

    # A second instance with the same pidfile (own port and admin socket) refuses.
    conf2, port2 = _daemon_config(tmpdir_keep, pg, "two", logfile=os.path.join(tmpdir_keep, "two.log"))
    r2 = d.run("-d", "-p", d.pidfile, "-c", conf2)
    assert r2.returncode == 1, (r2.returncode, r2.stderr)
    assert "already running" in r2.stderr, r2.stderr
    assert str(pid) in r2.stderr
    assert not port_listening(port2)
    assert d.pid() == pid
    assert works(port)

    # Stop: SIGTERM to the pid in the file; the daemon, its children and the pidfile go away.
    d.stop()
    assert "stopped" in read(log)


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


def _sample_for(root, pg, port, read_port, dead_port, text):
    """The installed sample with only what must differ in a test changed: its ports, the node
    addresses (pg1 = the test's PostgreSQL, pg2 = a port nobody listens on) and its paths moved
    under ``root``. Each replaced line must be in the sample exactly once."""
    changes = {
        ("pgrelay", "listen_port"): str(port),
        ("pgrelay", "read_listen_port"): str(read_port),
        ("pgrelay", "logfile"): root + "/var/log/pgrelay/pgrelay.log",
        ("pgrelay", "admin_socket"): root + "/run/pgrelay/admin.sock",
        ("node.pg1", "host"): "127.0.0.1",
        ("node.pg1", "port"): str(pg.port),
        ("node.pg2", "host"): "127.0.0.1",
        ("node.pg2", "port"): str(dead_port),
    }
    seen, out, section = [], [], None
    for line in text.split("\n"):
        m = re.match(r"\[([^]]+)\]", line)
        if m:
            section = m.group(1)
        m = re.match(r"(\w+) = ", line)
        if m and (section, m.group(1)) in changes:
            seen.append((section, m.group(1)))
            line = f"{m.group(1)} = {changes[(section, m.group(1))]}"
        out.append(line)
    assert sorted(seen) == sorted(changes), f"the sample sets {seen}, expected each of {list(changes)} once"
    return "\n".join(out)


def socat(sock, line):
    """``echo line | socat - UNIX-CONNECT:sock``, as pgrelay(8) shows it."""
    r = subprocess.run(["socat", "-", f"UNIX-CONNECT:{sock}"], input=line + "\n",
                       capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, r.stderr
    return r.stdout


def _owner(path):
    st = os.stat(path)
    return st.st_uid, st.st_gid


def _postrotate(snippet):
    """The shell lines between postrotate and endscript of a logrotate snippet."""
    m = re.search(r"^\s*postrotate\s*\n(.*?)^\s*endscript", snippet, re.M | re.S)
    assert m, snippet
    return m.group(1)


def test_init_script_systemd_unit_and_logrotate_agree_on_pidfile_and_logfile():
    """logrotate signals the pid in one pidfile: the init script and the systemd unit must
    both write it, and the sample's logfile must be what logrotate rotates and what they
    create a directory for."""
    init = read(os.path.join(REPO, "etc/init.d/pgrelay"))
    unit = read(os.path.join(REPO, "etc/systemd/pgrelay.service"))
    rotate = read(os.path.join(REPO, "etc/logrotate.d/pgrelay"))
    sample = read(os.path.join(REPO, "etc/pgrelay.ini"))

    pidfile = re.search(r'PIDFILE:=([^}"]+)', init).group(1)
    assert re.search(r'-p "\$PIDFILE"', init), "the init script does not start pgrelay with -p"
    (execstart,) = re.findall(r"^ExecStart=(.*)$", unit, re.M)
    assert re.search(rf"(-p|--pidfile) {re.escape(pidfile)}( |$)", execstart), (
        f"the systemd unit's ExecStart does not write {pidfile}: {execstart}")
    assert re.search(rf"^RuntimeDirectory=({re.escape(os.path.basename(os.path.dirname(pidfile)))})$",
                     unit, re.M) and os.path.dirname(os.path.dirname(pidfile)) == "/run", unit
    post = _postrotate(rotate)
    assert pidfile in post and "USR1" in post, post

    m = re.search(r"^logfile = (\S+)$", sample, re.M)
    assert m, "the sample sets no logfile: daemon mode (the init script) would refuse to start"
    logfile = m.group(1)
    globs = re.findall(r"^(/\S+)\s*\{", rotate, re.M)
    assert any(fnmatch.fnmatch(logfile, g) for g in globs), (logfile, globs)
    logdir = os.path.dirname(logfile)
    assert os.path.dirname(logdir) == "/var/log", logdir
    assert re.search(rf"^LogsDirectory={re.escape(os.path.basename(logdir))}$", unit, re.M), (
        f"the systemd unit does not create {logdir}")


@pytest.mark.deadline(110)
def test_init_script_runs_the_installed_sample_as_run_as(pg, tmpdir_keep):
    """From an installed tree: the sample configuration as installed (ports, node addresses and
    paths moved into the temporary root) starts under the init script, which makes the run and
    log directories for RUN_AS; the console answers over socat; pause, logrotate's postrotate,
    reload (also a refused one) and stop work."""
    root = tmpdir_keep
    os.chmod(root, 0o755)  # postgres must reach the binary, config and directories
    mk = subprocess.run(["make", "-C", REPO, "install", f"DESTDIR={root}", "PREFIX=/usr"],
                        capture_output=True, text=True, timeout=300)
    assert mk.returncode == 0, mk.stdout[-3000:] + mk.stderr[-3000:]
    script = os.path.join(root, "etc/init.d/pgrelay")
    daemon = os.path.join(root, "usr/sbin/pgrelay")
    assert os.access(script, os.X_OK) and os.access(daemon, os.X_OK)

    conf = os.path.join(root, "etc/pgrelay/pgrelay.ini")
    installed = read(conf)
    assert installed == read(os.path.join(REPO, "etc/pgrelay.ini")), "make install changed the sample"
    port, read_port, dead_port = free_port(), free_port(), free_port()
    good = _sample_for(root, pg, port, read_port, dead_port, installed)
    with open(conf, "w") as f:
        f.write(good)
    logdir = os.path.join(root, "var/log/pgrelay")
    rundir = os.path.join(root, "run/pgrelay")
    logfile = os.path.join(logdir, "pgrelay.log")
    sock = os.path.join(rundir, "admin.sock")
    pidfile = os.path.join(rundir, "pgrelay.pid")
    assert not os.path.exists(logdir) and not os.path.exists(rundir)
    env = dict(os.environ, DAEMON=daemon, CONFIG=conf, PIDFILE=pidfile, RUN_AS="postgres",
               PGRELAY_DEFAULTS="/nonexistent", STOP_TIMEOUT="40")

    def init(action):
        return subprocess.run([script, action], env=env, capture_output=True, text=True,
                              timeout=60, stdin=subprocess.DEVNULL)

    pid = None
    try:
        r = init("start")
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(wait_for(lambda: read(pidfile).strip(), what="the pidfile"))
        assert pid_alive(pid)
        pw = subprocess.run(["id", "-u", "postgres"], capture_output=True, text=True)
        gr = subprocess.run(["id", "-g", "postgres"], capture_output=True, text=True)
        postgres_ids = (int(pw.stdout), int(gr.stdout))
        assert _uid_of(pid) == [postgres_ids[0]] * 4, f"daemon runs with uids {_uid_of(pid)}"
        for d in (rundir, logdir):
            assert _owner(d) == postgres_ids, f"{d} is owned by {_owner(d)}, not postgres"
        wait_for(lambda: works(port), what="the daemon to serve queries")
        wait_admin_ready(sock)

        info = dict(line.split(None, 1) for line in socat(sock, "show info").strip().split("\n"))
        assert info["pid"] == str(pid) and info["config_file"] == conf, info
        assert info["maintenance"] == "off" and info["write_leader"] == "pg1", info
        assert "listening on 127.0.0.1:%d" % port in read(logfile)

        assert socat(sock, "pause 60s").startswith("maintenance on")
        assert show(sock, "stats")["maintenance"] == "on"
        assert socat(sock, "resume").startswith("maintenance off")
        assert works(port)

        r = init("status")
        assert r.returncode == 0 and "running" in r.stdout, r.stdout + r.stderr

        # logrotate: move the file, run the snippet's postrotate (paths moved under root).
        rotate = read(os.path.join(root, "etc/logrotate.d/pgrelay"))
        os.rename(logfile, logfile + ".1")
        post = _postrotate(rotate).replace("/run/pgrelay/", rundir + "/")
        subprocess.run(["sh", "-c", post], check=True, timeout=10)
        wait_for(lambda: "SIGUSR1" in read(logfile), what="the daemon to reopen its logfile")

        r = init("reload")
        assert r.returncode == 0, r.stdout + r.stderr
        wait_for(lambda: show(sock, "info")["reloads"] == 1, what="the reload to happen")
        wait_for(lambda: "reloaded" in read(logfile), what="the reload in the new logfile")

        # A broken file: reload refuses before signalling; the daemon goes on as it was.
        with open(conf, "a") as f:
            f.write("no_such_key = 1\n")
        r = init("reload")
        assert r.returncode == 1, r.stdout + r.stderr
        assert "no_such_key" in r.stderr, r.stderr
        # A wrongly sent SIGHUP would have been pending before the script returned: the master
        # handles it within the loop iterations of these two console round trips.
        show(sock, "info")
        info = show(sock, "info")
        assert info["pid"] == pid and info["reloads"] == 1
        assert works(port)

        r = init("stop")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not pid_alive(pid)
        assert not os.path.exists(pidfile)
        assert "stopped" in read(logfile)

        r = init("status")
        assert r.returncode == 3, (r.returncode, r.stdout, r.stderr)
        assert "not running" in r.stdout

        # A stop that outlasts STOP_TIMEOUT: the master is killed, and the workers and agent
        # it leaves behind (a worker drains a transaction for shutdown_timeout) go with it.
        with open(conf, "w") as f:
            f.write(good)
        env["STOP_TIMEOUT"] = "1"
        r = init("start")
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(wait_for(lambda: read(pidfile).strip(), what="the pidfile"))
        wait_for(lambda: works(port), what="the daemon to serve queries")
        sid = subprocess.run(["ps", "-o", "sess=", "-p", str(pid)], capture_output=True,
                             text=True).stdout.strip()
        assert sid and int(sid) > 1, sid
        holder = psycopg.connect(host="127.0.0.1", port=port, user="postgres",
                                 dbname="postgres", sslmode="disable", connect_timeout=10)
        try:
            holder.execute("SELECT 1")  # psycopg opened a transaction: the worker must wait
            r = init("stop")
            assert r.returncode == 0, r.stdout + r.stderr
            ps = subprocess.run(["ps", "-o", "stat=,pid=,args=", "-s", sid],
                                capture_output=True, text=True).stdout.splitlines()
            left = [line for line in ps if not line.startswith("Z")]  # zombies are dead
            assert left == [], f"still running after stop: {left}"
            assert not os.path.exists(pidfile)
        finally:
            holder.close()  # no commit: the server side is gone
        r = init("start")  # the port is free at once
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(wait_for(lambda: read(pidfile).strip(), what="the pidfile"))
        wait_for(lambda: works(port), what="the restarted daemon to serve queries")
        env["STOP_TIMEOUT"] = "40"
        r = init("stop")
        assert r.returncode == 0, r.stdout + r.stderr
    finally:
        kill_daemon(pid)
