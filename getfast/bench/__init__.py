"""getfast benchmarks (the set and the command line: :mod:`getfast.bench.config`; :mod:`getfast.bench.runner` runs them)."""
from __future__ import annotations

from getfast.bench.config import CPU_BENCHMARKS, GPU_BENCHMARKS, QUICK_GPU_BUDGET_S, BenchConfig, names


def run(cfg: BenchConfig) -> int:
    """Run the benchmarks ``cfg`` selects: 0 when every one ran (measurements it skipped carry their
    reason), 1 when one failed (the others still ran). ``ValueError`` before any work when ``cfg.device``
    is CUDA and no GPU is visible."""
    from getfast.bench.runner import run_config

    return run_config(cfg)


__all__ = ["BenchConfig", "run", "names", "CPU_BENCHMARKS", "GPU_BENCHMARKS", "QUICK_GPU_BUDGET_S"]
