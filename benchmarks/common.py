"""Kept for modules that import ``benchmarks.common``: the helpers live in :mod:`getfast.bench.common`."""
from getfast.bench.common import *  # noqa: F401,F403
from getfast.bench.common import Skipped, set_output, source_checkout  # noqa: F401
