"""A shutdown signal that reaches a child in the moment after fork() is not lost.

The master blocks its signals across fork(); the child drops the master's handlers and only
then unblocks. Without that, a SIGTERM passed on to a worker (or to the agent before its
exec) while the child still had the master's handler ran that handler in the child, set the
child's own flag, and was lost: the master waited shutdown_timeout + 5 s and then killed it.

PGRELAY_TEST_CHILD_DELAY_MS (a test hook, see pgrelay(8)) holds every new child for that long
before it resets its handlers, so that the signal lands in the window every time.
"""

import signal
import time

import pytest

from conftest import wait_for

CHILD_DELAY_MS = 1500


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_shutdown_signal_during_a_childs_first_moments_is_not_lost(relay_factory, sig):
    relay = relay_factory(shutdown_timeout="4s", workers=3, agent="on",
                          env={"PGRELAY_TEST_CHILD_DELAY_MS": str(CHILD_DELAY_MS)})
    # The master answers its admin socket before its children have left the window.
    wait_for(lambda: "test hook" in relay.log(), timeout=10, what="the hook's warning")
    started = time.monotonic()
    relay.signal(sig)
    rc = relay.wait_exit(timeout=30)
    elapsed = time.monotonic() - started
    log = relay.log()
    assert rc == 0, log
    assert "still running after the shutdown deadline" not in log, log
    # No session is open: the stop takes at most the children's delay, not shutdown_timeout (4 s,
    # and the master's kill deadline 5 s later).
    assert elapsed < 4.0, f"stopping took {elapsed:.1f}s:\n{log}"


def test_the_child_delay_hook_is_off_unless_set(relay_factory):
    relay = relay_factory(agent="off")
    assert "test hook" not in relay.log()
