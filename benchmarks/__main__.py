"""``python -m benchmarks [--device cpu|cuda] [--quick] [--only NAME ...] [--out DIR] [--budget-s S]``.

A thin entry point over :mod:`getfast.bench` (see ``python -m benchmarks --help``); ``names()``
lists the CPU benchmarks.
"""
from __future__ import annotations

import sys

from getfast.bench import names  # noqa: F401  (re-exported)
from getfast.bench.runner import main as _main


def main(argv=None) -> int:
    return _main(argv, prog="python -m benchmarks")


if __name__ == "__main__":
    sys.exit(main())
