"""The admin console against hostile client input (issue 10 items 1 and 11).

Whatever a client puts in its startup packet (user, database, application_name) or its
statements — bytes cut inside a UTF-8 character, bytes that are not UTF-8 at all, terminal
escape sequences — `show clients` answers valid UTF-8 in both forms, the table form never
passes a control character to the operator's terminal, and the master survives. See
pgrelay(8), ADMIN CONSOLE.
"""

import json
import os
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

from conftest import MD5_USER, RawClient, admin, admin_socket, pid_alive, wait_for

PROTOCOL_V3 = 196608

# 80 bytes of two-byte characters: the 63-byte field of shared memory cuts one in half.
LONG_NON_ASCII = "é" * 40
# Terminal control sequences: clear screen, red text, carriage return, bell, a C1 CSI
# (U+009B) and a right-to-left override.
ESCAPES = "\x1b[2J\x1b[31mred\rover\x07\u009b1m\u202e"


def raw_startup(**params):
    """A StartupMessage whose parameter values are raw bytes (str values are UTF-8)."""
    body = struct.pack("!i", PROTOCOL_V3)
    for k, v in params.items():
        body += k.encode() + b"\0" + (v if isinstance(v, bytes) else v.encode()) + b"\0"
    body += b"\0"
    return struct.pack("!i", len(body) + 4) + body


