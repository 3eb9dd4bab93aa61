"""A step of the wall clock (NTP stepping at boot, `date -s`, a VM resumed) on the proxy host.

Invariant: durations and deadlines are measured on CLOCK_MONOTONIC, so a step of the wall
clock neither stretches nor cuts short anything an operator configured or reads as a
duration: the agent still notices a silent control plane after control_grace_period, and a
statement running across the step is counted with its real latency (not an hour), in
`show latency` and in `show queries`.

The step is made with libfaketime (Debian's libfaketime, preloaded into pgrelay and so into its
agent): its offset is read from a file at every call (FAKETIME_NO_CACHE), and CLOCK_MONOTONIC
is left alone (FAKETIME_DONT_FAKE_MONOTONIC), as the kernel does when the wall clock is set.
"""

import os
import re
import subprocess
import tempfile
import threading
import time

import pytest

from conftest import PGRELAY_BIN, admin_json, require, wait_for
from control_helpers import FakeControl

FAKETIME_LIB = "/usr/lib/x86_64-linux-gnu/faketime/libfaketimeMT.so.1"
HOUR = 3600


def sanitizer_runtimes():
    """The sanitizer runtimes pgrelay is linked with (make SANITIZE=address): they must come
    first in LD_PRELOAD, before libfaketime, or the sanitizer refuses to start."""
    out = subprocess.run(["ldd", PGRELAY_BIN], capture_output=True, text=True).stdout
    return [line.split("=>")[1].split()[0] for line in out.splitlines()
            if "=>" in line and re.search(r"lib[at]san\.so", line)]


@pytest.fixture
def wall_clock():
    """(environment for pgrelay, step(seconds)): step() moves the wall clock the preloaded
    processes see by that many seconds from the real one."""
    require(os.path.exists(FAKETIME_LIB), f"libfaketime ({FAKETIME_LIB}); make deps installs it")
    fd, path = tempfile.mkstemp(prefix="pgrelay-faketime-")
    os.write(fd, b"+0\n")
    os.close(fd)
    os.chmod(path, 0o644)

    def step(seconds):
        tmp = path + ".new"
        with open(tmp, "w") as f:
            f.write(f"{seconds:+d}\n")
        os.rename(tmp, path)  # never a half-written offset

    env = {"LD_PRELOAD": " ".join(sanitizer_runtimes() + [FAKETIME_LIB]),
           "FAKETIME_TIMESTAMP_FILE": path, "FAKETIME_NO_CACHE": "1",
           "FAKETIME_DONT_FAKE_MONOTONIC": "1"}
    yield env, step
    os.unlink(path)


@pytest.fixture
def fake_control():
    fake = FakeControl("healthy")
    yield fake
    fake.close()


def test_a_silent_control_plane_is_noticed_after_the_grace_period_across_a_step_back(
        relay_factory, wall_clock, fake_control):
    env, step = wall_clock
    relay = relay_factory(env=env, sections={
        "agent": {"health_interval": "200ms", "control_lost": "stop_writes"},
        "control": {"endpoint": fake_control.url, "token": "t0ken-for-a-fake",
                    "request_timeout": "1s", "metrics_interval": "100ms",
                    "control_grace_period": "2s"},
    })
    t0 = time.monotonic()
    wait_for(lambda: len(fake_control.reporter_requests(t0)) >= 3, timeout=15,
             what="the agent to report to the control plane")
    wait_for(lambda: admin_json(relay, "show info")["write_leader"] == "pg1", timeout=10,
             what="the agent to route to pg1")
    # the control plane stops answering; once the agent is waiting on it (its last answer
    # taken on the old wall clock), the wall clock goes back an hour
    fake_control.mode = "hang"
    silent = time.monotonic()
    wait_for(lambda: fake_control.reporter_requests(silent), timeout=10,
             what="a report to hang")
    step(-HOUR)
    wait_for(lambda: "control plane unreachable for more than control_grace_period"
             in relay.log(), timeout=20, what="the agent to notice the silent control plane")
    noticed = time.monotonic() - silent
    # control_lost = stop_writes: no write leader until the control plane is back
    wait_for(lambda: admin_json(relay, "show info")["write_leader"] in (None, "", "none"),
             timeout=10, what="writes to stop")
    assert noticed >= 2.0 - 0.2, f"noticed after {noticed:.1f} s, before the 2 s grace"


def test_a_statement_across_a_step_forward_counts_its_real_latency(relay_factory, wall_clock):
    env, step = wall_clock
    relay = relay_factory(env=env, sections={"agent": {"health_interval": "200ms"}})
    wait_for(lambda: admin_json(relay, "show info")["write_leader"] == "pg1", timeout=10,
             what="the agent to route to pg1")
    done = threading.Event()
    errors = []

    def sleeper():
        try:
            with relay.connect() as c:
                c.execute("SET application_name = 'clock-step'")
                c.execute("SELECT pg_sleep(2)")
        except Exception as e:  # reported by the test below
            errors.append(e)
        finally:
            done.set()

    t = threading.Thread(target=sleeper)
    t.start()
    try:
        def sleeping():
            return [c for c in admin_json(relay, "show clients")
                    if "pg_sleep" in (c.get("statement") or "")]

        running = wait_for(sleeping, timeout=10, what="the statement to run")
        step(+HOUR)
        time.sleep(0.3)  # a moment of the statement passes on the stepped clock
        rows = sleeping()
        assert rows, running
        for c in rows:
            assert c["statement_ms"] is not None and c["statement_ms"] < 60_000, c
            assert c["connected_s"] < 60, c
    finally:
        assert done.wait(15), "pg_sleep(2) did not end"
        t.join()
    assert not errors, errors
    [pg1] = [r for r in admin_json(relay, "show latency") if r["node"] == "pg1"]
    assert pg1["statements"] >= 2, pg1  # the SET and the pg_sleep at least
    # the 2 s statement, not an hour: all of pg1's statements together took under a minute
    assert pg1["avg_ms"] * pg1["statements"] < 60_000, pg1
