"""Fixtures of the browser suite: those of tests/integration, shared as they are.

tests/browser runs in its own pytest invocation (make test), so its conftest is the module
``conftest`` that cluster.py and control_e2e_helpers.py import from; it takes every name of
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
