"""The admin socket's life cycle and who may use it, as pgrelay.ini(5) promises (admin_socket,
admin_socket_mode, admin_socket_group, admin_users): its directory is created, a stale socket
file is replaced, a live one is an error at start, an empty value disables the console."""

import grp
import os
import pwd
import socket
import stat
import subprocess

import pytest

from conftest import admin, wait_for

PEER = "postgres"  # a system user other than root, for SO_PEERCRED checks

# One command line as another user; prints what pgrelay answered, or CONNECT-ERROR errno.
_AS_USER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
try:
    s.connect(sys.argv[1])
except OSError as e:
    print("CONNECT-ERROR", e.errno)
    sys.exit(0)
s.sendall(sys.argv[2].encode() + b"\\n")
out = b""
while True:
    d = s.recv(65536)
    if not d:
        break
    out += d
sys.stdout.write(out.decode())
"""


def as_user(user, path, line):
    r = subprocess.run(["runuser", "-u", user, "--", "/usr/bin/python3", "-c", _AS_USER, path,
                        line], capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_socket_directory_is_created_when_missing(relay_factory, tmp_path):
    # as /run/pgrelay after a boot emptied /run: the directory itself, in one that exists
    sock = str(tmp_path / "pgrelay" / "admin.sock")
    assert not os.path.exists(os.path.dirname(sock))
    r = relay_factory(admin_socket=sock)
    assert stat.S_ISSOCK(os.stat(sock).st_mode)
    assert f"pid                {r.pid}\n" in admin(sock, "show info")


def test_a_stale_socket_file_is_replaced(relay_factory, tmp_path):
    sock = str(tmp_path / "admin.sock")
    # What a pgrelay killed with -9 leaves: a socket file nobody listens on.
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    dead.bind(sock)
    dead.close()
    with pytest.raises(ConnectionRefusedError):
        admin(sock, "show info")
    r = relay_factory(admin_socket=sock)
    assert f"pid                {r.pid}\n" in admin(sock, "show info")


def test_a_socket_a_running_pgrelay_answers_on_is_an_error_at_start(relay_factory):
    first = relay_factory()
    sock = os.path.join(first.workdir, "admin.sock")
    second = relay_factory(admin_socket=sock, wait=False)  # its own port, the same socket
    assert second.wait_exit(15) == 1
    assert f"admin_socket {sock} is in use by another running pgrelay" in second.log()
    # the first one keeps its console
    assert f"pid                {first.pid}\n" in admin(sock, "show info")


def test_an_empty_admin_socket_disables_the_console(relay_factory):
    r = relay_factory(admin_socket="")
    with r.connect() as c:
        assert c.execute("SELECT 'served'").fetchone() == ("served",)
    socks = [f for f in os.listdir(r.workdir) if stat.S_ISSOCK(os.stat(os.path.join(
        r.workdir, f)).st_mode)]
    assert socks == [], socks
    assert r.proc.poll() is None


def _shared_relay(relay_factory, **extra):
    r = relay_factory(**extra)
    os.chmod(r.workdir, 0o711)  # let PEER traverse to the socket
    return r, os.path.join(r.workdir, "admin.sock")


def test_admin_socket_group_lets_its_members_reach_the_socket(relay_factory):
    gid = pwd.getpwnam(PEER).pw_gid
    group = grp.getgrgid(gid).gr_name
    r, sock = _shared_relay(relay_factory, admin_socket_mode="0660", admin_socket_group=group)
    st = os.stat(sock)
    assert st.st_gid == gid and stat.S_IMODE(st.st_mode) == 0o660, st
    # PEER reaches the socket through the group; pgrelay then checks its level itself.
    out = as_user(PEER, sock, "show info")
    assert out.startswith("error: permission denied"), out
    # Without the group, the same mode keeps PEER out of the socket file.
    other, other_sock = _shared_relay(relay_factory, admin_socket_mode="0660")
    assert os.stat(other_sock).st_gid != gid
    assert as_user(PEER, other_sock, "show info").startswith("CONNECT-ERROR 13"), other_sock


@pytest.mark.parametrize("how", ["name", "uid"])
def test_admin_users_get_the_admin_level(relay_factory, how):
    who = PEER if how == "name" else str(pwd.getpwnam(PEER).pw_uid)
    r, sock = _shared_relay(relay_factory, admin_socket_mode="0666", admin_users=who)
    out = as_user(PEER, sock, "reload")
    assert out.startswith("reloaded"), out
    wait_for(lambda: "reloads            1\n" in admin(sock, "show info"),
             what="the reload to be counted")
