"""Who may see statement text on the admin console (issue 10 item 11; pgrelay(8), ADMIN CONSOLE).

Statement text can hold secrets (ALTER ROLE ... PASSWORD, literals). As pg_stat_activity does
for roles without pg_read_all_stats, the lowest console level (stats_users) sees
"<insufficient privilege>" instead of it; operator and admin level see the text.
"""

import json
import os
import stat
import subprocess

import pytest

from conftest import admin, admin_socket, wait_for

SECRET = "hunter2-not-for-stats-users"
HIDDEN = "<insufficient privilege>"


def console_as(user, path, line):
    """``echo line | socat - UNIX-CONNECT:path`` run as another system user."""
    r = subprocess.run(
        ["runuser", "-u", user, "--", "socat", "-", f"UNIX-CONNECT:{path}"],
        input=line + "\n", capture_output=True, text=True, timeout=15,
    )
    assert r.returncode == 0, f"socat as {user} failed ({r.returncode}): {r.stderr}"
    return r.stdout


@pytest.fixture
def relay(relay_factory):
    # postgres: stats level; nobody: operator level; root (this test): admin level
    r = relay_factory(admin_socket_mode="0666", stats_users="postgres", operator_users="nobody")
    os.chmod(r.workdir, 0o711)  # let the other users reach the socket
    assert stat.S_IMODE(os.stat(admin_socket(r)).st_mode) == 0o666
    return r


def statements(out):
    return [row["statement"] for row in json.loads(out.strip())]


def test_stats_level_sees_statement_text_masked_operator_and_admin_see_it(relay):
    with relay.connect() as c:
        c.execute(f"SELECT '{SECRET}'")
        path = admin_socket(relay)
        wait_for(lambda: SECRET in admin(relay, "show clients"), what="the statement to show")

        stats_json = console_as("postgres", path, "show clients json")
        assert SECRET not in stats_json, stats_json
        assert HIDDEN in statements(stats_json), stats_json
        stats_table = console_as("postgres", path, "show clients")
        assert SECRET not in stats_table and HIDDEN in stats_table, stats_table
        # the rest of the row is there, as pg_stat_activity shows a role's own columns
        row = json.loads(stats_json.strip())[0]
        assert row["user"] == "postgres" and row["state"] == "idle", row

        operator_json = console_as("nobody", path, "show clients json")
        assert any(SECRET in s for s in statements(operator_json)), operator_json
        assert SECRET in admin(relay, "show clients")
        assert any(SECRET in s for s in statements(admin(relay, "show clients json")))
