"""config apply answers per proxy, and pgrelayctl says when not every proxy committed
(issue 9, Deliver 1): simulated agents (test_control_api.SimAgent) against a real
pgrelay-control and its store.

  * the commit goes to exactly the proxies that prepared, not to whoever is live then;
  * the answer lists every proxy's outcome; "ok" is true only when every one committed; a
    version committed but not yet on every proxy is "committed" with those proxies "pending"
    (pgrelayctl exits 7 naming them) until each reports it, then the operation is "done";
  * a declared proxy that is not live when the version is prepared (down, or not heard since a
    control-plane restart) is pending too, not left out of the count;
  * the deployment has a desired version: the metrics and poll answers carry it, and a proxy
    fetches its text from GET /api/v1/agent/config.
"""

import json
import os
import subprocess
import time

from conftest import wait_for
from test_control_api import (  # noqa: F401 - fixtures
    ADMIN,
    API,
    TOKENS,
    Background,
    SimAgent,
    ack_all,
    agents,
    control,
    control_factory,
    never,
    store,
    store_rows,
)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CTL_BIN = os.path.abspath(os.environ.get("PGRELAYCTL_BIN", os.path.join(REPO, "bin", "pgrelayctl")))
TEXT = "[pgrelay]\nlisten_port = 6432\n\n[node.pg1]\nhost = 10.0.0.1\nrole = primary\n"


def refuse_commit(cmd):
    if cmd["type"] == "config_commit":
        return False, "cannot replace /etc/pgrelay/pgrelay.ini: No space left on device"
    return True, "ok"


def ctl(control, *args, text=None):
    env = dict(os.environ, PGRELAYCTL_ENDPOINT=f"http://127.0.0.1:{control.port}",
               PGRELAYCTL_TOKEN=ADMIN, PGRELAYCTL_DEPLOYMENT="prod")
    return subprocess.run([CTL_BIN, *args], env=env, input=text, capture_output=True,
                          text=True, timeout=60)


def operation(control):
    """The newest operation record."""
    status, ops = control.admin("GET", "/deployments/prod/operations")
    assert status == 200 and ops, ops
    return ops[0]


def test_a_commit_refused_by_one_proxy_is_committed_with_it_pending_and_pgrelayctl_exits_7(
        control, agents):
    """The version is the deployment's once the decision is recorded: the answer says
    "committed" (not "failed"), names the proxy that is not on it yet, and pgrelayctl exits 7;
    the operation record is "committed" until that proxy reports the version, then "done"."""
    a = agents(control, "proxy-a")
    b = agents(control, "proxy-b", policy=refuse_commit)
    p = ctl(control, "-o", "json", "config", "apply", "-", text=TEXT)
    assert p.returncode == 7, (p.stdout, p.stderr)
    assert "version 1 is committed" in p.stderr and "not yet on 1 of 2" in p.stderr, p.stderr
    assert "proxy-b" in p.stderr and "No space left on device" in p.stderr, p.stderr
    answer = json.loads(p.stdout)
    assert answer["ok"] is False and answer["committed"] is True and answer["version"] == 1
    assert answer["state"] == "committed" and answer["pending"] == ["proxy-b"], answer
    by_id = {row["node_id"]: row for row in answer["proxies"]}
    assert by_id["proxy-a"]["ok"] is True, by_id
    assert by_id["proxy-b"]["ok"] is False and "No space" in by_id["proxy-b"]["detail"]
    assert set(by_id) == {"proxy-a", "proxy-b"}
    for agent in (a, b):
        assert agent.types() == ["config_prepare", "config_commit"]
    # the version is the deployment's: the one whose commit failed is told to converge to it
    assert a.metrics()["config_version"] == 1
    status, current = control.admin("GET", "/deployments/prod/config")
    assert current["version"] == 1 and current["text"] == TEXT
    # the operation says so, and which proxy it waits for
    op = operation(control)
    assert op["kind"] == "config" and op["version"] == 1 and op["state"] == "committed", op
    assert "committed on 1 of 2" in op["outcome"] and "pending: proxy-b" in op["outcome"], op
    assert op["ended"] is None, op
    # proxy-b converges (the disk was freed): the record says the version is everywhere
    b.metrics(config_version=1)
    wait_for(lambda: operation(control)["state"] == "done", what="the operation to be done")
    op = operation(control)
    assert "on every proxy" in op["outcome"] and "proxy-b" in op["outcome"], op
    assert op["ended"] is not None, op


def test_a_committed_operation_is_watched_again_by_the_next_control_plane(control_factory,
                                                                            agents):
    c1 = control_factory()
    agents(c1, "proxy-a")
    b = agents(c1, "proxy-b", policy=refuse_commit)
    status, answer = c1.admin("POST", "/deployments/prod/config", {"text": TEXT})
    assert status == 200 and answer["state"] == "committed", answer
    assert c1.stop() == 0
    c2 = control_factory()
    b.control = c2
    assert operation(c2)["state"] == "committed"
    b.metrics(config_version=1)
    wait_for(lambda: operation(c2)["state"] == "done",
             what="the next control plane to record the operation done")
    assert "proxy-b on version 1" in operation(c2)["outcome"]