def admin_bytes(path, line, timeout=10.0):
    """admin() without decoding, so that invalid UTF-8 in the answer fails the test itself."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(path)
        s.sendall(line.encode() + b"\n")
        chunks = []
        while True:
            data = s.recv(65536)
            if not data:
                break
            chunks.append(data)
    return b"".join(chunks)


def at_password_prompt(relay, **params):
    """A raw client left where the server asks for its password (before authentication)."""
    c = RawClient(relay.port)
    c.send(raw_startup(user=MD5_USER, **params))
    msg = c.read_message()
    assert msg is not None and msg[0] == "R", f"expected an authentication request, got {msg!r}"
    return c


def assert_terminal_safe(text):
    """No C0 control but newline, no DEL, no C1 control, no bidirectional override."""
    bad = re.findall(r"[\x00-\x09\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]", text)
    assert not bad, f"control characters reach the terminal: {bad!r} in {text!r}"


def show_clients(relay):
    """`show clients` in table form and in JSON, both checked to be valid UTF-8."""
    path = admin_socket(relay)
    table = admin_bytes(path, "show clients").decode("utf-8")  # raises on invalid UTF-8
    raw_json = admin_bytes(path, "show clients json").decode("utf-8")
    assert raw_json.endswith("\n\n"), raw_json
    return table, json.loads(raw_json[:-2])


@pytest.fixture
def relay(relay_factory):
    # One worker: slots are taken in order, so the ordinary session below comes first in
    # show clients and the hostile ones after it (the order in which the old renderer crashed).
    r = relay_factory(workers=1)
    wait_for(lambda: "version" in admin(r, "show info"), what="the admin socket")
    return r


def test_show_clients_survives_application_name_cut_inside_a_character(relay):
    ordinary = relay.connect()  # a session with every field valid, listed first
    clients = [at_password_prompt(relay, database="postgres", application_name=LONG_NON_ASCII)
               for _ in range(2)]
    try:
        wait_for(lambda: admin(relay, "show clients").count(MD5_USER) == 2,
                 what="both clients in show clients")
        table, rows = show_clients(relay)
        assert pid_alive(relay.pid), "the master died rendering show clients"
        names = [r["application_name"] for r in rows if r["user"] == MD5_USER]
        assert len(names) == 2, rows
        for name in names:
            # cut at the last whole character that fits in 63 bytes: 31 of them
            assert name == "é" * 31, name
        assert table.count("é" * 31) == 2, table
        assert table.endswith("\n\n"), table
    finally:
        for c in clients:
            c.close()
        ordinary.close()
    # the proxy still serves
    assert pid_alive(relay.pid)
    with relay.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)


def test_show_clients_renders_bytes_that_are_not_utf8_in_every_field(relay):
    c = at_password_prompt(relay, database=b"db\xff\xfe\xc3", application_name=b"app\x80\xc0\xaf!")
    try:
        wait_for(lambda: MD5_USER in admin(relay, "show clients"), what="the client to show")
        table, rows = show_clients(relay)
        me = [r for r in rows if r["user"] == MD5_USER]
        assert len(me) == 1, rows
        # what is not UTF-8 is replaced, what is stays
        assert me[0]["database"].startswith("db") and me[0]["database"] != "db", me[0]
        assert me[0]["application_name"].startswith("app"), me[0]
        assert me[0]["application_name"].endswith("!"), me[0]
        assert "app" in table
        assert pid_alive(relay.pid)
    finally:
        c.close()


def test_control_characters_never_reach_the_terminal_raw(relay):
    c = at_password_prompt(relay, database=ESCAPES, application_name=ESCAPES)
    # and a statement with escapes and invalid UTF-8 from an authenticated session
    s = RawClient(relay.port)
    s.login()
    payload = b"SELECT 1 /* \x1b]0;owned\x07 \x1b[2J \xff\xfe */" + b"\0"
    s.send(b"Q" + struct.pack("!i", len(payload) + 4) + payload)
    s.read_until("Z")
    try:
        wait_for(lambda: MD5_USER in admin(relay, "show clients"), what="the client to show")
        table, rows = show_clients(relay)
        assert_terminal_safe(table)
        # the escapes are shown, visibly, rather than dropped
        assert "\\x1b" in table, table
        # JSON carries them escaped by the encoder; the text stays valid UTF-8
        stmts = [r["statement"] for r in rows if r["statement"] and "SELECT 1 /*" in r["statement"]]
        assert len(stmts) == 1, rows
        assert "\x1b]0;owned" in stmts[0]
        raw_json = admin_bytes(admin_socket(relay), "show clients json").decode()
        assert "\x1b" not in raw_json, "JSON output carries a raw ESC"
        assert pid_alive(relay.pid)
    finally:
        c.close()
        s.close()


def test_a_console_line_with_control_characters_is_refused_without_being_echoed(relay):
    path = admin_socket(relay)
    for line in (b"show \x1b[2J clients", b"kill client \xff\xfe", b"show info \xe2\x80\xae",
                 b"show info\x00; shutdown"):
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(10)
            s.connect(path)
            s.sendall(line + b"\n")
            out = b""
            while chunk := s.recv(65536):
                out += chunk
        text = out.decode("utf-8")
        assert text.startswith("error: the line is not printable UTF-8 text"), text
        assert text.endswith("\n\n") and text.count("\n") == 2, text
        assert_terminal_safe(text)
    assert "version" in admin(relay, "show info")


def test_a_node_host_that_is_not_utf8_is_shown_not_fatal(relay_factory, pg):
    """Found by the admin fuzzer: any string the console shows, not only a client's, that is
    not UTF-8 made a JSON row lose its column and the table renderer crash the master. Here an
    operator's pgrelay.ini names a host in Latin-1 (pgrelay -t accepts it)."""
    latin1 = "sed -i 's/hXst/h\\xe9st/' \"$3\"; exec \"$@\""  # ... -c CONF: $3 is the file
    r = relay_factory(
        workers=1,
        nodes=[("pg1", {"host": "127.0.0.1", "port": pg.port, "role": "primary"}),
               ("pg2", {"host": "hXst", "port": pg.port, "role": "replica"})],
        wrapper=("sh", "-c", latin1, "sh"),
    )
    with open(r.conf_path, "rb") as f:
        assert b"h\xe9st" in f.read(), "the wrapper did not make the host Latin-1"
    wait_for(lambda: "version" in admin(r, "show info"), what="the admin socket")
    for command in ("show nodes", "show config"):
        table = admin_bytes(admin_socket(r), command).decode("utf-8")
        assert "h\ufffdst" in table, table
        rows = json.loads(admin_bytes(admin_socket(r), command + " json").decode("utf-8")[:-2])
        assert all(isinstance(v, str) for row in rows for k, v in row.items()
                   if k in ("name", "host", "key", "section", "value")), rows
        assert pid_alive(r.pid), f"the master died rendering {command}"
    assert {row["name"]: row["host"] for row in json.loads(admin(r, "show nodes json")[:-2])} \
        == {"pg1": "127.0.0.1", "pg2": "h\ufffdst"}


