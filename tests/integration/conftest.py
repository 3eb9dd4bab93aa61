"""Fixtures, hooks and helpers of the pgrelay integration suite: all of suite.py.

Everything runs against real processes: a throwaway PostgreSQL 15 cluster (one per test
session, ``pg``) and pgrelay binaries started from generated configs (``relay``,
``relay_factory``, ``daemons``). The helpers live in modules by concern (see suite.py);
``from conftest import NAME`` keeps working for every one of them.
"""

from suite import *  # noqa: F401,F403
