"""pgrelay-control's command line and configuration: -t, flags, reload, auto registration, docs.

Every test gets its own store (a fresh database in the session's PostgreSQL 15) and its own
bin/pgrelay-control (or $PGRELAY_CONTROL_BIN, e.g. the AddressSanitizer build) started from a
generated control.ini; agents are simulated with Python HTTP clients (SimAgent) that register,
upload metrics and long-poll for commands in a thread, answering each command as the test's
policy says (control_helpers.py). What is asserted is what agents, operators and pgrelayctl
rely on:

  * ``-t`` accepts a valid file and names the file and line of each problem; --version,
    --help and bad flags; daemon mode needs a log file;
  * SIGHUP adds and removes deployments; auto_register creates a deployment per unknown token;
  * pgrelay-control(8) documents every key of the key table with its default and every flag,
    and etc/control.ini is valid and shows every key with its default.
"""

import hashlib
import os
import shutil
import signal
import subprocess

import pytest

from conftest import free_port, wait_for
from control_helpers import (  # noqa: F401,F811 (fixtures used by name)
    ADMIN,
    API,
    CONTROL_BIN,
    REPO,
    TOKENS,
    control,
    control_factory,
    store,
    write_ini,
)


# --------------------------------------------------------------------------- #
# command line and configuration
# --------------------------------------------------------------------------- #


def run_check(tmp_path, text):
    conf = tmp_path / "control.ini"
    conf.write_text(text)
    return subprocess.run([CONTROL_BIN, "-t", "-c", str(conf)], capture_output=True, text=True,
                          timeout=10)


def test_check_accepts_a_valid_file_with_durations_in_days(tmp_path):
    p = run_check(tmp_path, "[control]\nstore = dbname=x\nadmin_tokens = abcdefgh1\n"
                            "command_retention = 7d\ntelemetry_retention = 250ms\n"
                            "poll_wait_max = 2m\n[lease]\nenabled = on\n"
                            "[deployment.prod]\ntoken = prod-token-1\n")
    assert p.returncode == 1  # telemetry_retention below 1s
    assert "telemetry_retention" in p.stderr and ":5:" in p.stderr
    p = run_check(tmp_path, "[control]\nstore = dbname=x\nadmin_tokens = abcdefgh1\n"
                            "command_retention = 7d\ntelemetry_retention = 5m\n"
                            "[lease]\nenabled = on\n[deployment.prod]\ntoken = prod-token-1\n")
    assert p.returncode == 0, p.stderr
    assert "valid" in p.stdout


@pytest.mark.parametrize("text, where, words", [
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\nbogus = 1\n", ":4:", "unknown key"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\n[nope]\n", ":4:", "unknown section"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\nproxy_timeout = soon\n", ":4:",
     "not a duration"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\nlisten_port = 70000\n", ":4:",
     "out of range"),
    ("[control]\nadmin_tokens = abcdefgh1\n", "", "store"),
    ("[control]\nstore = x\n", "", "admin_tokens"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\n[deployment.a]\n", ":4:", "token"),
    ("[control]\nstore = x\nadmin_tokens = abcdefgh1\n[lease]\nlease_interval_secs = 20\n",
     ":4:", "lease_interval_secs"),
])
def test_check_names_file_and_line_of_each_problem(tmp_path, text, where, words):
    p = run_check(tmp_path, text)
    assert p.returncode == 1
    assert "control.ini" + where in p.stderr and words in p.stderr, p.stderr


