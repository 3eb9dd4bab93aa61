"""The admin console: every command over the real Unix socket (see pgrelay(8), ADMIN CONSOLE).

The console is driven exactly as an operator's script drives it with
``echo "show info" | socat - UNIX-CONNECT:/run/pgrelay/admin.sock``: an AF_UNIX stream
socket, one line of ';'-separated commands, then read until pgrelay closes the connection.
"""

import contextlib
import json
import os
import re
import socket
import stat
import subprocess
import time
import uuid

import psycopg
import pytest
from loadgen import InThread

from conftest import (PGRELAY_BIN, admin, admin_json, admin_socket, client_port,
                      owning_worker, pid_alive, wait_for)

# Every command the man page and the spec name (words only; arguments come after).
ALL_COMMANDS = [
    "help",
    "show info",
    "show workers",
    "show clients",
    "show nodes",
    "show stats",
    "show config",
    "pause",
    "resume",
    "kill client",
    "reload",
    "shutdown",
    "prompt",
    "quit",
]
SHOW_TOPICS = ["info", "workers", "clients", "nodes", "stats", "config"]



def volatile(key):
    """Fields that count time (uptime_s, connected_s, statement_ms, probe_age_ms, lag_ms)
    may tick between the table and the json form."""
    return key.endswith("_s") or key.endswith("_ms")


HELD = 0.7  # seconds a held statement/connection must stay unanswered


# --------------------------------------------------------------------------- #
# talking to the console
# --------------------------------------------------------------------------- #





# A client that reads the refusal even if pgrelay closed before reading our line
# (socat would stop at EPIPE on its write and print nothing).
_PEER_SCRIPT = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(10)
s.connect(sys.argv[1])
try:
    s.sendall(sys.argv[2].encode() + b"\\n")
except OSError:
    pass
out = b""
while True:
    try:
        d = s.recv(65536)
    except ConnectionResetError:
        break
    if not d:
        break
    out += d
sys.stdout.write(out.decode())
"""


def admin_as_python(user, path, line):
    """The same as admin(), run as another system user by runuser."""
    r = subprocess.run(
        ["runuser", "-u", user, "--", "/usr/bin/python3", "-c", _PEER_SCRIPT, path, line],
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert r.returncode == 0, f"client as {user} failed ({r.returncode}): {r.stderr}"
    return r.stdout


def admin_as(user, path, line):
    """Run ``echo line | socat - UNIX-CONNECT:path`` as another system user."""
    r = subprocess.run(
        ["runuser", "-u", user, "--", "socat", "-", f"UNIX-CONNECT:{path}"],
        input=line + "\n",
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert r.returncode == 0, f"socat as {user} failed ({r.returncode}): {r.stderr}"
    return r.stdout


def answers(out):
    """Split the output of a ';' line into its answers (each ends with an empty line).
    Only for answers without inner empty lines (everything but show stats)."""
    assert out.endswith("\n\n"), f"output does not end with an empty line: {out!r}"
    parts = out[:-2].split("\n\n")
    return [p + "\n" for p in parts]


def parse_table(text):
    """Rows of an aligned table as dicts; columns are cut at the header's word starts."""
    lines = [line for line in text.split("\n") if line != ""]
    assert lines, "empty table"
    if lines == ["(none)"]:
        return []
    header = lines[0]
    starts = [m.start() for m in re.finditer(r"\S+", header)]
    names = header.split()
    rows = []
    for line in lines[1:]:
        cells = []
        for i, start in enumerate(starts):
            end = starts[i + 1] if i + 1 < len(starts) else None
            cells.append(line[start:end].strip())
        rows.append(dict(zip(names, cells)))
    return rows


def parse_kv(text):
    """``key  value`` lines as a dict (the table form of an object)."""
    out = {}
    for line in text.split("\n"):
        if not line:
            continue
        m = re.match(r"(\S+)\s*(.*)$", line)
        out[m.group(1)] = m.group(2).strip()
    return out


