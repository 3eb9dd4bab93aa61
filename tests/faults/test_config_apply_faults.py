"""config apply is all or none under faults (issue 9, Deliver 1 and 3), with real proxies:

  * a proxy killed -9 between prepare and commit: the other one commits, the answer says the
    version is committed with the killed one pending, and the killed one, started again with
    its old file, converges to the deployment's version (from the text it kept prepared on
    disk, or fetched); the operation record is then done;
  * the control plane killed -9 between prepare and commit: the next one finishes the apply
    from its record (every proxy had prepared), and no proxy is left on a version the other
    does not have;
  * a read-only pgrelay.ini on one proxy: refused at prepare, nothing changed anywhere.

The control plane's test hook PGRELAY_CONTROL_TEST_HOLD=prepare holds an apply after its
prepare step (PGRELAY_CONTROL_TEST_HOLD_MS: for that long, else until its deadline).
"""

import contextlib
import glob
import os
import signal
import threading
import time

from conftest import wait_for
from control_e2e_helpers import DEPLOYMENT, running_config, start_proxy
from fleet import ADDRESSES, Fleet

HOLD_MS_ENV = "PGRELAY_CONTROL_TEST_HOLD_MS"


def read(path):
    with open(path) as f:
        return f.read()


def debug_text(fleet):
    """The fleet's pgrelay.ini with log_level debug (a reloadable key)."""
    text = read(fleet.a.conf_path)
    assert "log_level = info" in text
    return text.replace("log_level = info", "log_level = debug")


