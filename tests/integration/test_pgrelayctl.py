"""pgrelayctl, the operator CLI: the requests it sends, how it shows answers, its exit codes.

Most tests run it against a stub control plane (http.server in a thread) that records every
request and answers from a table of canned responses, so the contract of docs/protocol.md is
checked from the operator's side without a real server. A last test talks to a real
bin/pgrelay-control when one has been built and starts.
"""

import json
import os
import re
import shutil
import subprocess
import threading
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from conftest import free_port, require, wait_for

REPO = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
CTL_BIN = os.path.abspath(
    os.environ.get("PGRELAYCTL_BIN", os.path.join(REPO, "bin", "pgrelayctl"))
)
CONTROL_BIN = os.path.abspath(
    os.environ.get("PGRELAY_CONTROL_BIN", os.path.join(REPO, "bin", "pgrelay-control"))
)
MAN1 = os.path.join(REPO, "man", "pgrelayctl.1")

TOKEN = "admin-secret"
API = "/api/v1"


@pytest.fixture(autouse=True, scope="module")
def _pgrelayctl_is_built():
    # make test builds it: a missing binary is a failure, not a reason to skip.
    assert os.access(CTL_BIN, os.X_OK), f"{CTL_BIN} not built (make bin/pgrelayctl)"

# Exit statuses, as pgrelayctl(1) documents them.
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNREACHABLE, EXIT_AUTH, EXIT_TIMEOUT, EXIT_NOT_FOUND = (
    range(7)
)

PROXIES = [
    {"node_id": "proxy-a", "hostname": "db-proxy-1", "version": "0.1.0",
     "last_seen": 1763770000000, "live": True, "epoch": 7, "leader": "pg1",
     "maintenance": False, "config_version": 3, "listen": ["127.0.0.1:6432"],
     "status": "declared"},
    {"node_id": "proxy-b", "hostname": "db-proxy-2", "version": "0.1.0",
     "last_seen": 1763760000000, "live": False, "epoch": 6, "leader": None,
     "maintenance": True, "config_version": 2, "listen": [], "status": "pending"},
]
NODES = [
    {"name": "pg1", "host": "10.0.0.11", "port": 5432, "role": "primary", "leader": True,
     "health": {"proxy-a": "up", "proxy-b": "up"}, "lag_bytes": 0},
    {"name": "pg2", "host": "10.0.0.12", "port": 5432, "role": "replica", "leader": False,
     "health": {"proxy-a": "up", "proxy-b": "down"}, "lag_bytes": 4096},
]
LONG_STATEMENT = "SELECT " + ", ".join(f"column_{i}" for i in range(40)) + " FROM orders"
QUERIES = [
    {"node_id": "proxy-a", "session": 17, "client": "10.1.2.3:51000", "user": "app",
     "database": "shop", "node": "pg1", "state": "active", "duration_ms": 1520,
     "text": LONG_STATEMENT},
]
CONFIG_TEXT = "[pgrelay]\nlisten_port = 6432\n\n[node.pg1]\nhost = 10.0.0.11\n"


# --------------------------------------------------------------------------- #
# the stub control plane
# --------------------------------------------------------------------------- #


class Reply:
    """A canned answer: status, body (JSON-encoded unless bytes), optional delay."""

    def __init__(self, status=200, body=None, delay=0.0):
        self.status, self.body, self.delay = status, body, delay

    def payload(self):
        if self.body is None:
            return b""
        if isinstance(self.body, bytes):
            return self.body
        return json.dumps(self.body).encode()


class Stub:
    """An HTTP server answering (method, path) from ``routes``; everything it receives is in
    ``requests`` as dicts with method, path, headers and body (parsed JSON, or raw bytes)."""

    def __init__(self):
        self.routes = {}
        self.requests = []
        stub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def handle_any(self):
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                try:
                    body = json.loads(raw) if raw else None
                except ValueError:
                    body = raw
                stub.requests.append({"method": self.command, "path": self.path,
                                      "headers": dict(self.headers), "body": body})
                reply = stub.routes.get((self.command, self.path))
                if reply is None:
                    reply = Reply(404, {"error": f"no route {self.command} {self.path}"})
                if reply.delay:
                    time.sleep(reply.delay)
                data = reply.payload()
                try:
                    self.send_response(reply.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:
                    pass  # the client gave up (timeout tests)

            do_GET = do_POST = do_PUT = do_DELETE = handle_any

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05},
                                       daemon=True)
        self.thread.start()

    def route(self, method, path, status=200, body=None, delay=0.0):
        self.routes[(method, API + path)] = Reply(status, body, delay)

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def stub():
    s = Stub()
    s.route("GET", "/deployments", body=[{"name": "prod", "proxies": 2, "live": 1}])
    yield s
    s.stop()


@pytest.fixture
def stub2():
    s = Stub()
    yield s
    s.stop()


