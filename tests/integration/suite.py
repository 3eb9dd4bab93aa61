"""Everything the suites' conftest.py files offer: fixtures, hooks and helpers, in one place.

tests/integration, tests/faults, tests/patroni and tests/browser each have a conftest.py
that is ``from suite import *`` (the others put tests/integration on sys.path first): one
module, loaded once, so that ``from conftest import NAME`` finds the same object in every
suite. The helpers live in modules by concern:

procs.py        processes and ports (wait_for, free_port, on_a_free_port, start_on_free_port)
rawclient.py    RawClient, the PostgreSQL protocol on a plain socket
pgserver.py     the session's PostgreSQL 15 (``pg``)
relays.py       pgrelay under test (``relay``, ``relay_factory``, ``daemons``), its console

and, imported by the tests that use them (not re-exported here):

cluster.py      a primary with streaming replicas (``make_cluster``), pgrelay with its agent
loadgen.py      InThread (work in a background thread), Writer (writes in a loop)
control_helpers.py  pgrelay-control with simulated agents

Here: the watchdog (``@pytest.mark.deadline(seconds)``, default DEFAULT_TEST_TIMEOUT), the
pgrelay logs appended to a failure's report, and sanitizer reports failing a test.
"""

import os
import signal
import sys

import pytest

# the helper modules' asserts explain themselves in a failure report, as a conftest's do (when
# registered before their first import)
pytest.register_assert_rewrite("procs", "rawclient", "pgserver", "relays", "cluster", "loadgen",
                               "control_helpers", "failover_helpers")

from pgserver import *  # noqa: E402,F401,F403
from pgserver import __all__ as _pgserver_all  # noqa: E402
from procs import *  # noqa: E402,F401,F403
from procs import __all__ as _procs_all  # noqa: E402
from rawclient import *  # noqa: E402,F401,F403
from rawclient import __all__ as _rawclient_all  # noqa: E402
from relays import *  # noqa: E402,F401,F403
from relays import _LIVE_RELAYS, __all__ as _relays_all  # noqa: E402

DEFAULT_TEST_TIMEOUT = 120  # seconds; per-test watchdog (see pytest_runtest_call)

SANITIZER_DIR = os.environ.get("PGRELAY_SANITIZER_DIR")


@pytest.fixture(autouse=True)
def no_sanitizer_reports():
    """Under `make SANITIZE=... test`: a sanitizer report written by any of our processes while
    a test ran fails that test, with the report."""
    yield
    if not SANITIZER_DIR or not os.path.isdir(SANITIZER_DIR):
        return
    reports = sorted(f for f in os.listdir(SANITIZER_DIR) if not f.endswith(".seen"))
    texts = []
    for name in reports:
        path = os.path.join(SANITIZER_DIR, name)
        with open(path, errors="replace") as f:
            texts.append(f"---- {name}\n{f.read()}")
        os.rename(path, path + ".seen")
    assert not texts, "sanitizer reports:\n" + "\n".join(texts)


# --------------------------------------------------------------------------- #
# reporting and watchdog
# --------------------------------------------------------------------------- #


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "deadline(seconds): per-test watchdog (default %d s)" % DEFAULT_TEST_TIMEOUT
    )


class DeadlineExceeded(Exception):
    pass


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item):
    """Fail a test (instead of hanging the suite) when it exceeds its deadline."""
    marker = item.get_closest_marker("deadline")
    seconds = marker.args[0] if marker else DEFAULT_TEST_TIMEOUT

    def on_alarm(signum, frame):
        raise DeadlineExceeded(f"test exceeded its {seconds}s deadline")

    old = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.failed:
        for r in list(_LIVE_RELAYS):
            report.sections.append(
                (f"pgrelay log (port {r.port}, {r.log_path}) tail", r.log_tail())
            )


def pytest_sessionfinish(session, exitstatus):
    """A pgrelay still running at the end of the session was left by a start that failed
    half-way (e.g. control_e2e_helpers.start_proxy: up, but never ready): SIGKILL its process
    group, so that it does not outlive the run on a shared machine, and say so."""
    left = [r for r in _LIVE_RELAYS if r.proc.poll() is None]  # not reaped: pid not reused
    for r in left:
        r.kill()
        print(f"\nsuite: killed pgrelay {r.pid} ({r.conf_path}), left running by its test",
              file=sys.stderr)
    _LIVE_RELAYS.clear()


# every name, the private ones that helpers import from conftest included
__all__ = sorted({*_pgserver_all, *_procs_all, *_rawclient_all, *_relays_all,
                  "DEFAULT_TEST_TIMEOUT", "SANITIZER_DIR", "no_sanitizer_reports",
                  "pytest_configure", "DeadlineExceeded", "pytest_runtest_call",
                  "pytest_runtest_makereport", "pytest_sessionfinish"})