def vm_hwm_kib(pid):
    """Peak resident memory of a process (VmHWM), in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    raise AssertionError(f"no VmHWM for {pid}")


def test_a_peer_that_never_reads_cannot_grow_the_master(relay):
    """`prompt`, then thousands of `show config` without reading a byte: the master stops
    reading the peer's lines while 1 MiB of answers waits, instead of buffering them all."""
    n_lines = 6000
    one_answer = len(admin(relay, "show config"))
    hwm_before = vm_hwm_kib(relay.pid)
    t0 = time.monotonic()
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(30)
        s.connect(admin_socket(relay))
        s.sendall(b"prompt\n")

        def send_lines():  # blocks once the master stops reading, until we read
            for _ in range(n_lines // 500):
                s.sendall(b"show config\n" * 500)  # a buffer each: what is read leaves the queue

        sender = threading.Thread(target=send_lines, daemon=True)
        sender.start()
        # The master runs one callback at a time, so each answer on another connection is a
        # step of its loop: wait until it has read every line (it buffers the answers) or
        # stops reading them (they wait for the peer to read).
        last = None
        while True:
            assert "version" in admin(relay, "show info", timeout=30)
            unread = _socket_unread(s)
            if (unread == 0 and not sender.is_alive()) or (unread and unread == last):
                break
            last = unread
        hwm_unread = vm_hwm_kib(relay.pid)
        answers, tail = 0, b""
        while answers < n_lines + 1:  # every line is answered in the end
            chunk = s.recv(1 << 20)
            assert chunk, f"closed after {answers} answers"
            answers += (tail + chunk).count(b"\n> ")
            tail = chunk[-2:]
        sender.join(timeout=10)
    grown_mib = (hwm_unread - hwm_before) / 1024
    print(f"show config answer {one_answer} bytes; x{n_lines} unread: master peak grew "
          f"{grown_mib:.1f} MiB ({unread} bytes of lines left unread); all answered in "
          f"{time.monotonic() - t0:.1f} s")
    assert "version" in admin(relay, "show info")
    if os.environ.get("PGRELAY_SANITIZER_DIR"):
        return  # AddressSanitizer's quarantine keeps freed memory: the peak says nothing here
    assert grown_mib < 8, f"the master buffered {grown_mib:.0f} MiB for a peer that reads nothing"


def _socket_unread(s):
    """Bytes we sent that the peer has not read yet (SIOCOUTQ)."""
    import fcntl
    import termios

    buf = fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    return struct.unpack("i", buf)[0]


# Run as another user: hold `n` console connections that send nothing, then try one more with
# a command; print its answer; keep the others until stdin closes.
_HOLDER = """
import socket, sys
path, n = sys.argv[1], int(sys.argv[2])
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    held.append(s)
extra = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
extra.settimeout(10)
extra.connect(path)
try:
    extra.sendall(b"show info\\n")
except OSError:
    pass
out = b""
while True:
    try:
        d = extra.recv(65536)
    except OSError:
        break
    if not d:
        break
    out += d
sys.stdout.write(out.decode() + "\\n--held--\\n")
sys.stdout.flush()
sys.stdin.read()
"""


def test_console_connections_are_capped_but_admin_level_always_gets_in(relay_factory):
    r = relay_factory(workers=1, admin_socket_mode="0666", stats_users="postgres")
    os.chmod(r.workdir, 0o711)  # let postgres reach the socket
    wait_for(lambda: "version" in admin(r, "show info"), what="the admin socket")
    path = admin_socket(r)
    fds_before = len(os.listdir(f"/proc/{r.pid}/fd"))
    holder = subprocess.Popen(
        ["runuser", "-u", "postgres", "--", "/usr/bin/python3", "-c", _HOLDER, path, "64"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )
    try:
        answer = ""
        while "--held--" not in answer:
            line = holder.stdout.readline()
            assert line, f"holder ended: {answer!r}"
            answer += line
        # the 65th connection of a stats-level user is told, not served
        assert answer.startswith("error: too many console connections"), answer
        assert "version" not in answer, answer
        # root (admin level) still gets in, and the master holds no more than the cap
        assert "version" in admin(r, "show info")
        assert len(os.listdir(f"/proc/{r.pid}/fd")) <= fds_before + 64
    finally:
        holder.stdin.close()
        holder.wait(timeout=15)
    # once they are gone, the stats-level user is served again
    def served():
        out = subprocess.run(
            ["runuser", "-u", "postgres", "--", "socat", "-", f"UNIX-CONNECT:{path}"],
            input="show info\n", capture_output=True, text=True, timeout=15,
        ).stdout
        return "version" in out

    wait_for(served, what="the console to serve postgres again")
    assert pid_alive(r.pid)


def test_a_user_name_with_a_newline_cannot_forge_a_log_line(relay_factory):
    r = relay_factory(workers=1, log_level="debug")
    forged = "FORGED [master pid 1] error: the database is on fire"
    c = RawClient(r.port)
    c.send(raw_startup(user=f"x\n{forged}", database="\x1b[2Jpostgres"))
    c.read_until("EZ")  # the server refuses the role; what matters is what pgrelay logged
    c.close()
    wait_for(lambda: " database=" in r.log(), what="the debug line for the client")
    lines = r.log().splitlines()
    assert not [ln for ln in lines if ln.startswith("FORGED")], "a client forged a log line"
    assert not [ln for ln in lines if "\x1b" in ln], "an escape sequence reached the log"
    assert "user=x?FORGED" in r.log()  # shown, made harmless
