"""Operating pgrelay as installed (issue 13): files with secrets are not readable by every user,
`config apply` is refused at prepare when the proxy cannot replace its file, and a commit keeps
the file's group and permissions."""

import os
import shutil
import stat
import subprocess
import tempfile
import uuid

import pytest

from conftest import PGRELAY_BIN, start_relay, wait_for
from control_e2e_helpers import (PROD_TOKEN, ControlPlane, ctl_json, cleanup_dir,
                                 make_root)


def write(path, text, mode):
    with open(path, "w") as f:
        f.write(text)
    os.chmod(path, mode)


BASE = "[pgrelay]\nlisten_port = 6432\n\n[node.pg1]\nhost = 127.0.0.1\nrole = primary\n"


@pytest.mark.parametrize("secret", ["[agent]\nmonitor_password = hunter2hunter2\n",
                                    "[control]\nendpoint = http://127.0.0.1:1\n"
                                    "token = 0123456789abcdef0123\n",
                                    "[node.pg2]\nhost = 127.0.0.1\nrole = replica\nmonitor_password = pw\n"])
def test_check_warns_when_a_file_with_a_secret_is_readable_by_everyone(tmp_path, secret):
    path = str(tmp_path / "pgrelay.ini")
    write(path, BASE + secret, 0o644)
    p = subprocess.run([PGRELAY_BIN, "-t", "-c", path], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 0, p.stderr  # a warning, not an error: the file is valid
    assert "warning: mode 0644 lets every user read" in p.stderr, p.stderr
    assert path in p.stderr and "chmod 0640" in p.stderr, p.stderr

    os.chmod(path, 0o640)
    p = subprocess.run([PGRELAY_BIN, "-t", "-c", path], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr


def test_check_does_not_warn_about_a_readable_file_without_secrets(tmp_path):
    path = str(tmp_path / "pgrelay.ini")
    write(path, BASE, 0o644)
    p = subprocess.run([PGRELAY_BIN, "-t", "-c", path], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr


# --------------------------------------------------------------------------- #
# config apply on a proxy that runs as an unprivileged user
# --------------------------------------------------------------------------- #


@pytest.fixture(scope="module")
def control(pg):
    root = make_root()
    store_db = "ctl_op_" + uuid.uuid4().hex[:10]
    pg.query(f"CREATE DATABASE {store_db}")
    plane = ControlPlane(os.path.join(root, "control"),
                         f"host={pg.host} port={pg.port} user=postgres dbname={store_db} "
                         "connect_timeout=5")
    os.makedirs(plane.workdir)
    try:
        plane.start()
        yield plane
    finally:
        plane.stop()
        cleanup_dir(root)


def proxy_as_nobody(pg, control, node_id, conf_dir_mode, conf_mode=0o640):
    """pgrelay as user nobody, group nogroup: its pgrelay.ini in a root-owned directory of
    mode ``conf_dir_mode`` (group nogroup), the file root:nogroup ``conf_mode``; the admin
    socket and agent state in a directory nobody may write."""
    run_dir = tempfile.mkdtemp(prefix="pgrelay-op-run-")
    os.chmod(run_dir, 0o777)
    script = ('d=$(dirname "$3") && chgrp nogroup "$d" "$3" && chmod %o "$d" && chmod %o "$3" '
              '&& exec setpriv --reuid nobody --regid nogroup --clear-groups "$@"'
              % (conf_dir_mode, conf_mode))
    relay = start_relay(
        pg, extra={"admin_socket": os.path.join(run_dir, "admin.sock")},
        sections={"agent": {"health_interval": "200ms"},
                  "control": {"endpoint": control.url, "token": PROD_TOKEN,
                              "request_timeout": "2s", "metrics_interval": "250ms"}},
        wrapper=("sh", "-c", script, "sh"), env={"NODE_ID": node_id})
    relay.run_dir = run_dir
    relay.node_id = node_id
    return relay


def registered(control, node_id):
    rc, out, _ = ctl_json(control, "show-proxies")
    return rc == 0 and any(p.get("node_id") == node_id and p.get("live", True) for p in out)


def apply(control, relay, text):
    path = os.path.join(relay.run_dir, f"apply-{uuid.uuid4().hex[:8]}.ini")
    write(path, text, 0o644)
    return ctl_json(control, "config", "apply", path)


def changed_text(relay):
    with open(relay.conf_path) as f:
        text = f.read()
    return text, text.replace("log_level = info", "log_level = debug")


def test_config_apply_is_refused_at_prepare_when_the_file_cannot_be_replaced(pg, control):
    relay = proxy_as_nobody(pg, control, "op-readonly-dir", 0o755)
    try:
        wait_for(lambda: registered(control, "op-readonly-dir"), timeout=15,
                 what="the proxy to register")
        before, text = changed_text(relay)
        rc, out, err = apply(control, relay, text)
        assert rc != 0, (out, err)  # not "ok yes", exit 0
        detail = str(out) + err
        assert "pgrelay.ini.pgrelay-new" in detail and "Permission denied" in detail, detail
        with open(relay.conf_path) as f:
            assert f.read() == before
    finally:
        relay.stop()
        shutil.rmtree(relay.run_dir, ignore_errors=True)
        ctl_json(control, "delete-proxy", relay.node_id)  # a declared member: apply waits for it


def test_config_apply_keeps_the_file_group_readable_only(pg, control):
    """The installed layout (a setgid directory of the daemon's group, group-writable; the file
    0640): the commit works and the new file is 0640 of the same group."""
    relay = proxy_as_nobody(pg, control, "op-group-dir", 0o2775, 0o644)
    try:
        wait_for(lambda: registered(control, "op-group-dir"), timeout=15,
                 what="the proxy to register")
        _, text = changed_text(relay)
        rc, out, err = apply(control, relay, text)
        assert rc == 0, (out, err)
        st = os.stat(relay.conf_path)
        with open(relay.conf_path) as f:
            assert f.read() == text
        assert stat.S_IMODE(st.st_mode) == 0o640, oct(st.st_mode)
        assert st.st_gid == int(subprocess.check_output(["getent", "group", "nogroup"],
                                                        text=True).split(":")[2])
    finally:
        relay.stop()
        shutil.rmtree(relay.run_dir, ignore_errors=True)
        ctl_json(control, "delete-proxy", relay.node_id)  # a declared member: apply waits for it


# --------------------------------------------------------------------------- #
# [control] keys read at start
# --------------------------------------------------------------------------- #


def test_reload_names_the_control_keys_it_keeps_until_a_restart(pg):
    """endpoint, token and node_id are read when the agent starts: a reload that changes them
    says so (answer and log) and `show config` calls them restart-only, instead of silence."""
    from conftest import admin, admin_json

    relay = start_relay(pg, sections={"control": {"endpoint": "http://127.0.0.1:9",
                                                  "token": "first-token-0123456789"}})
    try:
        with open(relay.conf_path) as f:
            text = f.read()
        text = text.replace("http://127.0.0.1:9", "http://127.0.0.1:10").replace(
            "first-token-0123456789", "second-token-0123456789")
        text = text.replace("workers = 2", "workers = 2\nserver_connect_timeout = 7s")
        with open(relay.conf_path, "w") as f:
            f.write(text)
        answer = admin(relay, "reload")
        assert "changed but kept until a restart: endpoint, token" in answer, answer
        assert "second-token" not in answer and "second-token" not in relay.log()
        wait_for(lambda: "reload: [control] endpoint changed from http://127.0.0.1:9 to "
                         "http://127.0.0.1:10; this needs a restart" in relay.log(),
                 what="the reload's warning about endpoint")
        rows = {r["key"]: r for r in admin_json(relay, "show config")}
        assert rows["control.endpoint"]["value"] == "http://127.0.0.1:9"  # the running one
        for key in ("control.endpoint", "control.token", "control.node_id"):
            assert rows[key]["reloadable"] is False, rows[key]
        assert rows["server_connect_timeout"]["value"] == "7s"  # the rest was reloaded
    finally:
        relay.stop()


# --------------------------------------------------------------------------- #
# pgrelay-control -t and the sample's tokens
# --------------------------------------------------------------------------- #

CONTROL_SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "etc", "control.ini")


def control_check(path):
    from control_e2e_helpers import CONTROL_BIN
    return subprocess.run([CONTROL_BIN, "-t", "-c", path], capture_output=True, text=True,
                          timeout=10)


def test_control_check_refuses_the_samples_placeholder_tokens(tmp_path):
    with open(CONTROL_SAMPLE) as f:
        sample = f.read()
    p = control_check(CONTROL_SAMPLE)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "admin_tokens: token 1 is a placeholder of the sample (CHANGE-ME)" in p.stderr
    assert "[deployment.prod] token is a placeholder" in p.stderr, p.stderr
    assert "openssl rand -hex 24" in p.stderr

    path = str(tmp_path / "control.ini")
    write(path, sample.replace("CHANGE-ME-admin-token", "a" * 48).replace(
        "CHANGE-ME-prod-agent-token", "b" * 48), 0o640)
    p = control_check(path)
    assert p.returncode == 0 and "warning" not in p.stderr, p.stderr


def test_control_check_warns_about_tokens_shorter_than_16_characters(tmp_path):
    with open(CONTROL_SAMPLE) as f:
        sample = f.read()
    path = str(tmp_path / "control.ini")
    write(path, sample.replace("CHANGE-ME-admin-token", "a" * 48).replace(
        "CHANGE-ME-prod-agent-token", "short-tok-123"), 0o640)
    p = control_check(path)
    assert p.returncode == 0, p.stderr
    assert "warning: [deployment.prod] token is shorter than 16 characters" in p.stderr, p.stderr


# --------------------------------------------------------------------------- #
# ghosts: a proxy gone for good leaves no observations behind
# --------------------------------------------------------------------------- #


def observed_by(control, node_id):
    """Where node_id's observations show: node health in show-nodes, a row of show-metrics."""
    rc, nodes, err = ctl_json(control, "show-nodes")
    assert rc == 0, (nodes, err)
    rc, metrics, err = ctl_json(control, "show-metrics")
    assert rc == 0, (metrics, err)
    return ({"show-nodes" for n in nodes if node_id in (n.get("health") or {})} |
            {"show-metrics" for m in metrics if m.get("node_id") == node_id and m.get("sample")})


def test_a_gone_proxys_observations_leave_show_nodes_and_show_metrics(pg, control):
    """A restart under a new node id leaves the old one behind: past proxy_timeout (3 s here)
    its last observations are no longer shown, instead of staying for telemetry_retention."""
    relay = start_relay(pg, sections={"agent": {"health_interval": "200ms"},
                                      "control": {"endpoint": control.url, "token": PROD_TOKEN,
                                                  "metrics_interval": "250ms"}},
                        env={"NODE_ID": "op-ghost"})
    try:
        wait_for(lambda: observed_by(control, "op-ghost") == {"show-nodes", "show-metrics"},
                 timeout=15, what="op-ghost's observations in show-nodes and show-metrics")
        relay.stop()
        wait_for(lambda: not observed_by(control, "op-ghost"), timeout=10,
                 what="op-ghost's observations to go once it is past proxy_timeout")
    finally:
        relay.stop()
        ctl_json(control, "delete-proxy", "op-ghost")


def test_config_apply_refuses_a_new_control_endpoint_or_token_at_prepare(pg, control):
    """[control] endpoint and token are restart-only: a configuration that changes them is
    refused by every proxy at prepare (the token's value never in the answer), instead of
    being written and then silently not used."""
    relay = proxy_as_nobody(pg, control, "op-control-keys", 0o2775)
    try:
        wait_for(lambda: registered(control, "op-control-keys"), timeout=15,
                 what="the proxy to register")
        with open(relay.conf_path) as f:
            before = f.read()
        rc, out, err = apply(control, relay, before.replace(PROD_TOKEN, "another-token-0123456789"))
        assert rc != 0, (out, err)
        detail = str(out) + err
        assert "[control] token would change, which needs a restart" in detail, detail
        assert "another-token" not in detail and PROD_TOKEN not in detail, detail
        rc, out, err = apply(control, relay, before.replace(control.url, control.url + "/"))
        assert rc != 0 and "endpoint would change" in str(out) + err, (out, err)
        with open(relay.conf_path) as f:
            assert f.read() == before
    finally:
        relay.stop()
        shutil.rmtree(relay.run_dir, ignore_errors=True)
        ctl_json(control, "delete-proxy", relay.node_id)