def cell(value):
    """How the table form shows a JSON value."""
    if value is None:
        return "-"
    if value is True:
        return "yes"
    if value is False:
        return "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def show_info(relay):
    return admin_json(relay, "show info")


def clients_named(relay, app):
    return [c for c in admin_json(relay, "show clients") if c["application_name"] == app]


def new_app():
    return "adm-" + uuid.uuid4().hex[:10]


# --------------------------------------------------------------------------- #
# help and the show commands
# --------------------------------------------------------------------------- #


def test_help_lists_every_command_with_its_level(relay):
    out = admin(relay, "help")
    assert out.endswith("\n\n")
    lines = [line.strip() for line in out.strip("\n").split("\n")]
    for cmd in ALL_COMMANDS:
        assert any(line.startswith(cmd) for line in lines), f"help does not list {cmd!r}:\n{out}"
    for line in lines:
        assert re.search(r"\((user|operator|admin)\)$", line), f"help line without level: {line!r}"
    for topic in SHOW_TOPICS:
        assert re.search(rf"^show {topic} \[json\]", "\n".join(lines), re.M), out


def test_show_info_names_version_pid_epoch_leader_and_maintenance(relay):
    version = subprocess.run([PGRELAY_BIN, "-V"], capture_output=True, text=True).stdout.split()[-1]
    info = parse_kv(admin(relay, "show info"))
    assert info["version"] == version
    assert info["pid"] == str(relay.pid)
    assert int(info["epoch"]) >= 1
    assert info["write_leader"] == "pg1"
    assert info["maintenance"] == "off"
    assert info["listen_port"] == str(relay.port)
    assert info["workers"] == "2" and info["workers_running"] == "2"
    assert info["config_file"] == os.path.realpath(relay.conf_path)


def test_show_workers_has_one_row_per_worker_process(relay):
    rows = parse_table(admin(relay, "show workers"))
    assert len(rows) == 2, rows
    assert sorted(r["worker"] for r in rows) == ["0", "1"]
    pids = sorted(int(r["pid"]) for r in rows)
    assert sorted(relay.worker_pids()) == pids
    for r in rows:
        assert r["restarts"] == "0"
    # A held session is counted on the worker that holds it, and the rows add up to the
    # sessions show clients lists.
    with relay.connect(application_name=new_app()) as c:
        c.execute("SELECT 1")
        owner = owning_worker(relay, client_port(c))

        def counted():
            rows = admin_json(relay, "show workers")
            by_pid = {int(r["pid"]): int(r["sessions"]) for r in rows}
            live = len(admin_json(relay, "show clients"))
            return by_pid.get(owner, 0) >= 1 and sum(by_pid.values()) == live

        wait_for(counted, timeout=5, what=f"worker pid {owner} to count the session")


def test_show_clients_lists_a_session_with_its_user_database_and_state(relay):
    app = new_app()
    with relay.connect(application_name=app) as c:
        c.execute("SELECT 1")
        (me,) = wait_for(lambda: clients_named(relay, app), what="the session in show clients")
        assert me["user"] == "postgres"
        assert me["database"] == "postgres"
        assert me["state"] == "idle"
        assert me["node"] == "pg1"
        assert me["client"].startswith("127.0.0.1:")
        table = [r for r in parse_table(admin(relay, "show clients")) if r["application_name"] == app]
        assert len(table) == 1 and table[0]["state"] == "idle" and table[0]["id"] == str(me["id"])


def test_show_clients_shows_a_session_inside_a_transaction(relay):
    app = new_app()
    with relay.connect(autocommit=False, application_name=app) as c:
        c.execute("SELECT 1")  # psycopg opens the transaction with BEGIN
        wait_for(
            lambda: [x for x in clients_named(relay, app) if x["state"] == "in transaction"],
            what="state 'in transaction'",
        )
        rows = [r for r in parse_table(admin(relay, "show clients")) if r["application_name"] == app]
        assert rows[0]["state"] == "in transaction"
        c.rollback()
        wait_for(
            lambda: [x for x in clients_named(relay, app) if x["state"] == "idle"],
            what="state 'idle' after ROLLBACK",
        )


