"""Helpers of test_control_e2e.py: a real pgrelay-control, real pgrelay proxies, pgrelayctl.

Two proxy hosts on one machine
------------------------------
`config apply` sends ONE complete pgrelay.ini to every proxy of a deployment, and a proxy
refuses a text that changes a restart-only key (listen_addr, listen_port, admin_socket, ...).
Real proxies run on separate hosts with the same file; here each proxy runs in a private mount
namespace (``unshare --mount``) where

  * /etc/hosts maps the host name ``HOST_NAME`` to the proxy's own loopback address
    (127.0.0.2 for proxy-a, 127.0.0.3 for proxy-b, ...), so ``listen_addr = HOST_NAME`` and the
    same ``listen_port`` give every proxy its own socket;
  * the directory ``<root>/host`` is the proxy's own work directory (bind mount), so
    ``admin_socket = <root>/host/admin.sock`` is a different socket for each proxy (the tests
    reach it as ``<workdir>/admin.sock``).

The text is therefore byte-for-byte the same on every proxy, as it would be on real hosts.
"""

import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import tempfile
import time

from cluster import wait_relay_ready
from conftest import (PGRELAY_BIN, Relay, _LIVE_RELAYS, admin_json, http_call as http,
                      start_on_free_port)

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CONTROL_BIN = os.path.abspath(
    os.environ.get("PGRELAY_CONTROL_BIN", os.path.join(REPO, "bin", "pgrelay-control")))
CTL_BIN = os.path.abspath(os.environ.get("PGRELAYCTL_BIN", os.path.join(REPO, "bin", "pgrelayctl")))

ADMIN_TOKEN = "e2e-admin-token-0123"
DEPLOYMENT = "prod"
PROD_TOKEN = "e2e-prod-agent-token-4567"
HOST_NAME = "pgrelay-e2e-host"
API = "/api/v1"


# --------------------------------------------------------------------------- #
# pgrelay-control
# --------------------------------------------------------------------------- #


class ControlPlane:
    """bin/pgrelay-control with one deployment (prod) and one admin token, on a fixed port
    once started (so that it can be killed and started again where the agents expect it)."""

    def __init__(self, workdir, store, proxy_timeout="3s", auto_declare=True):
        self.workdir = workdir
        self.store = store
        self.proxy_timeout = proxy_timeout
        self.auto_declare = auto_declare  # off: the test declares its proxies (create-proxy)
        self.port = None
        self.proc = None
        self.conf = os.path.join(workdir, "control.ini")
        self.log_path = os.path.join(workdir, "control.log")
        self.starts = 0

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def _write_ini(self):
        with open(self.conf, "w") as f:
            f.write(
                "[control]\n"
                "listen_addr = 127.0.0.1\n"
                f"listen_port = {self.port}\n"
                f"store = {self.store}\n"
                f"admin_tokens = {ADMIN_TOKEN}\n"
                f"proxy_timeout = {self.proxy_timeout}\n"
                "poll_wait_max = 60s\n"
                "log_level = debug\n"
                f"auto_declare = {'on' if self.auto_declare else 'off'}\n"
                f"\n[deployment.{DEPLOYMENT}]\ntoken = {PROD_TOKEN}\n"
            )

    def start(self, timeout=20):
        """Start it (a new port the first time, the same port afterwards) and wait for /readyz."""

        def launch(port, attempt):
            self.port = port
            self._write_ini()
            self.starts += 1
            with open(self.log_path, "a") as logf:
                logf.write(f"----- start #{self.starts} -----\n")
                logf.flush()
                self.proc = subprocess.Popen([CONTROL_BIN, "-c", self.conf],
                                             stdin=subprocess.DEVNULL, stdout=logf,
                                             stderr=subprocess.STDOUT)
            return self

        return start_on_free_port(launch, lambda c: c.ready(), lambda c: c.stop(),
                                  "pgrelay-control", attempts=3 if self.port is None else 50,
                                  timeout=timeout, port=self.port,
                                  log=lambda c: c.log_tail(5))

    def ready(self):
        try:
            return http(self.port, "GET", "/readyz", timeout=2)[0] == 200
        except OSError:
            return False

    def kill9(self):
        self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self):
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def api(self, method, path, body=None, token=ADMIN_TOKEN, **kw):
        return http(self.port, method, API + path, body, token, **kw)

    def get(self, path):
        status, body = self.api("GET", path)
        assert status == 200, (path, status, body)
        return body

    def proxies(self):
        return {p["node_id"]: p for p in self.get(f"/deployments/{DEPLOYMENT}/proxies")}

    def deployment(self):
        [dep] = [d for d in self.get("/deployments") if d["name"] == DEPLOYMENT]
        return dep

    def log_size(self):
        try:
            return os.path.getsize(self.log_path)
        except OSError:
            return 0

    def log_since(self, offset):
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def log_tail(self, n=60):
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-n:])
        except OSError as e:
            return f"<no log: {e}>"


