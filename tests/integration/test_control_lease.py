"""pgrelay-control: leases between two replicas of the control plane.

Every test gets its own store (a fresh database in the session's PostgreSQL 15) and its own
bin/pgrelay-control (or $PGRELAY_CONTROL_BIN, e.g. the AddressSanitizer build) started from a
generated control.ini; agents are simulated with Python HTTP clients (SimAgent) that register,
upload metrics and long-poll for commands in a thread, answering each command as the test's
policy says (control_helpers.py). What is asserted is what agents, operators and pgrelayctl
rely on:

  * only the lease holder is ready; kill -9 of the holder hands the lease over; a stopping
    holder gives it up.
"""

import time

from conftest import SCHED_SLACK, wait_for
from control_helpers import (  # noqa: F401,F811 (fixtures used by name)
    ADMIN,
    API,
    SimAgent,
    control_factory,
    store,
)


# --------------------------------------------------------------------------- #
# leases
# --------------------------------------------------------------------------- #

LEASE = {"enabled": "on", "lease_duration_secs": 3, "lease_interval_secs": 1,
         "release_timeout_secs": 2}


def test_only_the_lease_holder_is_ready_and_kill9_hands_over(control_factory):
    first = control_factory(lease=LEASE)
    second = control_factory(lease=LEASE, wait_ready=False)
    wait_for(lambda: any(line.startswith("pgrelay_control_lease_holder{")
                         for line in second.metrics_lines()),
             what="the second replica to have read the lease")
    assert first.ready() and not second.ready()
    status, answer = second.call("GET", API + "/deployments", token=ADMIN)
    assert status == 503 and answer == {"error": "not the lease holder"}
    status, text = second.call("GET", "/readyz")
    assert status == 503 and "lease" in text
    assert second.call("GET", "/healthz")[0] == 200
    _, metrics = second.call("GET", "/metrics")
    assert "pgrelay_control_serving 0" in metrics.splitlines()
    assert any(line.startswith("pgrelay_control_lease_holder{") for line in metrics.splitlines())

    SimAgent(first, "proxy-a").register(hostname="before-failover")
    first.kill9()
    t = time.monotonic()
    # promised: the lease expires, and the next renewal tick takes it (then the state load
    # and the recovery, a few statements); a loaded machine may add SCHED_SLACK
    promised = LEASE["lease_duration_secs"] + LEASE["lease_interval_secs"]
    wait_for(second.ready, timeout=promised + SCHED_SLACK, interval=0.1,
             what="the second replica to take the lease over")
    took = time.monotonic() - t
    assert took <= promised + SCHED_SLACK
    # the new holder knows what the old one stored
    assert second.proxies()["proxy-a"]["hostname"] == "before-failover"


def test_a_stopping_holder_gives_the_lease_up(control_factory):
    first = control_factory(lease=LEASE)
    second = control_factory(lease=LEASE, wait_ready=False)
    assert first.stop() == 0
    assert "released" in first.log()
    t = time.monotonic()
    wait_for(second.ready, timeout=4, interval=0.1, what="take-over after a release")
    assert time.monotonic() - t < LEASE["lease_duration_secs"]
