"""What pgrelay(8) and pgrelay.ini(5) promise about starting: exit status 1 for -d on a port in
use and 2 for wrong usage; listen_addr as an address, *, IPv6 or a host name;
client_login_timeout = 0 disabling the login limit."""

import hashlib
import os
import socket
import struct
import subprocess

import psycopg
import pytest

from conftest import (MD5_PASSWORD, MD5_USER, PGRELAY_BIN, RawClient, admin_json, error_fields,
                      free_port, listeners, pid_alive, port_listening, require, startup_packet,
                      wait_for, write_config)


def run(*args, timeout=15):
    return subprocess.run([PGRELAY_BIN, *args], stdin=subprocess.DEVNULL, capture_output=True,
                          text=True, timeout=timeout)


# --------------------------------------------------------------------------- #
# exit status
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("args", [["--no-such-flag"], ["-x"], ["-c"], ["-t", "extra-argument"]],
                         ids=["unknown-long-flag", "unknown-short-flag", "missing-value",
                              "extra-argument"])
def test_wrong_usage_exits_2_and_points_to_help(args):
    r = run(*args)
    assert r.returncode == 2, (r.returncode, r.stdout, r.stderr)
    assert "--help" in r.stderr, r.stderr
    assert r.stdout == "", r.stdout


def test_daemon_mode_on_a_port_in_use_exits_1_before_detaching(pg, tmp_path):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        port = busy.getsockname()[1]
        conf, pidfile = str(tmp_path / "p.ini"), str(tmp_path / "p.pid")
        write_config(conf, port, pg, {"logfile": str(tmp_path / "p.log"),
                                      "admin_socket": str(tmp_path / "admin.sock")})
        r = run("-d", "-p", pidfile, "-c", conf)
        assert r.returncode == 1, (r.returncode, r.stderr)
        # said where the operator sees it: -d has not detached yet, stderr is still ours
        assert "in use" in r.stderr.lower() and str(port) in r.stderr, r.stderr
        # no pidfile left behind: an init script's "status" must not find an empty one
        assert not os.path.exists(pidfile), open(pidfile).read()
        assert not os.path.exists(str(tmp_path / "admin.sock"))


# --------------------------------------------------------------------------- #
# listen_addr
# --------------------------------------------------------------------------- #


def _query(host, port):
    with psycopg.connect(host=host, port=port, user="postgres", dbname="postgres",
                         sslmode="disable", gssencmode="disable", connect_timeout=10,
                         autocommit=True) as c:
        return c.execute("SELECT 'through ' || %s", (host,)).fetchone()[0]


def _ipv6_loopback():
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


def test_listen_addr_star_listens_on_every_ipv4_and_ipv6_address(relay_factory):
    """listen_addr = * is every address, as PgBouncer's: one dual-stack socket, on which an
    IPv4 client is shown with its IPv4 address (not ::ffff:a.b.c.d)."""
    require(_ipv6_loopback(), "no IPv6 loopback address")
    r = relay_factory(listen_addr="*")
    assert _query("127.0.0.1", r.port) == "through 127.0.0.1"
    # another local IPv4 address than the one the tests use
    assert _query("127.0.0.2", r.port) == "through 127.0.0.2"
    assert _query("::1", r.port) == "through ::1"
    with psycopg.connect(host="127.0.0.2", port=r.port, user="postgres", dbname="postgres",
                         sslmode="disable", gssencmode="disable", connect_timeout=10,
                         autocommit=True) as c4, \
            psycopg.connect(host="::1", port=r.port, user="postgres", dbname="postgres",
                            sslmode="disable", gssencmode="disable", connect_timeout=10,
                            autocommit=True) as c6:
        c4.execute("SELECT 1")
        c6.execute("SELECT 1")
        clients = {c["client"] for c in admin_json(r, "show clients")}
    assert any(a.startswith("127.0.0.1:") for a in clients), clients  # the source address
    assert any(a.startswith("[::1]:") for a in clients), clients
    assert not any("ffff" in a for a in clients), clients