def run_ctl(control, *args, timeout=60, token=ADMIN_TOKEN):
    """pgrelayctl against ``control``, configured through its environment variables."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("PGRELAYCTL_") and not k.lower().endswith("_proxy")}
    env.update(PGRELAYCTL_ENDPOINT=control.url, PGRELAYCTL_TOKEN=token,
               PGRELAYCTL_DEPLOYMENT=DEPLOYMENT)
    p = subprocess.run([CTL_BIN, *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    assert p.returncode >= 0, f"pgrelayctl died of signal {-p.returncode}: {p.stderr}"
    return p


def ctl_json(control, *args, **kw):
    """``pgrelayctl -o json ARGS``: (exit status, parsed stdout or None)."""
    p = run_ctl(control, "-o", "json", *args, **kw)
    try:
        out = json.loads(p.stdout) if p.stdout.strip() else None
    except ValueError:
        raise AssertionError(f"pgrelayctl -o json {args}: not JSON: {p.stdout!r} {p.stderr!r}")
    return p.returncode, out, p.stderr


def table_rows(stdout):
    """An aligned pgrelayctl table as a list of dicts keyed by the header."""
    lines = [ln for ln in stdout.strip("\n").split("\n") if ln.strip()]
    header = re.split(r"\s{2,}", lines[0].strip())
    return [dict(zip(header, re.split(r"\s{2,}", ln.strip()))) for ln in lines[1:]]


# --------------------------------------------------------------------------- #
# pgrelay proxies as separate "hosts"
# --------------------------------------------------------------------------- #


def render_ini(listen_port, host_dir, control_url, nodes, pgrelay=None, agent=None,
               control=None):
    """The complete pgrelay.ini of the fleet. ``nodes``: [(name, {key: value})]."""
    sections = {
        "pgrelay": {
            "listen_addr": HOST_NAME,
            "listen_port": listen_port,
            "workers": 2,
            "max_client_conn": 1000,
            "admin_socket": os.path.join(host_dir, "admin.sock"),
            "log_level": "info",
            "server_connect_timeout": "5s",
            "leader_change_grace": "10s",
        },
        "agent": {
            "monitor_user": "postgres",
            "health_interval": "200ms",
            "fall": 2,
            "rise": 1,
            # the outage tests exercise the fallback to deciding alone (the default keeps the
            # leader: test_leader_following.py)
            "control_lost": "decide_alone",
        },
        "control": {
            "endpoint": control_url,
            "token": PROD_TOKEN,
            "request_timeout": "2s",
            "metrics_interval": "250ms",
            "active_queries_interval": "500ms",
            "control_grace_period": "2s",
        },
    }
    for name, extra in (("pgrelay", pgrelay), ("agent", agent), ("control", control)):
        sections[name].update(extra or {})
    lines = []
    for name, keys in sections.items():
        lines += [f"[{name}]"] + [f"{k} = {v}" for k, v in keys.items()] + [""]
    for name, keys in nodes:
        lines += [f"[node.{name}]"] + [f"{k} = {v}" for k, v in keys.items()] + [""]
    return "\n".join(lines)


def _tcp_accepts(host, port):
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def start_proxy(root, node_id, address, text, timeout=20):
    """pgrelay with config ``text`` as host ``node_id``: its own mount namespace, where
    HOST_NAME is ``address`` and <root>/host is its work directory; NODE_ID in its
    environment. Returns a conftest Relay (host = address) once the agent chose a leader."""
    workdir = os.path.join(root, node_id)
    os.makedirs(workdir, exist_ok=True)
    host_dir = os.path.join(root, "host")
    os.makedirs(host_dir, exist_ok=True)
    hosts = os.path.join(workdir, "hosts")
    with open(hosts, "w") as f:
        f.write(f"127.0.0.1 localhost\n{address} {HOST_NAME}\n")
    conf = os.path.join(workdir, "pgrelay.ini")
    with open(conf, "w") as f:
        f.write(text)
    n = len([x for x in os.listdir(workdir) if x.startswith("pgrelay-") and x.endswith(".log")])
    log_path = os.path.join(workdir, f"pgrelay-{n}.log")
    script = 'mount --bind "$1" /etc/hosts && mount --bind "$2" "$3" && exec "$4" -c "$5"'
    with open(log_path, "w") as logf:
        proc = subprocess.Popen(
            ["unshare", "--mount", "--propagation", "private", "--", "sh", "-c", script, "sh",
             hosts, workdir, host_dir, PGRELAY_BIN, conf],
            stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
            env=dict(os.environ, NODE_ID=node_id), start_new_session=True)
    relay = Relay(workdir, None, conf, log_path, proc)
    relay.host = address
    relay.node_id = node_id
    for line in text.splitlines():
        if line.startswith("listen_port"):
            relay.port = int(line.split("=")[1])
    _LIVE_RELAYS.append(relay)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if _tcp_accepts(address, relay.port) and os.path.exists(admin_path(relay)):
            break
        time.sleep(0.05)
    if proc.poll() is not None or not _tcp_accepts(address, relay.port):
        stop_proxy(relay)
        raise AssertionError(f"{node_id} did not start (exit {proc.poll()}):\n{relay.log_tail()}")
    wait_relay_ready(relay, timeout=timeout)
    return relay


def admin_path(relay):
    return os.path.join(relay.workdir, "admin.sock")


def stop_proxy(relay):
    relay.stop()
    with contextlib.suppress(ValueError):
        _LIVE_RELAYS.remove(relay)


def info(relay):
    return admin_json(relay, "show info")


def running_config(relay):
    """`show config json` as {key: value}."""
    return {row["key"]: row["value"] for row in admin_json(relay, "show config")}


def cleanup_dir(path):
    shutil.rmtree(path, ignore_errors=True)


def make_root():
    root = tempfile.mkdtemp(prefix="pgrelay-e2e-")
    os.chmod(root, 0o755)
    return root


def nodes_view(relay):
    """`show nodes json` as {name: row}: the agent's own view of every database node."""
    return {n["name"]: n for n in admin_json(relay, "show nodes")}


def set_ini_key(text, section, key, value):
    """``text`` with ``key = value`` in ``[section]``: the key's line replaced where the section
    has one, else added as the section's first line."""
    lines = text.split("\n")
    start = lines.index(f"[{section}]")
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("[")), len(lines))
    for i in range(start + 1, end):
        if re.match(rf"{re.escape(key)}\s*=", lines[i]):
            lines[i] = f"{key} = {value}"
            return "\n".join(lines)
    lines.insert(start + 1, f"{key} = {value}")
    return "\n".join(lines)
