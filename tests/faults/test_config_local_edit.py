"""A configuration version applied through the control plane is checked against the file, not
trusted (issue 9, Deliver 1): the agent keeps a SHA-256 digest of the applied text (with its
version) in PATH.version, and a proxy whose pgrelay.ini or PATH.version was edited by hand

  * no longer claims the version (its metrics say "config_version": 0 and "config_diverged":
    the version it left), which `pgrelayctl show-metrics -o json`, `config show` and the
    Prometheus gauge pgrelay_proxy_config_diverged show;
  * is not overwritten by the desired version: it waits for an operator, who either restores
    the file (the proxy claims the version again) or applies a configuration (the same text
    makes a new version when a proxy diverged, and the commit replaces the local edit).
"""

import contextlib
import os
import signal
import time
import urllib.request

from conftest import wait_for
from control_e2e_helpers import DEPLOYMENT, running_config, start_proxy
from fleet import ADDRESSES, Fleet


def read(path):
    with open(path) as f:
        return f.read()


def write(path, text):
    with open(path, "w") as f:
        f.write(text)


def sample(fleet, node_id):
    """proxy node_id's last metrics report as the control plane keeps it, and when it came."""
    for row in fleet.control.get(f"/deployments/{DEPLOYMENT}/metrics"):
        if row["node_id"] == node_id:
            return row["sample"] or {}, row["received_ms"]
    return {}, 0


def reports_after(fleet, node_id, n=3):
    """Wait until n more metrics reports of node_id arrived (each after a converge chance)."""
    seen = [sample(fleet, node_id)[1]]

    def more():
        at = sample(fleet, node_id)[1]
        if at != seen[-1]:
            seen.append(at)
        return len(seen) > n
    wait_for(more, timeout=15, what=f"{n} more metrics reports of {node_id}")


def apply(fleet, text):
    path = os.path.join(fleet.root, "apply.ini")
    write(path, text)
    rc, out, err = fleet.ctl_json("config", "apply", path)
    assert rc == 0, (out, err)
    return out


@contextlib.contextmanager
def applied_fleet(pg):
    """A fleet of two proxies with a version applied through the control plane."""
    with Fleet.start(pg) as fleet:
        text = read(fleet.a.conf_path).replace("log_level = info", "log_level = debug")
        version = apply(fleet, text)["version"]
        # the metrics reports, not only the commits' acknowledgements
        wait_for(lambda: all(diverged(fleet, n) == (version, 0) for n in fleet.proxies),
                 timeout=10, what=f"both proxies reporting version {version}")
        yield fleet, text, version


def prometheus(fleet):
    with urllib.request.urlopen(f"http://127.0.0.1:{fleet.control.port}/metrics",
                                timeout=10) as r:
        return r.read().decode()


def diverged(fleet, node_id):
    s, _ = sample(fleet, node_id)
    return s.get("config_version"), s.get("config_diverged")


def test_a_hand_edit_is_reported_not_overwritten_and_the_same_text_applied_again_replaces_it(pg):
    with applied_fleet(pg) as (fleet, text, version):
        edited = text.replace("log_level = debug", "log_level = warning")
        write(fleet.b.conf_path, edited)
        wait_for(lambda: diverged(fleet, "proxy-b") == (0, version), timeout=10,
                 what="proxy-b to report the local edit")
        assert fleet.control.proxies()["proxy-b"]["config_version"] == 0
        assert diverged(fleet, "proxy-a") == (version, 0)
        gauge = f'pgrelay_proxy_config_diverged{{deployment="{DEPLOYMENT}",node_id="proxy-b"}}'
        assert f"{gauge} {version}" in prometheus(fleet), "no divergence gauge"
        # the desired version is not forced on it: the edit stays
        reports_after(fleet, "proxy-b")
        assert read(fleet.b.conf_path) == edited, "the local edit was overwritten"
        assert diverged(fleet, "proxy-b") == (0, version)
        # the operator applies the text again: a new version (not "unchanged"), everywhere
        out = apply(fleet, text)
        assert out.get("unchanged") is not True and out["version"] == version + 1, out
        assert read(fleet.b.conf_path) == text
        wait_for(lambda: diverged(fleet, "proxy-b") == (version + 1, 0), timeout=10,
                 what="proxy-b on the new version, no longer diverged")
        assert running_config(fleet.b)["log_level"] == "debug"


def test_restoring_the_file_claims_the_version_again(pg):
    with applied_fleet(pg) as (fleet, text, version):
        write(fleet.b.conf_path, text + "\n; a note\n")
        wait_for(lambda: diverged(fleet, "proxy-b") == (0, version), timeout=10,
                 what="proxy-b to report the local edit")
        write(fleet.b.conf_path, text)
        wait_for(lambda: diverged(fleet, "proxy-b") == (version, 0), timeout=10,
                 what="proxy-b to claim the version again")
        assert fleet.control.proxies()["proxy-b"]["config_version"] == version


def test_a_hand_edited_version_file_is_not_trusted_after_a_restart(pg):
    with applied_fleet(pg) as (fleet, text, version):
        vpath = fleet.b.conf_path + ".version"
        digest = read(vpath).split()[1]
        os.killpg(fleet.b.proc.pid, signal.SIGKILL)
        fleet.b.proc.wait(10)
        write(vpath, f"{version + 5} {digest}\n")  # another version number, the same digest
        fleet.proxies["proxy-b"] = start_proxy(fleet.root, "proxy-b", ADDRESSES["proxy-b"], text)
        wait_for(lambda: diverged(fleet, "proxy-b") == (0, version + 5), timeout=15,
                 what="proxy-b not to claim the version its hand-edited PATH.version names")
        reports_after(fleet, "proxy-b")
        assert read(vpath).startswith(f"{version + 5} "), "PATH.version was rewritten"
        # a PATH.version without a digest (hand-written, or from before digests) is not
        # trusted either
        os.killpg(fleet.b.proc.pid, signal.SIGKILL)
        fleet.b.proc.wait(10)
        write(vpath, f"{version}\n")
        t0 = time.monotonic()
        fleet.proxies["proxy-b"] = start_proxy(fleet.root, "proxy-b", ADDRESSES["proxy-b"], text)
        wait_for(lambda: diverged(fleet, "proxy-b") == (0, version), timeout=15,
                 what="proxy-b not to claim a version without a digest")
        print(f"diverged reported {time.monotonic() - t0:.1f}s after the restart")
