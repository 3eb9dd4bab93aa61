"""Fixtures of the Patroni suite: those of tests/integration (suite.py), and ``stack``.

tests/patroni runs in its own pytest invocation (make test-patroni); helpers such as cluster.py
import from the module ``conftest``, which here is this file: it offers every name of
tests/integration/suite.py, as tests/integration/conftest.py does.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "integration")))

from suite import *  # noqa: E402,F401,F403

import pytest  # noqa: E402

from patroni_cluster import Stack  # noqa: E402  (it imports from conftest: after suite)


@pytest.fixture(scope="session")
def stack():
    """One etcd, three Patroni members, pgrelay and HAProxy, shared by every scenario (each
    starts with Stack.reset()); their logs' tails are printed when it fails to start."""
    s = Stack.start()
    yield s
    s.stop()