def test_a_pending_proxy_with_a_local_edit_is_named_in_the_operation(control, agents):
    """A proxy that could not commit and reports a hand edit of its file (config_diverged)
    waits for an operator: the operation's outcome says so."""
    agents(control, "proxy-a")
    refusing = []
    b = agents(control, "proxy-b",
               policy=lambda cmd: refuse_commit(cmd) if refusing else (True, "ok"))
    assert control.admin("POST", "/deployments/prod/config", {"text": TEXT})[1]["ok"] is True
    refusing.append(True)
    status, answer = control.admin("POST", "/deployments/prod/config",
                                   {"text": TEXT + "\n; two\n"})
    assert status == 200 and answer["state"] == "committed" and answer["version"] == 2, answer
    b.metrics(config_version=0, config_diverged=1)
    wait_for(lambda: "proxy-b has a local edit of version 1 and waits for an operator"
             in operation(control)["outcome"], what="the operation to name the local edit")
    assert operation(control)["state"] == "committed"
    b.metrics(config_version=2, config_diverged=0)
    wait_for(lambda: operation(control)["state"] == "done", what="the operation to be done")


def test_a_pending_proxy_that_is_deleted_is_no_longer_waited_for(control, agents):
    agents(control, "proxy-a")
    agents(control, "proxy-b", policy=refuse_commit)
    status, answer = control.admin("POST", "/deployments/prod/config", {"text": TEXT})
    assert status == 200 and answer["state"] == "committed", answer
    assert operation(control)["state"] == "committed"
    status, body = control.admin("DELETE", "/deployments/prod/proxies/proxy-b")
    assert status == 200, body
    wait_for(lambda: operation(control)["state"] == "done", what="the operation to be done")
    assert "proxy-b no longer declared" in operation(control)["outcome"]


def test_every_proxy_committing_is_ok_and_exit_0_in_table_form(control, agents):
    agents(control, "proxy-a")
    agents(control, "proxy-b")
    p = ctl(control, "config", "apply", "-", text=TEXT)
    assert p.returncode == 0, (p.stdout, p.stderr)
    assert "proxy-a" in p.stdout and "proxy-b" in p.stdout
    op = operation(control)
    assert op["state"] == "done" and op["targets"] == ["proxy-a", "proxy-b"], op
    assert "on every proxy" in op["outcome"], op


def test_the_commit_goes_to_the_proxies_that_prepared_not_to_one_that_came_later(
        control, agents):
    """A proxy that appears between prepare and commit gets no commit of a text it never
    checked: it converges to the desired version instead, and is pending until it does."""
    held = []

    def slow_prepare(cmd):
        if cmd["type"] == "config_prepare":
            held.append(cmd)
            return True, "valid", 1.5
        return True, "ok"

    a = agents(control, "proxy-a", policy=slow_prepare)
    apply = Background(control.port, "POST", API + "/deployments/prod/config",
                       {"text": TEXT, "timeout_s": 10}, token=ADMIN)
    wait_for(lambda: held, what="the prepare to reach proxy-a")
    late = agents(control, "proxy-late")
    status, answer = apply.result()
    assert status == 200 and answer["ok"] is False and answer["state"] == "committed", answer
    assert answer["pending"] == ["proxy-late"], answer
    by_id = {row["node_id"]: row for row in answer["proxies"]}
    assert by_id["proxy-a"]["ok"] is True and by_id["proxy-late"]["ok"] is False, by_id
    assert a.types() == ["config_prepare", "config_commit"]
    time.sleep(0.5)
    assert late.types() == [], "a proxy that did not prepare got a command of the apply"
    # it learns the desired version and can fetch the text
    assert late.metrics()["config_version"] == 1
    status, body = late.poll(wait_s=0)
    assert status == 200 and body["config_version"] == 1
    status, desired = control.agent("GET", "/config?node_id=proxy-late")
    assert status == 200 and desired == {"version": 1, "text": TEXT}
    late.metrics(config_version=1)
    wait_for(lambda: operation(control)["state"] == "done", what="the operation to be done")


def test_a_silent_proxy_at_commit_is_not_ok_and_converges_later(control, agents):
    def silent_commit(cmd):
        return None if cmd["type"] == "config_commit" else (True, "ok")

    agents(control, "proxy-a")
    b = agents(control, "proxy-b", policy=silent_commit)
    status, answer = control.admin("POST", "/deployments/prod/config",
                                   {"text": TEXT, "timeout_s": 1}, timeout=30)
    assert status == 200 and answer["ok"] is False and answer["committed"] is True, answer
    assert answer["state"] == "committed" and answer["pending"] == ["proxy-b"], answer
    [row] = [r for r in answer["proxies"] if r["node_id"] == "proxy-b"]
    assert row["ok"] is False and "converges to version 1" in row["detail"], row
    # its commit stays queued: acknowledged later, the proxy is on the version and the
    # operation is done
    [commit] = b.commands("config_commit")
    assert b.ack(commit["id"], True, "version 1 applied")[0] == 204
    wait_for(lambda: control.proxies()["proxy-b"]["config_version"] == 1,
             what="proxy-b on version 1")
    wait_for(lambda: operation(control)["state"] == "done", what="the operation to be done")


