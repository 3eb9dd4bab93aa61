"""Fixtures of the Patroni suite: those of tests/integration, shared as they are, and ``stack``.

tests/patroni runs in its own pytest invocation (make test-patroni), so its conftest is the
module ``conftest`` that cluster.py imports from; it takes every name of
tests/integration/conftest.py (fixtures, hooks, helpers) so that they find what they need.
"""

import importlib.util
import os
import sys

_INTEGRATION = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "integration"))
sys.path.insert(0, _INTEGRATION)

_spec = importlib.util.spec_from_file_location(
    "pgrelay_integration_conftest", os.path.join(_INTEGRATION, "conftest.py"))
_integration = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_integration)
globals().update({k: v for k, v in vars(_integration).items()
                  if not (k.startswith("__") and k.endswith("__"))})

import pytest  # noqa: E402

from patroni_cluster import Stack  # noqa: E402


@pytest.fixture(scope="session")
def stack():
    """One etcd, three Patroni members, pgrelay and HAProxy, shared by every scenario (each
    starts with Stack.reset()); their logs' tails are printed when it fails to start."""
    s = Stack.start()
    yield s
    s.stop()
