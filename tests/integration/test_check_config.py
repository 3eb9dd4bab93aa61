"""Command line: `pgrelay -t` config validation, version/help, port already in use."""

import os
import re
import socket
import subprocess
import textwrap

import pytest

from conftest import PGRELAY_BIN, admin, admin_socket, free_port

GOOD = textwrap.dedent(
    """\
    ; a complete, valid configuration
    [pgrelay]
    listen_addr = 127.0.0.1
    listen_port = 6432
    workers = 2
    max_client_conn = 1000
    client_login_timeout = 60s
    server_connect_timeout = 250ms
    shutdown_timeout = 2m
    tcp_keepalive = on
    log_level = info

    [node.pg1]
    host = 127.0.0.1
    port = 5432
    role = primary

    [node.pg2]
    host = /var/run/postgresql
    port = 5433
    role = replica
    """
)


def run_pgrelay(*args, timeout=10):
    return subprocess.run(
        [PGRELAY_BIN, *args],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def write(tmp_path, text, name="pgrelay.ini"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def edit(text, old, new):
    assert old in text
    return text.replace(old, new, 1)


def line_of(text, needle):
    for n, line in enumerate(text.splitlines(), 1):
        if needle in line:
            return n
    raise AssertionError(needle)


def test_check_accepts_a_valid_config(tmp_path):
    path = write(tmp_path, GOOD)
    for flag in ("-t", "--check"):
        r = run_pgrelay("-c", path, flag)
        assert r.returncode == 0, r.stderr


def test_check_accepts_a_minimal_config(tmp_path):
    path = write(tmp_path, "[node.only]\nhost = 127.0.0.1\nport = 5432\nrole = primary\n")
    r = run_pgrelay("-t", "-c", path)
    assert r.returncode == 0, r.stderr


def test_check_does_not_start_the_proxy(tmp_path):
    port = free_port()
    path = write(tmp_path, edit(GOOD, "listen_port = 6432", f"listen_port = {port}"))
    r = run_pgrelay("-t", "-c", path)
    assert r.returncode == 0, r.stderr
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()


# (name, old text, new text, line marker, words that must be in the message)
BAD_LINES = [
    ("unknown_key", "workers = 2", "workers = 2\nfrobnicate = yes", "frobnicate", ["frobnicate"]),
    ("bad_duration", "shutdown_timeout = 2m", "shutdown_timeout = 10 parsecs", "shutdown_timeout",
     ["shutdown_timeout"]),
    ("negative_duration", "client_login_timeout = 60s", "client_login_timeout = -5s",
     "client_login_timeout", ["client_login_timeout"]),
    # the section header's line, or (inih reports per key) the line of its first key
    ("unknown_section", "[node.pg1]", "[poolz]\nsize = 3\n\n[node.pg1]", ("[poolz]", "size = 3"),
     ["poolz"]),
    ("unknown_node_key", "role = primary", "role = primary\nweight = 3", "weight", ["weight"]),
    ("bad_role", "role = primary", "role = master", "role = master", ["role"]),
    ("bad_port", "listen_port = 6432", "listen_port = 70000", "listen_port", ["listen_port"]),
    ("bad_number", "max_client_conn = 1000", "max_client_conn = lots", "max_client_conn",
     ["max_client_conn"]),
    ("bad_log_level", "log_level = info", "log_level = loud", "log_level", ["log_level"]),
    ("bad_boolean", "tcp_keepalive = on", "tcp_keepalive = perhaps", "tcp_keepalive",
     ["tcp_keepalive"]),
]


@pytest.mark.parametrize("case", BAD_LINES, ids=[c[0] for c in BAD_LINES])
def test_check_rejects_bad_line_naming_file_line_and_key(tmp_path, case):
    _, old, new, marker, words = case
    text = edit(GOOD, old, new)
    path = write(tmp_path, text)
    r = run_pgrelay("-t", "-c", path)
    assert r.returncode == 1, r.stderr
    markers = marker if isinstance(marker, tuple) else (marker,)
    locations = [f"{path}:{line_of(text, m)}:" for m in markers]
    assert any(loc in r.stderr for loc in locations), (locations, r.stderr)
    for w in words:
        assert w in r.stderr, r.stderr


def test_check_rejects_node_without_role(tmp_path):
    text = edit(GOOD, "port = 5432\nrole = primary\n", "port = 5432\n")
    path = write(tmp_path, text)
    r = run_pgrelay("-t", "-c", path)
    assert r.returncode == 1, r.stderr
    assert re.search(re.escape(path) + r":\d+:", r.stderr), r.stderr
    assert "role" in r.stderr and "pg1" in r.stderr, r.stderr


def test_check_rejects_config_without_nodes(tmp_path):
    text = GOOD[: GOOD.index("[node.pg1]")]
    path = write(tmp_path, text)
    r = run_pgrelay("-t", "-c", path)
    assert r.returncode == 1, r.stderr
    assert path in r.stderr and "node" in r.stderr, r.stderr


def test_check_rejects_missing_config_file(tmp_path):
    path = str(tmp_path / "nope.ini")
    r = run_pgrelay("-t", "-c", path)
    assert r.returncode == 1
    assert path in r.stderr, r.stderr


def test_proxy_refuses_to_start_with_a_bad_config(tmp_path):
    path = write(tmp_path, edit(GOOD, "workers = 2", "workers = 2\nbogus = 1"))
    r = run_pgrelay("-c", path)
    assert r.returncode == 1
    assert f"{path}:" in r.stderr and "bogus" in r.stderr, r.stderr


def test_version_and_help(tmp_path):
    r = run_pgrelay("-V")
    assert r.returncode == 0
    assert re.search(r"pgrelay\D*\d+\.\d+\.\d+", r.stdout + r.stderr), r.stdout + r.stderr
    r = run_pgrelay("-h")
    assert r.returncode == 0
    assert "-c" in r.stdout + r.stderr and "--check" in r.stdout + r.stderr


def test_second_pgrelay_on_a_port_in_use_exits_1_with_a_clear_message(tmp_path, pg):
    with socket.socket() as busy:
        busy.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        text = edit(GOOD, "listen_port = 6432", f"listen_port = {port}")
        text = edit(text, "port = 5432", f"port = {pg.port}")
        path = write(tmp_path, text)
        r = run_pgrelay("-c", path, timeout=15)
        assert r.returncode == 1, r.stderr
        assert "in use" in r.stderr.lower(), r.stderr
        assert str(port) in r.stderr, r.stderr


def test_second_pgrelay_next_to_a_running_one_exits_1(relay_factory, tmp_path):
    first = relay_factory()
    sock = admin_socket(first)
    inode = os.stat(sock).st_ino
    workers = first.worker_pids()
    # The same file: the same port, and the same admin socket path.
    path = write(tmp_path, open(first.conf_path).read())
    r = run_pgrelay("-c", path, timeout=15)
    assert r.returncode == 1, r.stderr
    assert "in use" in r.stderr.lower(), r.stderr
    # the first one is unaffected: its sessions, its workers, and its console, whose socket
    # the second one neither removed nor replaced
    with first.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
    assert first.proc.poll() is None and first.worker_pids() == workers
    assert os.stat(sock).st_ino == inode
    assert re.search(rf"^pid +{first.pid}$", admin(sock, "show info"), re.M)