def test_identical_text_makes_no_new_version_and_the_desired_version_is_not_for_the_undeclared(
        control, agents):
    agents(control, "proxy-a")
    status, first = control.admin("POST", "/deployments/prod/config", {"text": TEXT})
    assert status == 200 and first["version"] == 1
    status, again = control.admin("POST", "/deployments/prod/config", {"text": TEXT})
    assert status == 200 and again["version"] == 1 and again["unchanged"] is True, again
    assert store_rows(control.store, "SELECT version FROM pgrelay.config_versions") == [(1,)]
    assert control.agent("GET", "/config?node_id=nobody-declared")[0] == 403
    assert control.agent("GET", "/config")[0] == 400


# --------------------------------------------------------------------------- #
# pgrelayctl config apply --timeout
# --------------------------------------------------------------------------- #


def test_config_apply_timeout_is_sent_and_bounds_the_wait_for_the_prepares(control, agents):
    """--timeout S after the command is the operation's timeout_s: a proxy silent at prepare
    rolls the apply back after S seconds, not after the default 30."""
    agents(control, "proxy-a")
    agents(control, "proxy-b", policy=lambda cmd: None)
    started = time.monotonic()
    p = ctl(control, "config", "apply", "--timeout", "2", "-", text=TEXT)
    took = time.monotonic() - started
    assert p.returncode == 5, (p.stdout, p.stderr)
    assert "not every proxy prepared within 2s" in p.stderr, p.stderr
    assert took < 10, f"config apply --timeout 2 took {took:.1f}s"
    status, [op] = control.admin("GET", "/deployments/prod/operations")
    assert op["state"] == "rolled_back" and op["timeout_s"] == 2, op


def test_config_apply_timeout_out_of_range_or_not_a_number_is_a_usage_error(control, agents):
    a = agents(control, "proxy-a")
    for bad in ("0", "-1", "3601", "2.5", "soon", ""):
        p = ctl(control, "config", "apply", "--timeout", bad, "-", text=TEXT)
        assert p.returncode == 2, (bad, p.stdout, p.stderr)
        assert f'--timeout: "{bad}" is not a whole number of seconds from 1 to 3600' \
            in p.stderr, p.stderr
    assert a.types() == [], "a refused --timeout sent something"
    status, body = control.admin("POST", "/deployments/prod/config",
                                 {"text": TEXT, "timeout_s": 0})
    assert status == 400 and "timeout_s" in body["error"], body


def test_config_apply_help_lists_its_timeout():
    p = subprocess.run([CTL_BIN, "config", "apply", "--help"], capture_output=True, text=True,
                       timeout=10)
    assert p.returncode == 0 and "--timeout S" in p.stdout, p.stdout
    assert "config apply FILE [--timeout S]" in subprocess.run(
        [CTL_BIN, "--help"], capture_output=True, text=True, timeout=10).stdout


def test_a_declared_proxy_that_is_not_live_is_pending_not_left_out(control, agents):
    """Right after a control-plane restart no proxy may be live yet: the version is still
    every declared proxy's, so the answer counts them, names them pending (exit 7), and the
    operation is done once each reports the version."""
    agents(control, "proxy-a")
    status, body = control.admin("POST", "/deployments/prod/proxies", {"node_id": "proxy-b"})
    assert status == 201, body  # declared, never heard: not live
    p = ctl(control, "-o", "json", "config", "apply", "-", text=TEXT)
    assert p.returncode == 7, (p.stdout, p.stderr)
    answer = json.loads(p.stdout)
    assert answer["state"] == "committed" and answer["pending"] == ["proxy-b"], answer
    assert "committed on 1 of 2" in answer["outcome"], answer
    by_id = {row["node_id"]: row for row in answer["proxies"]}
    assert by_id["proxy-a"]["ok"] is True, by_id
    assert by_id["proxy-b"]["ok"] is False and "not live" in by_id["proxy-b"]["detail"], by_id
    # proxy-b comes, fetches the desired version and reports it: the operation is done
    b = SimAgent(control, "proxy-b")
    b.register()
    assert b.metrics()["config_version"] == 1
    b.metrics(config_version=1)
    wait_for(lambda: operation(control)["state"] == "done", what="the operation to be done")


def test_with_no_live_proxy_every_declared_one_is_pending(control):
    for node_id in ("proxy-a", "proxy-b"):
        status, body = control.admin("POST", "/deployments/prod/proxies", {"node_id": node_id})
        assert status == 201, body
    p = ctl(control, "-o", "json", "config", "apply", "-", text=TEXT)
    assert p.returncode == 7, (p.stdout, p.stderr)
    answer = json.loads(p.stdout)
    assert answer["state"] == "committed" and "committed on 0 of 2" in answer["outcome"], answer
    assert answer["pending"] == ["proxy-a", "proxy-b"], answer