def refused_url():
    """A URL nothing listens on."""
    return f"http://127.0.0.1:{free_port()}"


def run(*args, endpoint=None, token=TOKEN, env=None, stdin=None, timeout=20):
    """Run pgrelayctl with a clean environment: --endpoint/--token only when given."""
    e = {k: v for k, v in os.environ.items()
         if not k.startswith("PGRELAYCTL_") and not k.lower().endswith("_proxy")}
    e.update(env or {})
    argv = [CTL_BIN]
    if endpoint:
        argv += ["--endpoint", endpoint]
    if token:
        argv += ["--token", token]
    p = subprocess.run(argv + list(args), input=stdin, capture_output=True, text=True,
                       env=e, timeout=timeout)
    assert p.returncode >= 0, f"pgrelayctl died of signal {-p.returncode}: {p.stderr}"
    return p


def table(stdout):
    """Rows of an aligned table as lists of cells (split on runs of two or more spaces)."""
    return [re.split(r"\s{2,}", line.strip()) for line in stdout.strip("\n").split("\n")]


def one_line_error(p):
    lines = p.stderr.strip("\n").split("\n")
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith("pgrelayctl: "), p.stderr
    return lines[0]


# --------------------------------------------------------------------------- #
# show commands
# --------------------------------------------------------------------------- #