def test_show_clients_shows_a_running_statement_as_active_with_its_text(relay):
    app = new_app()
    with relay.connect(application_name=app) as c:
        bg = InThread(lambda: c.execute("SELECT pg_sleep(1.5) AS napping").fetchone())
        me = wait_for(
            lambda: [x for x in clients_named(relay, app) if x["state"] == "active"],
            what="state 'active'",
        )[0]
        assert "pg_sleep(1.5)" in me["statement"]
        assert isinstance(me["statement_ms"], int) and me["statement_ms"] >= 0
        rows = [r for r in parse_table(admin(relay, "show clients")) if r["application_name"] == app]
        assert rows[0]["state"] == "active"
        assert "pg_sleep(1.5)" in rows[0]["statement"]
        bg.result()


def test_show_nodes_lists_the_primary_as_write_leader(relay, pg):
    app = new_app()
    with relay.connect(application_name=app):
        rows = parse_table(admin(relay, "show nodes"))
        assert len(rows) == 1
        (node,) = rows
        assert node["name"] == "pg1"
        assert node["host"] == "127.0.0.1"
        assert node["port"] == str(pg.port)
        assert node["role"] == "primary"
        assert node["leader"] == "yes"
        # The agent probes the node at start: a running server is "up" once it has.
        wait_for(lambda: admin_json(relay, "show nodes")[0]["health"] == "up", timeout=10,
                 what="pg1 to be probed up")
        # pgrelay(8): sessions on the write and on the read-only port, per node.
        node = admin_json(relay, "show nodes")[0]
        assert node["write_sessions"] >= 1 and node["read_sessions"] == 0, node


def _stats_total(relay):
    return [w for w in admin_json(relay, "show stats")["workers"] if w["worker"] == "total"][0]


def test_show_stats_counters_grow_with_queries(relay):
    before = _stats_total(relay)
    with relay.connect(application_name=new_app()) as c:
        for i in range(5):
            c.execute("SELECT repeat('x', 1000), %s::int", (i,)).fetchall()
    after = wait_for(
        lambda: (lambda t: t if t["statements"] >= before["statements"] + 5 else None)(
            _stats_total(relay)
        ),
        what="statements to grow by 5",
    )
    assert after["sessions_total"] >= before["sessions_total"] + 1
    assert after["server_connects"] >= before["server_connects"] + 1
    assert after["bytes_in"] > before["bytes_in"]
    assert after["bytes_out"] >= before["bytes_out"] + 5 * 1000
    stats = admin_json(relay, "show stats")
    workers = [w for w in stats["workers"] if w["worker"] != "total"]
    total = [w for w in stats["workers"] if w["worker"] == "total"][0]
    assert len(workers) == 2
    for counter in ("sessions_total", "statements", "bytes_in", "bytes_out", "errors", "cancels"):
        assert total[counter] == sum(w[counter] for w in workers), counter
    assert stats["maintenance"] == "off"


def test_show_stats_mean_latency_follows_the_statements(relay_factory):
    r = relay_factory()
    assert all(w["avg_latency_ms"] is None for w in admin_json(r, "show stats")["workers"])
    with r.connect() as c:
        for _ in range(3):
            c.execute("SELECT pg_sleep(0.1)")
    total = _stats_total(r)
    # three 100 ms statements and the few quick ones psycopg runs at connect
    assert 20 <= total["avg_latency_ms"] < 1000, total
    cells = [w for w in parse_table(admin(r, "show stats").split("\n\n")[1] + "\n")
             if w["worker"] == "total"]
    assert float(cells[0]["avg_latency_ms"]) == pytest.approx(total["avg_latency_ms"], abs=0.01)


