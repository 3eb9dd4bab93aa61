"""The relay under ordinary but awkward use: pauses, extended-protocol COPY, half-closed and
terminated clients, sessions closed mid-message, held sessions whose client left."""

import os
import socket
import struct
import threading
import time

import psycopg
import pytest

from conftest import RawClient, admin, admin_json, data_rows, error_fields, wait_for

CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    with open(f"/proc/{pid}/stat") as f:
        stat = f.read()
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def one_worker(relay):
    (pid,) = wait_for(lambda: relay.worker_pids() if len(relay.worker_pids()) == 1 else None,
                      what="the one worker")
    return pid


def clients_named(relay, app):
    return [c for c in admin_json(relay, "show clients") if c["application_name"] == app]


def paused(relay):
    assert admin(relay, "pause").startswith("maintenance on")
    wait_for(lambda: admin_json(relay, "show info")["maintenance"] == "on", what="pause")


# --------------------------------------------------------------------------- #
# item 2: a paused idle session costs no CPU
# --------------------------------------------------------------------------- #


def test_pause_holding_an_idle_session_leaves_the_worker_idle(relay_factory):
    r = relay_factory(workers=1)
    pid = one_worker(r)
    with r.connect(application_name="held-idle") as c:
        c.execute("SELECT 1")
        paused(r)
        try:
            before, t0 = cpu_seconds(pid), time.monotonic()
            time.sleep(2)  # the measurement window, not synchronisation
            used, elapsed = cpu_seconds(pid) - before, time.monotonic() - t0
        finally:
            admin(r, "resume")
        # the old code waited for EV_WRITE on an always-writable socket: ~100% of a core
        assert used < 0.2 * elapsed, f"worker used {used:.2f}s CPU in {elapsed:.2f}s while paused"
        assert c.execute("SELECT 2").fetchone() == (2,)
