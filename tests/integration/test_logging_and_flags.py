"""What the command line and the logging keys promise: -v / -q, the long flag names, syslog,
the process tag on each line, and TCP keepalive on both sides of a session."""

import os
import re
import signal
import socket
import subprocess
import time

import pytest

from conftest import admin_json, free_port, port_listening, require, wait_for, write_config

LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d{3} \[(master|worker \d+|agent) pid \d+\] "
                  r"(error|warning|info|debug): ")


def _levels(log):
    return {m.group(2) for m in map(LINE.match, log.splitlines()) if m}


def _one_session(relay):
    with relay.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_every_line_names_its_process_and_level(relay_factory):
    relay = relay_factory(log_level="debug")
    _one_session(relay)
    wait_for(lambda: "[agent pid" in relay.log() and "[worker " in relay.log(), timeout=10,
             what="lines of the agent and a worker")
    lines = [ln for ln in relay.log().splitlines() if ln]
    bad = [ln for ln in lines if not LINE.match(ln)]
    assert not bad, bad
    tags = {LINE.match(ln).group(1).split()[0] for ln in lines}
    assert tags == {"master", "worker", "agent"}, tags


@pytest.mark.parametrize("flags", [("-v",), ("--verbose",)])
def test_verbose_adds_debug_lines(relay_factory, flags):
    relay = relay_factory(flags=flags)
    _one_session(relay)
    wait_for(lambda: "debug" in _levels(relay.log()), timeout=5, what="a debug line")
    assert admin_json(relay, "show config")  # still serving the console


@pytest.mark.parametrize("flags", [("-q",), ("--quiet",)])
def test_quiet_logs_only_errors(relay_factory, flags):
    relay = relay_factory(flags=flags)
    _one_session(relay)
    # an error still gets through: a reload of a broken file
    with open(relay.conf_path, "a") as f:
        f.write("\n[pgrelay]\nno_such_key = 1\n")
    relay.signal(signal.SIGHUP)
    wait_for(lambda: "error" in _levels(relay.log()), timeout=5, what="the error line")
    assert _levels(relay.log()) == {"error"}, relay.log()
    assert "no_such_key" in relay.log()
    _one_session(relay)


def _stat_fields(pid):
    """/proc/PID/stat after the command name: [state, ppid, pgrp, session, tty_nr, ...]."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()


def test_long_flags_daemon_pidfile_config(pg, tmp_path, daemons):
    p = free_port()
    conf, pidfile, logfile = tmp_path / "p.ini", tmp_path / "p.pid", tmp_path / "p.log"
    write_config(str(conf), p, pg, {"logfile": str(logfile),
                                    "admin_socket": str(tmp_path / "admin.sock")})
    d = daemons(conf, pidfile)
    r = d.run("--daemon", "--pidfile", str(pidfile), "--config", str(conf))
    assert r.returncode == 0, r.stderr
    pid = d.wait_pid()
    wait_for(lambda: port_listening(p), timeout=10, what="the daemon's port")
    wait_for(lambda: "ready" in logfile.read_text(), timeout=10, what="the ready line")
    # Detached: the command returned while the daemon runs on (whoever its parent now is:
    # init, or a subreaper such as a container's or pytest's own), in a session of its
    # own, without a controlling terminal.
    _, _, _, session, tty = _stat_fields(pid)[:5]
    assert int(session) != os.getsid(0), "the daemon did not leave our session"
    assert tty == "0", f"the daemon has a controlling terminal ({tty})"
    # Stopped right after its start (issue 10 item 12: a SIGTERM that reached a child before
    # it dropped the master's handler was lost, and this took shutdown_timeout + 5 s).
    d.stop()


def test_syslog_receives_tagged_lines(relay_factory, tmp_path):
    """syslog = on: lines reach /dev/log with the ident and facility configured. The test runs
    pgrelay in a mount namespace whose /dev/log is a socket the test reads."""
    require(os.geteuid() == 0 and subprocess.run(["unshare", "-m", "true"],
                                                 capture_output=True).returncode == 0,
            "needs root and mount namespaces (unshare -m)")
    sock_path = str(tmp_path / "log.sock")
    log = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    log.bind(sock_path)
    log.settimeout(0.2)
    devlog = str(tmp_path / "dev")
    os.mkdir(devlog)
    # a private /dev: the real one bound, with a tmpfs holding our log socket over it
    script = (f"mount --rbind /dev {devlog} && mount -t tmpfs tmpfs /dev && "
              f"for d in null zero urandom random; do touch /dev/$d && "
              f"mount --bind {devlog}/$d /dev/$d; done && "
              f"ln -s {sock_path} /dev/log && exec \"$0\" \"$@\"")
    relay = relay_factory(syslog="on", syslog_ident="pgrelay-test", syslog_facility="local3",
                          wrapper=("unshare", "-m", "--propagation", "private", "sh", "-c",
                                   script))
    _one_session(relay)
    got = []
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and not any("ready" in g for g in got):
        try:
            got.append(log.recv(4096).decode(errors="replace"))
        except socket.timeout:
            pass
    log.close()
    ready = [g for g in got if "ready" in g]
    assert ready, got
    # <PRI>: local3 (19) * 8 + info (6) = 158; the ident, the pid, the process tag
    assert re.match(r"<158>.*pgrelay-test\[\d+\]: \[master\] pgrelay .* ready", ready[0]), ready
    assert relay.proc.poll() is None


def _socket_timers(pids):
    """(local port, peer port, timer kind or None) of the established TCP sockets of ``pids``;
    the kind is "keepalive", or "on" while data is in flight (which hides the keepalive)."""
    out = subprocess.run(["ss", "-tnopH", "state", "established"], capture_output=True,
                         text=True, check=True).stdout
    found = []
    for line in out.splitlines():
        owners = {int(p) for p in re.findall(r"pid=(\d+)", line)}
        if not owners & set(pids):
            continue
        cols = line.split()
        local, peer = cols[2], cols[3]
        timer = re.search(r"timer:\((\w+),", line)
        found.append((int(local.rsplit(":", 1)[1]), int(peer.rsplit(":", 1)[1]),
                      timer.group(1) if timer else None))
    return found


@pytest.mark.parametrize("keepalive", ["on", "off"])
def test_tcp_keepalive_on_client_and_server_sockets(relay_factory, pg, keepalive):
    relay = relay_factory(tcp_keepalive=keepalive, agent="off")
    with relay.connect() as c:
        c.execute("SELECT 1")

        def settled():
            socks = _socket_timers(relay.worker_pids())
            session = [s for s in socks if s[0] == relay.port or s[1] == pg.port]
            return len(session) == 2 and all(s[2] != "on" for s in session) and session

        session = wait_for(settled, timeout=10, what="the session's sockets to be quiet")
        want = "keepalive" if keepalive == "on" else None
        assert [s[2] for s in session] == [want, want], session