def test_version_help_and_bad_flags():
    p = subprocess.run([CONTROL_BIN, "-V"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0 and p.stdout.startswith("pgrelay-control ")
    p = subprocess.run([CONTROL_BIN, "--help"], capture_output=True, text=True, timeout=10)
    assert p.returncode == 0
    for flag in ("--config", "--check", "--daemon", "--pidfile", "--verbose", "--quiet",
                 "--version", "--help"):
        assert flag in p.stdout
    p = subprocess.run([CONTROL_BIN, "--no-such-flag"], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 2


def test_daemon_mode_needs_a_logfile(tmp_path, store):
    conf = tmp_path / "control.ini"
    write_ini(conf, free_port(), store)
    p = subprocess.run([CONTROL_BIN, "-d", "-c", str(conf)], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 1 and "logfile" in p.stderr


# --------------------------------------------------------------------------- #
# reload, auto registration
# --------------------------------------------------------------------------- #


def test_sighup_adds_and_removes_deployments(control):
    deployments = {"prod": TOKENS["prod"], "qa": "qa-agent-token-3"}
    # the store needs a restart: the running one is kept, with a warning
    write_ini(control.conf, control.port, "host=elsewhere dbname=x", deployments=deployments)
    os.kill(control.pid, signal.SIGHUP)
    wait_for(lambda: control.call("POST", API + "/agent/register", {"node_id": "qa-1"},
                                  token="qa-agent-token-3")[0] == 200,
             what="the new deployment's token to work")
    assert "store changed; it takes effect only after a restart" in control.log()
    assert control.call("POST", API + "/agent/register", {"node_id": "x"},
                        token=TOKENS["stage"])[0] == 401
    assert control.agent("POST", "/register", {"node_id": "p-1"})[0] == 200
    # a broken file is refused and the running configuration kept
    with open(control.conf, "a") as f:
        f.write("[control]\nbogus = 1\n")
    os.kill(control.pid, signal.SIGHUP)
    wait_for(lambda: "configuration unchanged" in control.log(), what="the refused reload")
    assert control.call("GET", API + "/deployments", token=ADMIN)[0] == 200
    assert control.call("POST", API + "/agent/register", {"node_id": "qa-2"},
                        token="qa-agent-token-3")[0] == 200


def test_auto_register_creates_a_deployment_per_unknown_token(control_factory, store):
    c = control_factory(control={"auto_register": "on"})
    token = "brand-new-token-xyz"
    status, answer = c.call("POST", API + "/agent/register", {"node_id": "n1"}, token=token)
    assert status == 200, answer
    name = "auto-" + hashlib.sha256(token.encode()).hexdigest()[:12]
    assert answer["deployment"] == name
    assert "n1" in c.proxies(name)
    assert c.call("POST", API + "/agent/register", {"node_id": "n2"}, token=token)[0] == 200
    assert set(c.proxies(name)) == {"n1", "n2"}
    assert c.call("POST", API + "/agent/register", {"node_id": "n1"}, token="short")[0] == 401


# --------------------------------------------------------------------------- #
# the documentation follows the key table
# --------------------------------------------------------------------------- #

MAN = os.path.join(REPO, "man", "pgrelay-control.8")
SAMPLE = os.path.join(REPO, "etc", "control.ini")


def key_table():
    """(section, key, default or None) from control/cconfig.c's table, in order."""
    import re

    with open(os.path.join(REPO, "control", "cconfig.c")) as f:
        src = f.read()
    sections = {"CTL_KEY": "control", "LEASE_KEY": "lease", "DEP_KEY": "deployment"}
    rows = [(sections[m.group(1)], m.group(2), m.group(4))
            for m in re.finditer(r'\b(CTL_KEY|LEASE_KEY|DEP_KEY)\("(\w+)",\s*\w+,\s*(NULL|"([^"]*)")',
                                 src)]
    assert len(rows) >= 17, rows
    return rows


def test_man_page_documents_every_key_with_its_default_and_every_flag():
    with open(MAN) as f:
        man = f.read()
    for section, key, default in key_table():
        if default is None:
            assert f'.BR {key} " (required' in man, key
        elif default == "":
            assert f'.BR {key} " (default empty' in man, key
        else:
            assert f'.BR {key} " (default " {default}' in man, (key, default)
    help_text = subprocess.run([CONTROL_BIN, "--help"], capture_output=True, text=True,
                               timeout=10).stdout
    for flag in ("config", "check", "daemon", "pidfile", "verbose", "quiet", "version", "help"):
        assert f"\\-\\-{flag}" in man and f"--{flag}" in help_text, flag
    for word in ("SIGTERM", "SIGHUP", "SIGUSR1", "SIGQUIT", "EXIT STATUS", "protocol.md",
                 "/usr/share/doc/pgrelay/protocol.md", "LEASES"):
        assert word in man, word
    if shutil.which("groff"):
        p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", MAN], capture_output=True,
                           text=True, timeout=30)
        assert p.returncode == 0 and p.stderr == "", p.stderr


def test_sample_configuration_is_valid_and_shows_every_key_with_its_default():
    with open(SAMPLE) as f:
        sample = f.read()
    for section, key, default in key_table():
        if section == "deployment" or default is None:
            assert f"\n{key} = " in sample, key
        elif default == "":
            assert f"\n;{key} = " in sample, key
        else:
            assert f"\n{key} = {default}\n" in sample, (key, default)
    # its CHANGE-ME tokens are refused until replaced (issue 13 item 6; test_operating.py)
    p = subprocess.run([CONTROL_BIN, "-t", "-c", SAMPLE], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 1 and "placeholder" in p.stderr, p.stderr