def apply_in_background(fleet, text, timeout_s):
    result = {}

    def run():
        try:
            result["r"] = fleet.control.api("POST", f"/deployments/{DEPLOYMENT}/config",
                                            {"text": text, "timeout_s": timeout_s},
                                            timeout=timeout_s + 30)
        except OSError as e:  # the control plane was killed under the request
            result["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, result


def prepared_files(relay):
    return glob.glob(relay.conf_path + ".prepared.*")


def config_versions(fleet):
    return {k: v["config_version"] for k, v in fleet.control.proxies().items()}


def operations(fleet):
    return fleet.control.get(f"/deployments/{DEPLOYMENT}/operations")


def start_fleet_holding(pg, hold_ms=None):
    old = os.environ.pop(HOLD_MS_ENV, None)
    try:
        if hold_ms:
            os.environ[HOLD_MS_ENV] = str(hold_ms)
        return Fleet.start(pg, hold="prepare")
    finally:
        os.environ.pop(HOLD_MS_ENV, None)
        if old is not None:
            os.environ[HOLD_MS_ENV] = old


def test_a_proxy_killed_between_prepare_and_commit_converges_when_it_returns(pg):
    started = time.monotonic()
    # the hold gives the test 6 s to kill proxy-b after every proxy prepared (a loaded
    # machine may take a while to notice the hold in the log)
    with start_fleet_holding(pg, hold_ms=6000) as fleet:
        old_text = read(fleet.b.conf_path)
        text = debug_text(fleet)
        offset = fleet.control.log_size()
        t, result = apply_in_background(fleet, text, 12)
        wait_for(lambda: "holds after its prepare step" in fleet.control.log_since(offset),
                 timeout=15, what="the apply to hold after its prepare step")
        assert prepared_files(fleet.b), "proxy-b keeps no prepared text on disk"
        os.killpg(fleet.b.proc.pid, signal.SIGKILL)  # master, workers and agent
        fleet.b.proc.wait(10)
        assert "committed; committing it" not in fleet.control.log_since(offset), \
            "the test was too slow: the commit was sent before proxy-b was killed"
        t.join(60)
        status, answer = result["r"]
        # committed on proxy-a; proxy-b's outcome is in the answer, and "ok" is false
        assert status == 200 and answer["committed"] is True and answer["ok"] is False, answer
        assert answer["state"] == "committed" and answer["pending"] == ["proxy-b"], answer
        [op] = fleet.control.get(f"/deployments/{DEPLOYMENT}/operations")
        assert op["state"] == "committed" and "pending: proxy-b" in op["outcome"], op
        by_id = {row["node_id"]: row for row in answer["proxies"]}
        assert by_id["proxy-a"]["ok"] is True and by_id["proxy-b"]["ok"] is False, answer
        version = answer["version"]
        assert read(fleet.a.conf_path) == text
        assert running_config(fleet.a)["log_level"] == "debug"
        assert read(fleet.b.conf_path) == old_text  # killed before its commit
        # proxy-b starts again with its old file and converges to the deployment's version
        t0 = time.monotonic()
        fleet.proxies["proxy-b"] = start_proxy(fleet.root, "proxy-b", ADDRESSES["proxy-b"],
                                               old_text)
        wait_for(lambda: read(fleet.b.conf_path) == text, timeout=20,
                 what="proxy-b's file to converge")
        wait_for(lambda: running_config(fleet.b)["log_level"] == "debug", timeout=10,
                 what="proxy-b running the new version")
        wait_for(lambda: config_versions(fleet) == {"proxy-a": version, "proxy-b": version},
                 timeout=10, what="both proxies reporting the version")
        converged = time.monotonic() - t0
        assert prepared_files(fleet.b) == []
        # the record says when the version is everywhere
        wait_for(lambda: operations(fleet)[0]["state"] == "done", timeout=10,
                 what="the operation to be done once proxy-b reported the version")
        [op] = operations(fleet)
        assert op["kind"] == "config" and "committed on 1 of 2" in op["outcome"], op
        assert "on every proxy of its set now (proxy-b on version" in op["outcome"], op
    print(f"scenario time {time.monotonic() - started:.1f}s, proxy-b converged "
          f"{converged:.1f}s after its start")


def test_a_control_plane_killed_between_prepare_and_commit_is_finished_by_the_next(pg):
    started = time.monotonic()
    with start_fleet_holding(pg) as fleet:
        old_text = read(fleet.a.conf_path)
        text = debug_text(fleet)
        offset = fleet.control.log_size()
        t, result = apply_in_background(fleet, text, 60)
        wait_for(lambda: "holds after its prepare step" in fleet.control.log_since(offset),
                 timeout=15, what="the apply to hold after its prepare step")
        fleet.control.kill9()
        t.join(10)
        # the operator's request went down with the control plane, unanswered
        assert not t.is_alive() and "r" not in result, result
        assert isinstance(result.get("error"), OSError), result
        # both prepared, none committed
        for relay in fleet.proxies.values():
            assert read(relay.conf_path) == old_text and prepared_files(relay)
        t0 = time.monotonic()
        fleet.start_control()
        for relay in fleet.proxies.values():
            wait_for(lambda relay=relay: read(relay.conf_path) == text, timeout=15,
                     what=f"{relay.node_id} to commit the apply")
            wait_for(lambda relay=relay: running_config(relay)["log_level"] == "debug",
                     timeout=10, what=f"{relay.node_id} running the new version")
        finished = time.monotonic() - t0
        wait_for(lambda: operations(fleet)[0]["state"] == "done", timeout=10,
                 what="the operation to be done once every proxy reported the version")
        [op] = operations(fleet)
        assert op["kind"] == "config", op
        assert "finished by" in op["outcome"], op
        current = fleet.control.get(f"/deployments/{DEPLOYMENT}/config")
        assert current["version"] == op["version"] and current["text"] == text
        wait_for(lambda: set(config_versions(fleet).values()) == {op["version"]}, timeout=10,
                 what="every proxy on the one version")
    print(f"scenario time {time.monotonic() - started:.1f}s, finished {finished:.1f}s after "
          "the restart")


def test_a_read_only_config_on_one_proxy_is_refused_at_prepare_and_nothing_changes(pg):
    started = time.monotonic()
    with Fleet.start(pg) as fleet:
        old = {n: read(r.conf_path) for n, r in fleet.proxies.items()}
        text = debug_text(fleet)
        os.chmod(fleet.b.conf_path, 0o444)
        try:
            path = os.path.join(fleet.root, "new.ini")
            with open(path, "w") as f:
                f.write(text)
            rc, out, err = fleet.ctl_json("config", "apply", path)
        finally:
            with contextlib.suppress(OSError):
                os.chmod(fleet.b.conf_path, 0o640)
        assert rc != 0, (out, err)
        assert "proxy-b" in err and "read-only" in err, err
        by_id = {row["node_id"]: row for row in out["proxies"]}
        assert "read-only" in by_id["proxy-b"]["detail"], out
        wait_for(lambda: prepared_files(fleet.a) == [], timeout=10,
                 what="proxy-a to drop what it prepared")
        for node_id, relay in fleet.proxies.items():
            assert read(relay.conf_path) == old[node_id], f"{node_id}'s file changed"
            assert running_config(relay)["log_level"] == "info"
            assert prepared_files(relay) == []
        current = fleet.control.get(f"/deployments/{DEPLOYMENT}/config")
        assert current["version"] == 0 and current["text"] is None
        assert set(config_versions(fleet).values()) == {0}
        [op] = fleet.control.get(f"/deployments/{DEPLOYMENT}/operations")
        assert op["kind"] == "config" and op["state"] == "rolled_back", op
    print(f"scenario time {time.monotonic() - started:.1f}s")
