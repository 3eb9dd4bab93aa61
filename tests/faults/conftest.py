"""Fixtures of the fault-injection suite: those of tests/integration (suite.py), the same objects.

tests/faults runs in its own pytest invocation (make test); helpers such as cluster.py and
control_e2e_helpers.py import from the module ``conftest``, which here is this file: it
offers every name of tests/integration/suite.py, as tests/integration/conftest.py does.
"""

import os
import sys

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "integration")))

from suite import *  # noqa: E402,F401,F403