def test_show_nodes_counts_statements_and_latency_per_node(relay_factory):
    r = relay_factory()
    before = admin_json(r, "show nodes")[0]
    assert before["avg_latency_ms"] is None and before["statements"] == 0, before
    with r.connect() as c:
        for _ in range(3):
            c.execute("SELECT pg_sleep(0.1)")
    node = wait_for(lambda: (lambda n: n["statements"] >= 3 and n)(admin_json(r, "show nodes")[0]),
                    what="the node's statements")
    assert node["name"] == "pg1" and 20 <= node["avg_latency_ms"] < 1000, node


def test_show_config_lists_every_key_and_whether_reload_changes_it(relay, pg):
    table = parse_table(admin(relay, "show config"))
    rows = {r["key"]: r for r in table}
    assert set(table[0]) == {"key", "section", "value", "default", "reloadable"}
    for key, r in rows.items():
        assert r["reloadable"] in ("yes", "no"), (key, r)
    assert rows["listen_port"]["value"] == str(relay.port)
    assert rows["listen_port"]["section"] == "pgrelay"
    assert rows["listen_port"]["reloadable"] == "no"
    assert rows["workers"]["value"] == "2"
    assert rows["server_connect_timeout"]["reloadable"] == "yes"
    assert rows["max_client_conn"]["reloadable"] == "yes"
    assert rows["admin_socket"]["value"] == admin_socket(relay)
    assert rows["admin_socket_mode"]["value"] == "0600"
    assert rows["node.pg1.port"]["value"] == str(pg.port)
    assert rows["node.pg1.port"]["section"] == "node.pg1"
    assert rows["node.pg1.role"]["value"] == "primary"
    # [agent] and [control] too, each key of the table once.
    assert rows["agent.health_interval"] == {"key": "agent.health_interval", "section": "agent",
                                             "value": "1s", "default": "1s", "reloadable": "yes"}
    assert rows["agent.fall"]["value"] == "3"
    assert rows["control.endpoint"]["section"] == "control"
    assert rows["control.control_grace_period"]["value"] == "10s"
    assert len(rows) == len(table)
    sections = {r["section"] for r in table}
    assert sections == {"pgrelay", "agent", "control", "node.pg1"}, sections


def test_show_config_masks_the_token_and_the_passwords(relay_factory, pg):
    secrets = ["tok-" + uuid.uuid4().hex, "pw-" + uuid.uuid4().hex, "nodepw-" + uuid.uuid4().hex]
    r = relay_factory(
        agent="off",
        sections={"agent": {"monitor_password": secrets[1]},
                  "control": {"endpoint": "", "token": secrets[0]}},
        nodes=[("pg1", {"host": "127.0.0.1", "port": pg.port, "role": "primary",
                        "monitor_password": secrets[2]}),
               ("pg2", {"host": "127.0.0.1", "port": pg.port, "role": "replica"})],
    )
    out = admin(r, "show config; show config json")
    for secret in secrets:
        assert secret not in out
    rows = {row["key"]: row for row in admin_json(r, "show config")}
    assert rows["control.token"]["value"] == "********"
    assert rows["agent.monitor_password"]["value"] == "********"
    assert rows["node.pg1.monitor_password"]["value"] == "********"
    assert rows["node.pg2.monitor_password"]["value"] == ""  # not set: nothing to hide
    assert rows["agent.monitor_user"]["value"] == "postgres"  # not a secret


def test_show_stats_shows_maintenance_on_while_paused(relay_factory):
    r = relay_factory()
    assert admin_json(r, "show stats")["maintenance"] == "off"
    assert admin(r, "pause").startswith("maintenance on")
    try:
        assert admin_json(r, "show stats")["maintenance"] == "on"
        head = admin(r, "show stats").split("\n\n")[0]
        assert parse_kv(head)["maintenance"] == "on", head
    finally:
        assert admin(r, "resume").startswith("maintenance off")
    assert admin_json(r, "show stats")["maintenance"] == "off"