def test_show_deployments_sends_the_bearer_token_and_prints_a_table(stub):
    p = run("show-deployments", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert table(p.stdout) == [["name", "proxies", "live"], ["prod", "2", "1"]]
    [req] = stub.requests
    assert req["method"] == "GET" and req["path"] == API + "/deployments"
    assert req["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert "application/json" in req["headers"]["Accept"]


def test_show_proxies_prints_the_documented_columns(stub):
    stub.route("GET", "/deployments/prod/proxies", body=PROXIES)
    p = run("-d", "prod", "show-proxies", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    rows = table(p.stdout)
    assert rows[0] == ["node_id", "hostname", "version", "last_seen", "live", "epoch",
                       "leader", "maintenance", "config_version", "status"]
    a, b = rows[1], rows[2]
    assert a[0] == "proxy-a" and a[1] == "db-proxy-1" and a[4:] == ["yes", "7", "pg1", "no", "3",
                                                                     "declared"]
    assert re.fullmatch(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\d", a[3]), a
    assert b[4:] == ["no", "6", "-", "yes", "2", "pending"]
    # -d given: no need to list the deployments first.
    assert [r["path"] for r in stub.requests] == [API + "/deployments/prod/proxies"]


def test_json_output_is_the_servers_answer(stub):
    stub.route("GET", "/deployments/prod/proxies", body=PROXIES)
    p = run("-o", "json", "-d", "prod", "show-proxies", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert json.loads(p.stdout) == PROXIES


def test_show_nodes_renders_health_per_proxy(stub):
    stub.route("GET", "/deployments/prod/nodes", body=NODES)
    p = run("show-nodes", "-d", "prod", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    rows = table(p.stdout)
    assert rows[0] == ["name", "host", "port", "role", "leader", "health", "lag_bytes"]
    assert rows[2] == ["pg2", "10.0.0.12", "5432", "replica", "no",
                       "proxy-a=up,proxy-b=down", "4096"]


def test_show_queries_cuts_long_statements_in_tables_only(stub):
    stub.route("GET", "/deployments/prod/queries", body=QUERIES)
    p = run("show-queries", "-d", "prod", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    header, row = table(p.stdout)
    assert header[-1] == "text"
    assert row[-1].endswith("...") and len(row[-1]) == 60 and LONG_STATEMENT.startswith(
        row[-1][:-3])
    p = run("show-queries", "-d", "prod", "-o", "json", endpoint=stub.url)
    assert json.loads(p.stdout)[0]["text"] == LONG_STATEMENT


METRICS = [
    {"node_id": "proxy-a", "live": True, "received_ms": 1764480000000, "samples": 12,
     "sample": {"clients": 42, "statements": 90000, "latency_us": 1000},
     "rates": {"statements": 1830.54, "bytes_in": 94210.24, "bytes_out": 512300.66, "errors": 0},
     "latency_ms": 1.84, "p99_ms": 9.64,
     "nodes": [
         {"name": "pg1", "sessions": 40, "latency_ms": 1.8, "p99_ms": 9.5,
          "rates": {"statements": 1790.1, "bytes_in": 92000.4, "bytes_out": 500100.3,
                    "errors": 0}},
         {"name": "pg2", "sessions": 2, "latency_ms": None,
          "rates": {"statements": None, "bytes_in": None, "bytes_out": None, "errors": None}},
     ]},
    {"node_id": "proxy-b", "live": False, "received_ms": 0, "samples": 1, "sample": None,
     "rates": {"statements": None, "bytes_in": None, "bytes_out": None, "errors": None},
     "latency_ms": None, "nodes": []},
]


def test_show_metrics_has_a_row_per_proxy_and_per_node(stub):
    stub.route("GET", "/deployments/prod/metrics", body=METRICS)
    p = run("show-metrics", "-d", "prod", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    rows = table(p.stdout)
    assert rows[0] == ["node_id", "node", "live", "sessions", "statements_s", "bytes_in_s",
                       "bytes_out_s", "errors_s", "latency_ms", "p99_ms"]
    assert rows[1] == ["proxy-a", "(all)", "yes", "42", "1830.5", "94210.2", "512300.7", "0",
                       "1.8", "9.6"], rows[1]
    assert rows[2][:4] == ["proxy-a", "pg1", "yes", "40"] and rows[2][-2:] == ["1.8", "9.5"], rows[2]
    assert rows[3] == ["proxy-a", "pg2", "yes", "2", "-", "-", "-", "-", "-", "-"], rows[3]
    assert rows[4] == ["proxy-b", "(all)", "no", "-", "-", "-", "-", "-", "-", "-"], rows[4]
    assert len(rows) == 5
    p = run("show-metrics", "-d", "prod", "-o", "json", endpoint=stub.url)
    assert json.loads(p.stdout) == METRICS


def test_empty_lists_print_none(stub):
    stub.route("GET", "/deployments/prod/queries", body=[])
    p = run("show-queries", "-d", "prod", endpoint=stub.url)
    assert p.returncode == EXIT_OK and p.stdout == "(none)\n"


def test_deployment_names_are_escaped_in_paths(stub):
    stub.route("GET", "/deployments/a%20b%2Fc/nodes", body=[])
    p = run("show-nodes", "-d", "a b/c", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr


# --------------------------------------------------------------------------- #
# choosing the deployment, endpoint and token
# --------------------------------------------------------------------------- #


def test_the_only_deployment_is_the_default(stub):
    stub.route("GET", "/deployments/prod/nodes", body=NODES)
    p = run("show-nodes", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert [r["path"] for r in stub.requests] == [API + "/deployments",
                                                 API + "/deployments/prod/nodes"]


def test_several_deployments_need_a_choice(stub):
    stub.route("GET", "/deployments", body=[{"name": "prod", "proxies": 2, "live": 2},
                                            {"name": "staging", "proxies": 1, "live": 1}])
    p = run("show-proxies", endpoint=stub.url)
    assert p.returncode == EXIT_USAGE
    err = one_line_error(p)
    assert "prod" in err and "staging" in err and "--deployment" in err


def test_no_deployment_at_all_is_not_found(stub):
    stub.route("GET", "/deployments", body=[])
    p = run("show-proxies", endpoint=stub.url)
    assert p.returncode == EXIT_NOT_FOUND
    assert "no deployments" in one_line_error(p)


def test_environment_variables_stand_in_for_the_flags(stub):
    stub.route("GET", "/deployments/env-dep/proxies", body=PROXIES)
    env = {"PGRELAYCTL_ENDPOINT": stub.url, "PGRELAYCTL_TOKEN": "from-env",
           "PGRELAYCTL_DEPLOYMENT": "env-dep"}
    p = run("show-proxies", token=None, env=env)
    assert p.returncode == EXIT_OK, p.stderr
    [req] = stub.requests
    assert req["path"] == API + "/deployments/env-dep/proxies"
    assert req["headers"]["Authorization"] == "Bearer from-env"


def test_flags_win_over_environment_variables(stub):
    stub.route("GET", "/deployments/flag-dep/proxies", body=PROXIES)
    env = {"PGRELAYCTL_ENDPOINT": refused_url(), "PGRELAYCTL_TOKEN": "from-env",
           "PGRELAYCTL_DEPLOYMENT": "env-dep"}
    p = run("--endpoint", stub.url, "--token", "from-flag", "--deployment", "flag-dep",
            "show-proxies", token=None, env=env)
    assert p.returncode == EXIT_OK, p.stderr
    [req] = stub.requests
    assert req["path"] == API + "/deployments/flag-dep/proxies"
    assert req["headers"]["Authorization"] == "Bearer from-flag"


def test_global_options_are_accepted_after_the_command(stub):
    stub.route("GET", "/deployments/prod/proxies", body=PROXIES)
    p = run("show-proxies", "-o", "json", "--deployment", "prod", "--timeout", "3",
            endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert json.loads(p.stdout) == PROXIES


def test_a_missing_token_is_a_usage_error_and_sends_nothing(stub):
    p = run("show-deployments", endpoint=stub.url, token=None)
    assert p.returncode == EXIT_USAGE
    assert "PGRELAYCTL_TOKEN" in p.stderr
    assert stub.requests == []


def test_the_default_endpoint_is_local_port_8080():
    # Nothing is expected to listen there in the test environment; the message names it.
    p = run("show-deployments")
    if p.returncode == EXIT_UNREACHABLE:
        assert "http://127.0.0.1:8080" in one_line_error(p)


# --------------------------------------------------------------------------- #
# operations
# --------------------------------------------------------------------------- #

SWITCHOVER_OK = {"ok": True, "leader": "pg2", "epoch": 8, "proxies": [
    {"node_id": "proxy-a", "ok": True, "detail": "leader pg2 epoch 8"},
    {"node_id": "proxy-b", "ok": True, "detail": "leader pg2 epoch 8"}]}


def test_switchover_posts_node_promote_and_timeout(stub):
    stub.route("POST", "/deployments/prod/switchover", body=SWITCHOVER_OK)
    p = run("-d", "prod", "switchover", "--node", "pg2", "--promote", "--timeout", "12",
            endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    [req] = stub.requests
    assert req["method"] == "POST" and req["path"] == API + "/deployments/prod/switchover"
    assert req["body"] == {"node": "pg2", "promote": True, "force": False, "timeout_s": 12}
    assert req["headers"]["Content-Type"] == "application/json"
    assert req["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert "leader  pg2" in p.stdout and "epoch   8" in p.stdout
    assert ["proxy-b", "yes", "leader pg2 epoch 8"] in table(p.stdout.split("\n\n")[1])


def test_switchover_defaults_to_no_promote_and_30_seconds(stub):
    stub.route("POST", "/deployments/prod/switchover", body=SWITCHOVER_OK)
    p = run("-d", "prod", "-o", "json", "switchover", "--node", "pg2", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert stub.requests[0]["body"] == {"node": "pg2", "promote": False, "force": False,
                                        "timeout_s": 30}
    assert json.loads(p.stdout) == SWITCHOVER_OK


def test_switchover_without_node_is_a_usage_error(stub):
    p = run("-d", "prod", "switchover", endpoint=stub.url)
    assert p.returncode == EXIT_USAGE
    assert "--node" in p.stderr and stub.requests == []


def test_operations_wait_for_their_own_timeout_plus_a_margin(stub):
    # HTTP timeout 0.5 s, but a switchover may take its --timeout (1 s) plus the margin.
    stub.route("POST", "/deployments/prod/switchover", body=SWITCHOVER_OK, delay=1.5)
    p = run("--timeout", "0.5", "-d", "prod", "switchover", "--node", "pg2", "--timeout", "1",
            endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr


@pytest.mark.parametrize("state,on", [("on", True), ("off", False)])
def test_maintenance_posts_on_and_timeout(stub, state, on):
    answer = {"ok": True, "proxies": [{"node_id": "proxy-a", "ok": True,
                                       "detail": f"maintenance {state}"}]}
    stub.route("POST", "/deployments/prod/maintenance", body=answer)
    p = run("-d", "prod", "maintenance", state, "--timeout", "5", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert stub.requests[0]["body"] == {"on": on, "timeout_s": 5}
    assert ["proxy-a", "yes", f"maintenance {state}"] in table(p.stdout)


def test_maintenance_on_resume_after_is_sent_as_resume_after_s(stub):
    answer = {"ok": True, "proxies": [{"node_id": "proxy-a", "ok": True, "detail": "paused"}]}
    stub.route("POST", "/deployments/prod/maintenance", body=answer)
    p = run("-d", "prod", "maintenance", "on", "--resume-after", "600", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert stub.requests[0]["body"] == {"on": True, "timeout_s": 30, "resume_after_s": 600}
    p = run("maintenance", "--help", token=None)
    assert p.returncode == EXIT_OK and "--resume-after S" in p.stdout


@pytest.mark.parametrize("args", [["maintenance", "off", "--resume-after", "60"],
                                  ["maintenance", "on", "--resume-after", "0"],
                                  ["maintenance", "on", "--resume-after", "soon"],
                                  ["switchover", "--node", "pg2", "--resume-after", "5"]])
def test_resume_after_misuse_is_a_usage_error(stub, args):
    p = run("-d", "prod", *args, endpoint=stub.url)
    assert p.returncode == EXIT_USAGE, (args, p.stderr)
    assert "resume-after" in p.stderr, p.stderr
    assert stub.requests == []


def test_maintenance_needs_on_or_off(stub):
    for args in (["maintenance"], ["maintenance", "maybe"], ["maintenance", "on", "off"]):
        p = run("-d", "prod", *args, endpoint=stub.url)
        assert p.returncode == EXIT_USAGE, args
    assert stub.requests == []


def test_maintenance_that_some_proxy_did_not_acknowledge_times_out(stub):
    answer = {"ok": False, "error": "proxy-b did not answer within 2 s", "proxies": [
        {"node_id": "proxy-a", "ok": True, "detail": "maintenance on"},
        {"node_id": "proxy-b", "ok": False, "detail": "no answer"}]}
    stub.route("POST", "/deployments/prod/maintenance", status=504, body=answer)
    p = run("-d", "prod", "maintenance", "on", "--timeout", "2", endpoint=stub.url)
    assert p.returncode == EXIT_TIMEOUT
    assert ["proxy-b", "no", "no answer"] in table(p.stdout)
    err = one_line_error(p)
    assert stub.url in err and "proxy-b did not answer within 2 s" in err and "504" in err


def test_reload_posts_an_empty_object(stub):
    stub.route("POST", "/deployments/prod/reload",
               body={"ok": True, "proxies": [{"node_id": "proxy-a", "ok": True,
                                              "detail": "reloaded"}]})
    p = run("-d", "prod", "reload", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert stub.requests[0]["body"] == {}


def test_an_operation_answered_ok_false_failed(stub):
    stub.route("POST", "/deployments/prod/reload",
               body={"ok": False, "proxies": [
                   {"node_id": "proxy-a", "ok": True, "detail": "reloaded"},
                   {"node_id": "proxy-b", "ok": False, "detail": "pgrelay.ini line 3: bad"}]})
    p = run("-d", "prod", "reload", endpoint=stub.url)
    assert p.returncode == EXIT_FAILED
    assert "proxy-b: pgrelay.ini line 3: bad" in one_line_error(p)


def test_config_apply_sends_the_files_text(stub, tmp_path):
    path = tmp_path / "pgrelay.ini"
    path.write_text(CONFIG_TEXT)
    answer = {"ok": True, "version": 4, "proxies": [
        {"node_id": "proxy-a", "ok": True, "detail": "applied version 4"}]}
    stub.route("POST", "/deployments/prod/config", body=answer)
    p = run("-d", "prod", "config", "apply", str(path), endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert stub.requests[0]["body"] == {"text": CONFIG_TEXT}
    assert "version  4" in p.stdout
    assert ["proxy-a", "yes", "applied version 4"] in table(p.stdout)


def test_config_apply_reads_standard_input_for_dash(stub):
    stub.route("POST", "/deployments/prod/config", body={"ok": True, "version": 5,
                                                          "proxies": []})
    p = run("-d", "prod", "config", "apply", "-", endpoint=stub.url, stdin=CONFIG_TEXT)
    assert p.returncode == EXIT_OK, p.stderr
    assert stub.requests[0]["body"] == {"text": CONFIG_TEXT}


def test_config_apply_refused_shows_every_proxys_answer(stub, tmp_path):
    path = tmp_path / "pgrelay.ini"
    path.write_text(CONFIG_TEXT)
    answer = {"ok": False, "error": "proxy-b refused the configuration", "proxies": [
        {"node_id": "proxy-a", "ok": True, "detail": "prepared"},
        {"node_id": "proxy-b", "ok": False, "detail": "listen_port needs a restart"}]}
    stub.route("POST", "/deployments/prod/config", status=409, body=answer)
    p = run("-d", "prod", "config", "apply", str(path), endpoint=stub.url)
    assert p.returncode == EXIT_FAILED
    assert ["proxy-b", "no", "listen_port needs a restart"] in table(p.stdout)
    err = one_line_error(p)
    assert stub.url in err and "proxy-b refused the configuration" in err and "409" in err
    p = run("-d", "prod", "-o", "json", "config", "apply", str(path), endpoint=stub.url)
    assert p.returncode == EXIT_FAILED and json.loads(p.stdout) == answer


def test_config_apply_of_an_unreadable_file_sends_nothing(stub, tmp_path):
    p = run("-d", "prod", "config", "apply", str(tmp_path / "missing.ini"), endpoint=stub.url)
    assert p.returncode == EXIT_USAGE and "missing.ini" in one_line_error(p)
    bad = tmp_path / "latin1.ini"
    bad.write_bytes(b"[pgrelay]\n; caf\xe9\n")
    p = run("-d", "prod", "config", "apply", str(bad), endpoint=stub.url)
    assert p.returncode == EXIT_USAGE and "UTF-8" in one_line_error(p)
    assert stub.requests == []


def test_config_show_prints_version_text_and_proxy_versions(stub):
    answer = {"version": 4, "text": CONFIG_TEXT, "proxies": [
        {"node_id": "proxy-a", "config_version": 4},
        {"node_id": "proxy-b", "config_version": 3}]}
    stub.route("GET", "/deployments/prod/config", body=answer)
    p = run("-d", "prod", "config", "show", endpoint=stub.url)
    assert p.returncode == EXIT_OK, p.stderr
    assert p.stdout.startswith("version  4\n\n" + CONFIG_TEXT + "\n")
    assert table(p.stdout.split(CONFIG_TEXT + "\n")[1])[-2:] == [["proxy-a", "4"],
                                                                  ["proxy-b", "3"]]
    p = run("-d", "prod", "config", "show", "-o", "json", endpoint=stub.url)
    assert json.loads(p.stdout) == answer


def test_config_needs_a_subcommand(stub):
    p = run("config", endpoint=stub.url)
    assert p.returncode == EXIT_USAGE
    assert "config apply" in p.stderr and "config show" in p.stderr


# --------------------------------------------------------------------------- #
# exit statuses and error messages
# --------------------------------------------------------------------------- #


@pytest.mark.parametrize("status,rc", [
    (400, EXIT_FAILED), (401, EXIT_AUTH), (403, EXIT_AUTH), (404, EXIT_NOT_FOUND),
    (409, EXIT_FAILED), (500, EXIT_UNREACHABLE), (503, EXIT_UNREACHABLE),
    (504, EXIT_TIMEOUT),
])
def test_http_errors_map_to_exit_statuses(stub, status, rc):
    stub.route("GET", "/deployments/prod/nodes", status=status,
               body={"error": f"something {status}"})
    p = run("-d", "prod", "show-nodes", endpoint=stub.url)
    assert p.returncode == rc
    assert p.stdout == ""
    err = one_line_error(p)
    assert stub.url in err and f"something {status}" in err and f"HTTP {status}" in err


def test_a_servers_multi_line_error_is_shown_on_one_line(stub):
    stub.route("GET", "/deployments/prod/nodes", status=409,
               body={"error": "first line\nsecond line"})
    p = run("-d", "prod", "show-nodes", endpoint=stub.url)
    assert p.returncode == EXIT_FAILED
    assert "first line second line" in one_line_error(p)


def test_an_error_answer_without_json_still_gets_its_status(stub):
    stub.route("GET", "/deployments/prod/nodes", status=403, body=b"<html>Forbidden</html>")
    p = run("-d", "prod", "show-nodes", endpoint=stub.url)
    assert p.returncode == EXIT_AUTH and "Forbidden" in one_line_error(p)


GARBAGE = [
    ("GET", "/deployments/prod/proxies", ["show-proxies"], b"<html>hello</html>"),
    ("GET", "/deployments/prod/proxies", ["show-proxies"], b""),
    ("GET", "/deployments/prod/proxies", ["show-proxies"], b'{"truncated": '),
    ("GET", "/deployments/prod/proxies", ["show-proxies"], {"node_id": "not a list"}),
    ("GET", "/deployments/prod/proxies", ["show-proxies"], ["a", "b"]),
    ("GET", "/deployments/prod/nodes", ["show-nodes"], 42),
    ("GET", "/deployments/prod/config", ["config", "show"], {"version": "four", "text": 1}),
    ("GET", "/deployments/prod/config", ["config", "show"], {"version": 1, "text": "x",
                                                              "proxies": {"a": 1}}),
    ("POST", "/deployments/prod/reload", ["reload"], {"proxies": []}),
    ("POST", "/deployments/prod/reload", ["reload"], {"ok": "yes"}),
    ("POST", "/deployments/prod/switchover", ["switchover", "--node", "pg2"],
     {"ok": True, "proxies": ["x"]}),
    ("POST", "/deployments/prod/switchover", ["switchover", "--node", "pg2"], [1, 2, 3]),
    ("POST", "/deployments/prod/switchover", ["switchover", "--node", "pg2"], b"\x00\xff\xfe"),
]


@pytest.mark.parametrize("method,path,args,body", GARBAGE)
def test_a_malformed_answer_is_a_clear_error_not_a_crash(stub, method, path, args, body):
    stub.route(method, path, body=body)
    for fmt in ("table", "json"):
        p = run("-d", "prod", "-o", fmt, *args, endpoint=stub.url)
        assert p.returncode == EXIT_UNREACHABLE, (fmt, p.stdout, p.stderr)
        err = one_line_error(p)
        assert stub.url in err and ("not JSON" in err or "malformed" in err), err


def test_a_malformed_deployment_list_is_a_clear_error(stub):
    stub.route("GET", "/deployments", body=[{"name": 7}])
    p = run("show-proxies", endpoint=stub.url)
    assert p.returncode == EXIT_UNREACHABLE and "malformed" in one_line_error(p)


def test_connection_refused_is_unreachable():
    url = refused_url()
    p = run("show-deployments", endpoint=url)
    assert p.returncode == EXIT_UNREACHABLE
    assert url in one_line_error(p)


def test_no_answer_within_the_timeout_is_a_timeout(stub):
    stub.route("GET", "/deployments/prod/nodes", body=NODES, delay=3)
    start = time.monotonic()
    p = run("--timeout", "0.5", "-d", "prod", "show-nodes", endpoint=stub.url)
    assert p.returncode == EXIT_TIMEOUT
    assert time.monotonic() - start < 2.5
    assert stub.url in one_line_error(p)


# --------------------------------------------------------------------------- #
# several endpoints
# --------------------------------------------------------------------------- #


def test_a_refused_first_endpoint_falls_over_to_the_next(stub):
    stub.route("GET", "/deployments/prod/proxies", body=PROXIES)
    p = run("show-proxies", endpoint=f"{refused_url()},{stub.url}")
    assert p.returncode == EXIT_OK, p.stderr
    assert [r["path"] for r in stub.requests] == [API + "/deployments",
                                                 API + "/deployments/prod/proxies"]


def test_a_503_endpoint_falls_over_to_the_next(stub, stub2):
    stub2.route("GET", "/deployments", status=503, body={"error": "not the lease holder"})
    stub2.route("POST", "/deployments/prod/switchover", status=503,
                body={"error": "not the lease holder"})
    stub.route("POST", "/deployments/prod/switchover", body=SWITCHOVER_OK)
    p = run("switchover", "--node", "pg2", endpoint=f" {stub2.url}/ , {stub.url}")
    assert p.returncode == EXIT_OK, p.stderr
    assert [r["path"] for r in stub2.requests] == [API + "/deployments"]
    # After a working endpoint is found, later requests of the run start there.
    assert [r["path"] for r in stub.requests] == [API + "/deployments",
                                                 API + "/deployments/prod/switchover"]


def test_every_endpoint_failing_names_each(stub2):
    stub2.route("GET", "/deployments", status=503, body={"error": "not the lease holder"})
    refused = refused_url()
    p = run("show-deployments", endpoint=f"{refused},{stub2.url}")
    assert p.returncode == EXIT_UNREACHABLE
    err = one_line_error(p)
    assert refused in err and stub2.url in err and "not the lease holder" in err


def test_an_operation_is_not_sent_twice_after_a_server_error(stub, stub2):
    stub2.route("POST", "/deployments/prod/reload", status=500, body={"error": "store write"})
    stub.route("POST", "/deployments/prod/reload", body={"ok": True, "proxies": []})
    p = run("-d", "prod", "reload", endpoint=f"{stub2.url},{stub.url}")
    assert p.returncode == EXIT_UNREACHABLE
    assert "store write" in one_line_error(p)
    assert stub.requests == []


def test_an_endpoint_that_is_not_a_url_is_a_usage_error():
    p = run("show-deployments", endpoint="127.0.0.1:8080")
    assert p.returncode == EXIT_USAGE and "http://" in p.stderr


# --------------------------------------------------------------------------- #
# command line
# --------------------------------------------------------------------------- #

COMMANDS = ["show-deployments", "show-proxies", "show-nodes", "show-queries", "show-metrics",
            "switchover",
            "maintenance", "config apply", "config show", "reload"]


def test_help_version_and_command_help_need_no_token():
    p = run("--help", token=None)
    assert p.returncode == EXIT_OK
    for command in COMMANDS:
        assert re.search(rf"^  {re.escape(command)}\b", p.stdout, re.M), command
    p = run("-V", token=None)
    assert p.returncode == EXIT_OK and re.fullmatch(r"pgrelayctl \d+\.\d+\.\d+\n", p.stdout)
    p = run("switchover", "--help", token=None)
    assert p.returncode == EXIT_OK
    assert "--node NAME" in p.stdout and "--promote" in p.stdout and "--timeout S" in p.stdout
    p = run("help", "config", "apply", token=None)
    assert p.returncode == EXIT_OK and "FILE" in p.stdout


@pytest.mark.parametrize("args", [[], ["frobnicate"], ["-o", "yaml", "show-nodes"],
                                  ["--timeout", "soon", "show-nodes"], ["--bogus"],
                                  ["show-nodes", "extra"],
                                  ["switchover", "--node", "pg2", "--timeout", "0"]])
def test_usage_errors_exit_2(args):
    p = run(*args, endpoint=refused_url())
    assert p.returncode == EXIT_USAGE, (args, p.stderr)
    assert p.stdout == ""


def test_verbose_shows_the_requests_on_stderr(stub):
    stub.route("GET", "/deployments/prod/nodes", body=NODES)
    p = run("-v", "-d", "prod", "show-nodes", endpoint=stub.url)
    assert p.returncode == EXIT_OK
    assert f"GET {stub.url}{API}/deployments/prod/nodes" in p.stderr
    assert "HTTP 200" in p.stderr
    assert TOKEN not in p.stderr
    p = run("-vv", "-d", "prod", "show-nodes", endpoint=stub.url)
    assert p.returncode == EXIT_OK
    assert "> GET /api/v1/deployments/prod/nodes" in p.stderr and "< HTTP/1" in p.stderr
    assert "Authorization: Bearer (hidden)" in p.stderr and TOKEN not in p.stderr


# --------------------------------------------------------------------------- #
# the manual page
# --------------------------------------------------------------------------- #


def man_text():
    with open(MAN1) as f:
        return f.read().replace("\\-", "-").replace("\\fB", "").replace("\\fR", "").replace(
            "\\fI", "")


def test_man_page_documents_every_command_option_variable_and_status():
    text = man_text()
    for command in COMMANDS:
        assert command in text, command
    for option in ["--endpoint", "--token", "--deployment", "-d", "-o", "--output",
                   "--timeout", "-v", "--verbose", "-V", "--version", "-h", "--help", "--node",
                   "--promote"]:
        assert re.search(rf"(?<![\w-]){re.escape(option)}(?![\w-])", text), option
    for var in ["PGRELAYCTL_ENDPOINT", "PGRELAYCTL_TOKEN", "PGRELAYCTL_DEPLOYMENT"]:
        assert var in text, var
    section = text.split("EXIT STATUS")[1]
    for status in range(7):
        assert re.search(rf"^\.TP\n\.?B?\s*{status}\n", section, re.M), status


def test_man_page_formats_without_warnings():
    require(shutil.which("groff"), "groff is not installed (make deps installs groff-base)")
    p = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", MAN1], capture_output=True,
                       text=True, timeout=30)
    assert p.returncode == 0 and p.stderr == "", p.stderr


# --------------------------------------------------------------------------- #
# against the real control plane (when it is built)
# --------------------------------------------------------------------------- #


def control_usable():
    """bin/pgrelay-control is built and takes -c FILE (as pgrelay and pgrelay-agent do)."""
    if not os.access(CONTROL_BIN, os.X_OK):
        return False
    try:
        p = subprocess.run([CONTROL_BIN, "--help"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return p.returncode == 0 and "-c" in p.stdout


def http_status(url, body=None, token=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body else None,
                                 method="POST" if body else "GET")
    req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def test_smoke_against_pgrelay_control(request, tmp_path):
    assert control_usable(), f"{CONTROL_BIN} is not built or does not start (make builds it)"
    pg = request.getfixturevalue("pg")
    pg.query("DROP DATABASE IF EXISTS pgrelayctl_smoke")
    pg.query("CREATE DATABASE pgrelayctl_smoke")
    port = free_port()
    conf = tmp_path / "control.ini"
    conf.write_text(
        "[control]\n"
        f"listen_addr = 127.0.0.1\nlisten_port = {port}\n"
        f"store = host={pg.host} port={pg.port} user=postgres dbname=pgrelayctl_smoke\n"
        f"admin_tokens = {TOKEN}\n"
        "auto_declare = on\n"
        "\n[deployment.smoke]\ntoken = smoke-agent-token\n"
    )
    log = open(tmp_path / "control.log", "w")
    proc = subprocess.Popen([CONTROL_BIN, "-c", str(conf)], stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for(lambda: http_status(url + "/readyz") == 200, timeout=15,
                 what="pgrelay-control to be ready")
        assert http_status(url + API + "/agent/register", token="smoke-agent-token", body={
            "node_id": "smoke-a", "hostname": "smoke-host", "version": "0.1.0",
            "listen": ["127.0.0.1:6432"], "config_version": 0, "epoch": 1, "leader": "pg1",
            "maintenance": False}) == 200

        p = run("-o", "json", "show-deployments", endpoint=url)
        assert p.returncode == EXIT_OK, p.stderr
        [dep] = [d for d in json.loads(p.stdout) if d["name"] == "smoke"]
        assert dep["proxies"] == 1

        p = run("-o", "json", "-d", "smoke", "show-proxies", endpoint=url)
        assert p.returncode == EXIT_OK, p.stderr
        [proxy] = json.loads(p.stdout)
        assert proxy["node_id"] == "smoke-a" and proxy["hostname"] == "smoke-host"
        p = run("-d", "smoke", "show-proxies", endpoint=url)
        assert p.returncode == EXIT_OK and table(p.stdout)[1][:2] == ["smoke-a", "smoke-host"]

        for args in (["show-nodes"], ["show-queries"], ["config", "show"], ["show-metrics"]):
            p = run("-d", "smoke", *args, endpoint=url)
            assert p.returncode == EXIT_OK, (args, p.stderr)
        # a registered proxy with no metrics yet: its row is there, its rates unknown
        rows = table(run("-d", "smoke", "show-metrics", endpoint=url).stdout)
        assert rows[1][:3] == ["smoke-a", "(all)", "yes"] and rows[1][4:] == ["-"] * 6, rows

        assert run("show-deployments", endpoint=url, token="wrong").returncode == EXIT_AUTH
        assert run("show-deployments", endpoint=url,
                   token="smoke-agent-token").returncode == EXIT_AUTH
        assert run("-d", "nosuch", "show-proxies", endpoint=url).returncode == EXIT_NOT_FOUND
        # The real server behind a refused first endpoint.
        p = run("-d", "smoke", "show-proxies", endpoint=f"{refused_url()},{url}")
        assert p.returncode == EXIT_OK, p.stderr
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