def test_listen_addr_ipv6(relay_factory):
    require(_ipv6_loopback(), "no IPv6 loopback address")
    r = relay_factory(listen_addr="::1")
    assert _query("::1", r.port) == "through ::1"
    with pytest.raises(psycopg.OperationalError):
        _query("127.0.0.1", r.port)  # that address only


def test_listen_addr_host_name(relay_factory):
    r = relay_factory(listen_addr="localhost")
    assert _query("localhost", r.port) == "through localhost"
    with pytest.raises(psycopg.OperationalError):
        _query("127.0.0.2", r.port)  # not every address: the name's


def test_listen_addr_that_is_no_local_address_exits_1(pg, tmp_path):
    conf = str(tmp_path / "p.ini")
    write_config(conf, free_port(), pg, {"listen_addr": "192.0.2.1",  # TEST-NET-1
                                         "admin_socket": str(tmp_path / "admin.sock")})
    r = run("-c", conf)
    assert r.returncode == 1, (r.returncode, r.stderr)
    assert "192.0.2.1" in r.stderr, r.stderr


# --------------------------------------------------------------------------- #
# client_login_timeout = 0
# --------------------------------------------------------------------------- #


def _md5_response(user, password, salt):
    inner = hashlib.md5((password + user).encode()).hexdigest()
    return "md5" + hashlib.md5(inner.encode() + salt).hexdigest()


def _stall_at_the_password_prompt(relay):
    """A client that sends its startup packet and then nothing: returns it with the salt of
    the md5 prompt it got."""
    raw = RawClient(relay.port, timeout=10)
    raw.send(startup_packet(MD5_USER, "postgres"))
    mtype, body = raw.read_message()
    assert mtype == "R" and struct.unpack("!i", body[:4])[0] == 5, (mtype, body)
    return raw, body[4:8]


def _quiet_for(raw, seconds):
    """True if nothing (no message, no close) arrives for ``seconds``."""
    raw.sock.settimeout(seconds)
    try:
        data = raw.sock.recv(1)
    except TimeoutError:
        return True
    finally:
        raw.sock.settimeout(10)
    raw.buf += data
    return False


def test_client_login_timeout_closes_a_stalled_login(relay_factory):
    """The control for the next test: with 1 s, the same stalled client gets 08P01."""
    r = relay_factory(client_login_timeout="1s")
    raw, _ = _stall_at_the_password_prompt(r)
    with raw:
        fields = error_fields(raw.read_to_eof())
    assert fields and fields["C"] == "08P01", fields


def test_client_login_timeout_0_disables_the_limit(relay_factory):
    r = relay_factory(client_login_timeout="0")
    raw, salt = _stall_at_the_password_prompt(r)
    with raw:
        # three times what closed it above, and it is still waiting for the password
        assert _quiet_for(raw, 3.0), raw.buf
        pw = _md5_response(MD5_USER, MD5_PASSWORD, salt).encode() + b"\0"
        raw.send(b"p" + struct.pack("!i", len(pw) + 4) + pw)
        msgs = raw.read_until("ZE")
        assert msgs[-1][0] == "Z", msgs
        assert raw.simple_query("SELECT 'logged in late'")[-1][0] == "Z"


def test_the_master_is_not_left_behind_by_a_failed_start(pg, tmp_path):
    """A start that fails (here: the port is taken) leaves no process listening."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", free_port()))
        busy.listen()
        port = busy.getsockname()[1]
        conf = str(tmp_path / "p.ini")
        write_config(conf, port, pg, {"admin_socket": str(tmp_path / "admin.sock")})
        p = subprocess.Popen([PGRELAY_BIN, "-c", conf], stdin=subprocess.DEVNULL,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        assert p.wait(timeout=15) == 1
        wait_for(lambda: not pid_alive(p.pid), timeout=5, what="the failed master to be gone")
    # The test's own socket is closed; a process the harness forks meanwhile holds a copy of
    # it until it closes its descriptors (a moment, longer on a loaded machine): polled.
    try:
        wait_for(lambda: not port_listening(port), timeout=5, what="nothing to listen")
    except AssertionError:
        raise AssertionError(f"port {port} still listened on by {listeners(port)}") from None
