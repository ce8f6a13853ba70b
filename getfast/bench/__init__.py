"""getfast benchmarks: kernels and end-to-end paths, measured side by side in one process.

The command line (``python -m benchmarks``, ``getfast bench``, ``python -m getfast.bench``) and the
benchmark set are described in :mod:`getfast.bench.config`; :mod:`getfast.bench.runner` runs them.

Library use: ``run(BenchConfig(device="cuda", quick=True))`` returns the exit status (0: every
benchmark ran or was skipped with a message; 1: one failed) and writes ``<name>.json`` files and
the sections of RESULTS.md (see :func:`getfast.bench.common.set_output` for where).
"""
from __future__ import annotations

from getfast.bench.config import (CPU_BENCHMARKS, GPU_BENCHMARKS, QUICK_GPU_BUDGET_S, BenchConfig,
                                  checkout_benchmarks, names)
from getfast.bench.runner import run_config


def run(cfg: BenchConfig) -> int:
    """Run the benchmarks ``cfg`` selects; 0 when every one ran or was skipped with a message, 1 when
    one failed (the others still ran). ``ValueError`` before any work when ``cfg.device`` is CUDA and
    no GPU is visible."""
    return run_config(cfg)


__all__ = ["BenchConfig", "run", "names", "checkout_benchmarks", "CPU_BENCHMARKS", "GPU_BENCHMARKS",
           "QUICK_GPU_BUDGET_S"]
