"""pgrelay-control: the command long poll.

Every test gets its own store (a fresh database in the session's PostgreSQL 15) and its own
bin/pgrelay-control (or $PGRELAY_CONTROL_BIN, e.g. the AddressSanitizer build) started from a
generated control.ini; agents are simulated with Python HTTP clients (SimAgent) that register,
upload metrics and long-poll for commands in a thread, answering each command as the test's
policy says (control_helpers.py). What is asserted is what agents, operators and pgrelayctl
rely on:

  * the long poll answers at once when a command waits, after wait_s otherwise; a command is
    delivered again until acknowledged, also across a restart of the control plane.
"""

import time

from conftest import wait_for
from control_helpers import (  # noqa: F401,F811 (fixtures used by name)
    ADMIN,
    API,
    Background,
    SimAgent,
    TOKENS,
    control,
    control_factory,
    store,
)


# --------------------------------------------------------------------------- #
# the command long poll
# --------------------------------------------------------------------------- #


def test_long_poll_returns_an_empty_list_after_wait_s(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    # the answer also carries the deployment's leader and epoch (none yet here)
    idle = (200, {"commands": [], "leader": None, "epoch": 0})
    t = time.monotonic()
    assert a.poll(wait_s=0) == idle
    assert time.monotonic() - t < 0.5
    t = time.monotonic()
    assert a.poll(wait_s=1) == idle
    assert 0.9 <= time.monotonic() - t < 3


def test_long_poll_answers_at_once_when_a_command_is_queued_and_redelivers_until_acked(control):
    a = SimAgent(control, "proxy-a")
    a.register()
    poll = Background(control.port, "GET", API + "/agent/commands?node_id=proxy-a&wait_s=30",
                      token=TOKENS["prod"], timeout=40)
    wait_for(lambda: control.polling("proxy-a"), what="the poll to be parked")
    assert not poll.done()
    op = Background(control.port, "POST", API + "/deployments/prod/reload", {"timeout_s": 20},
                    token=ADMIN, timeout=40)
    status, body = poll.result()
    assert status == 200 and poll.elapsed < 5
    [cmd] = body["commands"]
    assert cmd["type"] == "reload" and cmd["args"] == {} and isinstance(cmd["id"], int)
    # not acknowledged: a proxy that lost the answer gets it again
    assert a.poll(wait_s=0)[1]["commands"] == [cmd]
    assert not op.done()
    assert a.ack(cmd["id"], True, "reloaded") == (204, "")
    status, answer = op.result()
    assert status == 200 and answer["ok"] is True
    assert answer["proxies"] == [{"node_id": "proxy-a", "ok": True, "detail": "reloaded"}]
    assert a.poll(wait_s=0)[1]["commands"] == []
    assert a.ack(cmd["id"], True, "again") == (204, "")  # a repeated ack is harmless


def test_commands_survive_a_restart_of_the_control_plane(control_factory, store):
    c1 = control_factory()
    a = SimAgent(c1, "proxy-a")
    a.register()
    assert c1.admin("POST", "/deployments/prod/reload", {"timeout_s": 1})[0] == 504
    assert c1.stop() == 0
    c2 = control_factory()
    a.control = c2
    [cmd] = a.poll(wait_s=0)[1]["commands"]
    assert cmd["type"] == "reload"
    assert a.ack(cmd["id"]) == (204, "")
    assert "proxy-a" in c2.proxies()