@pytest.mark.parametrize("topic", SHOW_TOPICS)
def test_show_json_parses_and_agrees_with_the_table(relay, topic):
    app = new_app()
    with relay.connect(application_name=app) as c:
        c.execute("SELECT 'a statement longer than sixty characters, to see the table cut it'")
        # Both forms in one line: the master answers them back to back.
        out = admin(relay, f"show {topic}; show {topic} json")
        assert out.endswith("\n\n")
        table_part, json_line = out.rstrip("\n").rsplit("\n", 1)
        data = json.loads(json_line)

    def expect_rows(rows):
        got = parse_table(table_part if topic != "stats" else table_part.strip("\n").split("\n\n")[1])
        assert len(got) == len(rows), (got, rows)
        for g, j in zip(got, rows):
            assert list(g) == list(j), f"columns differ: {list(g)} vs {list(j)}"
            for k, v in j.items():
                if volatile(k):
                    continue
                want = cell(v)
                if topic == "clients" and k == "statement" and len(want) > 60:
                    want = want[:57] + "..."
                assert g[k] == want, f"{topic}: {k}: table {g[k]!r} vs json {v!r}"

    if topic in ("info",):
        assert isinstance(data, dict)
        kv = parse_kv(table_part)
        assert list(kv) == list(data)
        for k, v in data.items():
            if not volatile(k):
                assert kv[k] == cell(v), f"{k}: table {kv[k]!r} vs json {v!r}"
    elif topic == "stats":
        assert isinstance(data, dict)
        scalars_text = table_part.strip("\n").split("\n\n")[0]
        kv = parse_kv(scalars_text)
        assert kv == {k: cell(v) for k, v in data.items() if not isinstance(v, list)}
        expect_rows(data["workers"])
    else:
        assert isinstance(data, list) and data, data
        expect_rows(data)


# --------------------------------------------------------------------------- #
# the line protocol
# --------------------------------------------------------------------------- #


