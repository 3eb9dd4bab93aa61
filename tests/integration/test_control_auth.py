"""pgrelay-control: health endpoints, authentication and malformed requests.

Every test gets its own store (a fresh database in the session's PostgreSQL 15) and its own
bin/pgrelay-control (or $PGRELAY_CONTROL_BIN, e.g. the AddressSanitizer build) started from a
generated control.ini; agents are simulated with Python HTTP clients (SimAgent) that register,
upload metrics and long-poll for commands in a thread, answering each command as the test's
policy says (control_helpers.py). What is asserted is what agents, operators and pgrelayctl
rely on:

  * /healthz, /readyz and the store's schema;
  * authentication: 401 (nothing recorded), 403 for a token of the wrong kind, 400 for
    malformed requests, 404 for unknown things, 405 for wrong methods.
"""

import pytest

from conftest import http_call as call
from control_helpers import (  # noqa: F401,F811 (fixtures used by name)
    ADMIN,
    API,
    TOKENS,
    agents,
    control,
    control_factory,
    obs,
    store,
    store_rows,
)


# --------------------------------------------------------------------------- #
# health, authentication, malformed requests
# --------------------------------------------------------------------------- #


def test_healthz_readyz_and_schema_in_the_store(control, store):
    assert control.call("GET", "/healthz") == (200, "ok\n")
    assert control.call("GET", "/readyz") == (200, "ready\n")
    tables = {r[0] for r in store_rows(
        store, "SELECT table_name FROM information_schema.tables WHERE table_schema = 'pgrelay'")}
    assert {"deployments", "proxies", "commands", "command_acks", "config_versions",
            "leadership", "lease", "schema_version"} <= tables
    assert {r[0] for r in store_rows(store, "SELECT name FROM pgrelay.deployments")} == {
        "prod", "stage"}


def test_missing_or_wrong_token_is_401_and_nothing_is_recorded(control, store):
    body = {"node_id": "intruder", "hostname": "x"}
    for headers in ({}, {"Authorization": "Bearer wrong-token-123"},
                    {"Authorization": "Basic " + TOKENS["prod"]},
                    {"Authorization": "Bearer"}):
        status, answer = call(control.port, "POST", API + "/agent/register", body,
                              headers=headers)
        assert status == 401 and "error" in answer, (headers, answer)
        status, answer = call(control.port, "POST", API + "/agent/metrics", body,
                              headers=headers)
        assert status == 401
    assert control.call("GET", API + "/deployments", token="wrong-token-123")[0] == 401
    assert control.call("GET", API + "/deployments")[0] == 401
    assert control.proxies() == {}
    assert store_rows(store, "SELECT count(*) FROM pgrelay.proxies") == [(0,)]


def test_deployment_token_on_operator_endpoint_is_403_and_admin_token_on_agent_is_403(control):
    status, answer = control.call("GET", API + "/deployments", token=TOKENS["prod"])
    assert status == 403 and "error" in answer
    status, _ = control.call("POST", API + "/deployments/prod/maintenance", {"on": True},
                             token=TOKENS["prod"])
    assert status == 403
    status, _ = control.call("POST", API + "/agent/register", {"node_id": "a"}, token=ADMIN)
    assert status == 403
    # the second admin token of the list works too
    assert control.call("GET", API + "/deployments", token="other-admin-token")[0] == 200


@pytest.mark.parametrize("path, raw", [
    ("/agent/register", b"{not json"),
    ("/agent/register", b"[1, 2]"),
    ("/agent/register", b""),
    ("/agent/register", b'{"hostname": "h"}'),
    ("/agent/register", b'{"node_id": 7}'),
    ("/agent/register", b'{"node_id": "has space"}'),
    ("/agent/register", b'{"node_id": "a", "listen": "127.0.0.1:6432"}'),
    ("/agent/metrics", b'{"node_id": "a", "clients": "many"}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": {"name": "pg1"}}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": [{"health": "up"}]}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": [{"name": "pg1", "in_recovery": "no"}]}'),
    ("/agent/metrics", b'{"node_id": "a", "epoch": -1}'),
    ("/agent/metrics", b'{"node_id": "a", "latency_us": -5}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": [{"name": "pg1", "statements_completed": 1.5}]}'),
    ("/agent/metrics", b'{"node_id": "a", "nodes": [{"name": "pg1", "bytes_out": "lots"}]}'),
    ("/agent/queries", b'{"node_id": "a"}'),
    ("/agent/queries", b'{"node_id": "a", "queries": [42]}'),
    ("/agent/config", b'{"node_id": "a", "config_version": 1}'),
    ("/agent/schema", b'{"node_id": "a", "tables": []}'),
    ("/agent/commands/1/ack", b'{"node_id": "a"}'),
    ("/agent/commands/1/ack", b'{"node_id": "a", "ok": "yes"}'),
    ("/agent/metrics", b'{"node_id": "a", "clients": 1e400}'),
    ("/agent/metrics", b'\xff\xfe{"node_id": "a"}'),
])
def test_malformed_agent_requests_are_400(control, path, raw):
    status, answer = control.call("POST", API + path, token=TOKENS["prod"], raw=raw)
    assert status == 400, answer
    assert isinstance(answer, dict) and answer["error"]
    assert control.proxies() == {}


def test_malformed_operator_requests_and_queries_are_400(control):
    for path, body in [("/deployments/prod/maintenance", {}),
                       ("/deployments/prod/maintenance", {"on": "yes"}),
                       ("/deployments/prod/maintenance", {"on": True, "timeout_s": 0}),
                       ("/deployments/prod/switchover", {"promote": True}),
                       ("/deployments/prod/switchover", {"node": 2}),
                       ("/deployments/prod/config", {"text": None}),
                       ("/deployments/prod/config", {"text": ["a"]})]:
        status, answer = control.admin("POST", path, body)
        assert status == 400, (path, body, answer)
    for query in ("", "?wait_s=1", "?node_id=a&wait_s=soon", "?node_id=a&wait_s=-1"):
        status, answer = control.agent("GET", "/commands" + query)
        assert status == 400, (query, answer)


def test_unknown_things_are_404_and_wrong_methods_405(control, agents):
    a = agents(control, "proxy-a", poll=False)
    assert control.admin("GET", "/deployments/nosuch/proxies")[0] == 404
    assert control.admin("POST", "/deployments/nosuch/maintenance", {"on": True})[0] == 404
    assert control.call("GET", "/nothing/here")[0] == 404
    assert a.ack(424242)[0] == 404
    assert a.ack("12abc")[0] == 404
    assert control.call("DELETE", API + "/deployments", token=ADMIN)[0] == 405
    assert control.call("GET", API + "/agent/register", token=TOKENS["prod"])[0] == 405
    a.metrics(nodes=[obs("pg1")])
    status, answer = control.admin("POST", "/deployments/prod/switchover", {"node": "pg9"})
    assert status == 404 and "pg9" in answer["error"]