def test_socat_one_liner_from_the_man_page_works(relay):
    r = subprocess.run(
        ["socat", "-", f"UNIX-CONNECT:{admin_socket(relay)}"],
        input="show clients; show stats\n",
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("id ") or r.stdout.startswith("(none)"), r.stdout
    assert "statements" in r.stdout and "bytes_out" in r.stdout
    assert r.stdout.endswith("\n\n")


def test_semicolon_chains_commands_each_answer_ending_with_an_empty_line(relay):
    out = admin(relay, "show info; show workers")
    info, workers = answers(out)
    assert parse_kv(info)["pid"] == str(relay.pid)
    assert len(parse_table(workers)) == 2


def test_connection_closes_after_the_line(relay):
    """admin() keeps its write side open; getting EOF means pgrelay closed."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(5)
        s.connect(admin_socket(relay))
        s.sendall(b"show info\n")
        data = _read_to_eof(s)
        assert b"version" in data
        # A second line on the same connection gets no answer: it is closed.
        try:
            s.sendall(b"show info\n")
            extra = s.recv(4096)
        except OSError:
            extra = b""
        assert extra == b"", extra


def _read_to_eof(s):
    """Everything until the peer closes (the socket's own timeout applies)."""
    data = b""
    while True:
        chunk = s.recv(4096)
        if not chunk:
            return data
        data += chunk


def _read_until(s, suffix, timeout=5.0):
    s.settimeout(timeout)
    data = b""
    while not data.endswith(suffix):
        chunk = s.recv(4096)
        assert chunk, f"connection closed while waiting for {suffix!r}; got {data!r}"
        data += chunk
    return data.decode()


def test_prompt_keeps_the_connection_open_until_quit(relay):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.connect(admin_socket(relay))
        s.sendall(b"prompt\n")
        assert _read_until(s, b"> ").endswith("\n> ")
        s.sendall(b"show info\n")
        out = _read_until(s, b"> ")
        assert out.endswith("\n\n> ")
        assert parse_kv(out[:-4])["pid"] == str(relay.pid)
        s.sendall(b"show workers; show nodes\n")
        workers, nodes = answers(_read_until(s, b"> ")[:-2])
        assert len(parse_table(workers)) == 2 and parse_table(nodes)[0]["name"] == "pg1"
        s.sendall(b"quit\n")
        s.settimeout(5)
        rest = _read_to_eof(s)
        assert b"> " not in rest, rest


# --------------------------------------------------------------------------- #
# errors
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize(
    "bad",
    ["frobnicate", "show everything", "kill client abc", "kill client", "pause 5x",
     "shutdown sideways", "show info extra", "resume now"],
)
def test_a_bad_command_gets_one_error_line_and_the_next_command_runs(relay, bad):
    out = admin(relay, f"{bad}; show nodes")
    error, nodes = answers(out)
    assert error.count("\n") == 1 and error.startswith("error: "), f"{bad!r} answered {error!r}"
    assert out.count("error:") == 1
    assert parse_table(nodes)[0]["name"] == "pg1"
    # Nothing happened: still running, not in maintenance, and the socket still serves.
    assert relay.proc.poll() is None
    assert show_info(relay)["maintenance"] == "off"
    assert parse_kv(admin(relay, "show info"))["pid"] == str(relay.pid)


def test_kill_client_with_an_unknown_id_is_an_error(relay):
    (error,) = answers(admin(relay, "kill client 987654321"))
    assert error.startswith("error: ") and error.count("\n") == 1, error


# --------------------------------------------------------------------------- #
# who may connect
# --------------------------------------------------------------------------- #


def test_admin_socket_is_mode_0600_by_default(relay):
    st = os.stat(admin_socket(relay))
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600, oct(st.st_mode)


def _open_relay(relay_factory, **extra):
    """A relay whose socket any user can reach, so that the check is pgrelay's own."""
    r = relay_factory(admin_socket_mode="0666", **extra)
    os.chmod(r.workdir, 0o711)  # let postgres traverse to the socket
    assert stat.S_IMODE(os.stat(admin_socket(r)).st_mode) == 0o666
    return r


def test_a_user_not_listed_is_refused_by_peer_credentials(relay_factory):
    r = _open_relay(relay_factory)
    out = admin_as_python("postgres", admin_socket(r), "show info")
    assert out.startswith("error: permission denied"), out
    assert out.endswith("\n\n") and out.count("\n") == 2, out
    assert "version" not in out
    assert parse_kv(admin(r, "show info"))["pid"] == str(r.pid)  # root still served


def test_a_refused_user_of_socat_is_told_why(relay_factory):
    """The documented client is socat, which writes its line before reading: the refusal
    must still reach it (pgrelay must not close before taking the line)."""
    r = _open_relay(relay_factory)
    failures = []
    for _ in range(10):  # a race: try it often enough to see it
        res = subprocess.run(
            ["runuser", "-u", "postgres", "--", "socat", "-", f"UNIX-CONNECT:{admin_socket(r)}"],
            input="show info\n",
            capture_output=True,
            text=True,
            timeout=15,
        )
        if not res.stdout.startswith("error: permission denied"):
            failures.append(f"printed {res.stdout!r}, exit {res.returncode}, stderr {res.stderr.strip()!r}")
    assert not failures, f"{len(failures)}/10 socat runs as postgres were not told why:\n" + "\n".join(failures)


def test_stats_users_may_show_but_not_pause(relay_factory):
    r = _open_relay(relay_factory, stats_users="postgres")
    sock = admin_socket(r)
    info = parse_kv(admin_as("postgres", sock, "show info"))
    assert info["pid"] == str(r.pid)
    json.loads(admin_as("postgres", sock, "show clients json").strip())
    out = admin_as("postgres", sock, "pause; show nodes")
    error, nodes = answers(out)
    assert error.startswith("error: permission denied") and "operator" in error, error
    assert parse_table(nodes)[0]["name"] == "pg1"
    assert show_info(r)["maintenance"] == "off"
    help_text = admin_as("postgres", sock, "help")
    assert "show info" in help_text and "pause" not in help_text, help_text


def test_operator_users_may_pause_but_not_reload(relay_factory):
    r = _open_relay(relay_factory, operator_users="postgres")
    sock = admin_socket(r)
    pause, = answers(admin_as("postgres", sock, "pause"))
    assert not pause.startswith("error"), pause
    assert show_info(r)["maintenance"] == "on"
    admin_as("postgres", sock, "resume")
    assert show_info(r)["maintenance"] == "off"
    (error,) = answers(admin_as("postgres", sock, "reload"))
    assert error.startswith("error: permission denied") and "admin" in error, error
    assert show_info(r)["reloads"] == 0


# --------------------------------------------------------------------------- #
# maintenance: pause and resume
# --------------------------------------------------------------------------- #


def test_pause_holds_the_next_statement_of_an_idle_session_until_resume(relay_factory):
    r = relay_factory()
    with r.connect(application_name=new_app()) as a:
        a.execute("SELECT 1")
        out = admin(r, "pause")
        assert not out.startswith("error"), out
        info = show_info(r)
        assert info["maintenance"] == "on" and info["maintenance_since"] is not None
        held = InThread(lambda: a.execute("SELECT 42").fetchone()[0])
        assert not held.finished_within(HELD), "statement ran during pause"
        assert not admin(r, "resume").startswith("error")
        assert held.result(timeout=5) == 42
        assert show_info(r)["maintenance"] == "off"
        assert a.execute("SELECT 43").fetchone()[0] == 43


def test_pause_lets_a_transaction_finish_then_holds_its_next_statement(relay_factory):
    r = relay_factory()
    with r.connect(autocommit=False, application_name=new_app()) as b:
        b.execute("CREATE TEMP TABLE t (x int)")  # BEGIN is sent before pause
        admin(r, "pause")
        try:
            inside = InThread(lambda: b.execute("INSERT INTO t VALUES (1) RETURNING x").fetchone())
            assert inside.result(timeout=3) == (1,), "statement inside a transaction was held"
            commit = InThread(b.commit)
            commit.result(timeout=3)
            after = InThread(lambda: b.execute("SELECT count(*) FROM t").fetchone()[0])
            assert not after.finished_within(HELD), "statement after COMMIT ran during pause"
        finally:
            admin(r, "resume")
        assert after.result(timeout=5) == 1
        b.rollback()


def test_pause_holds_new_connections_until_resume(relay_factory):
    r = relay_factory()
    admin(r, "pause")
    try:
        app = new_app()
        conn = InThread(lambda: r.connect(application_name=app))
        assert not conn.finished_within(HELD), "a new connection got through during pause"
    finally:
        admin(r, "resume")
    with conn.result(timeout=5) as c:
        assert c.execute("SELECT 7").fetchone()[0] == 7


def test_pause_with_a_timeout_resumes_by_itself(relay_factory):
    r = relay_factory()
    with r.connect(application_name=new_app()) as a:
        paused_at = time.monotonic()
        out = admin(r, "pause 1s")
        assert not out.startswith("error"), out
        info = show_info(r)
        assert info["maintenance"] == "on" and info["maintenance_until"] is not None
        held = InThread(lambda: a.execute("SELECT 1").fetchone()[0])
        assert held.result(timeout=5) == 1
        assert held.finished_at - paused_at >= 0.8, "statement was not held until the timeout"
        wait_for(lambda: show_info(r)["maintenance"] == "off", timeout=5, what="maintenance off")


# --------------------------------------------------------------------------- #
# kill client, shutdown
# --------------------------------------------------------------------------- #


def test_kill_client_closes_that_session_only(relay_factory):
    r = relay_factory()
    victim_app, other_app = new_app(), new_app()
    with r.connect(application_name=victim_app) as victim, r.connect(application_name=other_app) as other:
        victim.execute("SELECT 1")
        (v,) = wait_for(lambda: clients_named(r, victim_app), what="victim in show clients")
        (answer,) = answers(admin(r, f"kill client {v['id']}"))
        assert not answer.startswith("error"), answer
        wait_for(lambda: not clients_named(r, victim_app), what="victim gone from show clients")
        with pytest.raises(psycopg.OperationalError) as e:
            victim.execute("SELECT 1")
        assert "administrator command" in str(e.value), str(e.value)
        assert other.execute("SELECT 'still here'").fetchone()[0] == "still here"
        assert len(clients_named(r, other_app)) == 1


def test_shutdown_graceful_lets_a_running_transaction_commit_then_exits_0(relay_factory, pg):
    r = relay_factory(shutdown_timeout="20s")
    table = "graceful_" + uuid.uuid4().hex[:10]
    pg.query(f"CREATE TABLE {table} (x int)")
    try:
        workers = [w["pid"] for w in admin_json(r, "show workers")]
        with r.connect(autocommit=False, application_name=new_app()) as tx:
            tx.execute(f"INSERT INTO {table} VALUES (1)")  # a transaction is open
            (answer,) = answers(admin(r, "shutdown graceful"))
            assert answer == "shutting down (graceful)\n", answer
            time.sleep(0.5)
            assert r.proc.poll() is None, "pgrelay exited with a transaction still open"
            tx.execute(f"INSERT INTO {table} VALUES (2)")
            tx.commit()
            # Its next safe point came with the COMMIT: the session is closed then (the FATAL
            # 57P01 follows the ReadyForQuery, where libpq reports only the closed connection).
            with pytest.raises(psycopg.OperationalError):
                tx.execute("SELECT 1")
        assert r.wait_exit(10) == 0
        wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=5, what="workers gone")
        assert pg.query(f"SELECT count(*) FROM {table}")[0][0] == 2, "the transaction did not commit"
    finally:
        pg.query(f"DROP TABLE {table}")


def test_shutdown_fast_stops_the_master(relay_factory):
    r = relay_factory()
    workers = [w["pid"] for w in admin_json(r, "show workers")]
    assert len(workers) == 2 and all(pid_alive(p) for p in workers), workers
    (answer,) = answers(admin(r, "shutdown fast"))
    assert not answer.startswith("error"), answer
    assert r.wait_exit(10) == 0
    wait_for(lambda: not any(pid_alive(p) for p in workers), timeout=5, what="workers gone")


@pytest.mark.parametrize("payload", [
    b"show " + b"x" * 100_000 + b"\n",  # far past the longest line accepted
    b"y" * 100_000,  # no newline at all: the buffer must not grow without bound
    b"show \x00\xff\xfe info\n",  # binary garbage
    b"kill client " + b" 1" * 40 + b"\n",  # more words than any command takes
])
def test_garbage_on_the_console_gets_one_error_and_the_daemon_carries_on(relay, payload):
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(admin_socket(relay))
        try:
            s.sendall(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass  # pgrelay answered and closed before it read everything
        got = b""
        with contextlib.suppress(ConnectionResetError):
            while chunk := s.recv(65536):
                got += chunk
    text = got.decode(errors="replace")
    assert text.startswith("error: ") and text.endswith("\n\n"), text[:300]
    assert text.count("\n") == 2, text[:300]
    assert relay.proc.poll() is None
    assert admin_json(relay, "show info")["pid"] == relay.pid
    with relay.connect() as c:
        assert c.execute("SELECT 1").fetchone() == (1,)
