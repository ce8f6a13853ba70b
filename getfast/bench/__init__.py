"""getfast benchmarks, measured side by side in one process (``getfast bench`` and ``python -m getfast.bench`` too):

    python -m benchmarks [--device cpu|cuda] [--quick] [--only NAME ...] [--out DIR] [--budget-s S]

CPU (the default): deq (solvers vs torchdeq), overhead (host cost of the fused ops at tiny sizes), pairs
(teacher pair generation), sampling (one step vs Heun), sim_loss (fused vs eager), train (eager vs compile).
CUDA, in this order: sampling (latency eager / bf16 / CUDA graph), deq (vs torchdeq), train (img/s eager vs
--compile), sim_loss (vs eager: GB/s, % of peak), attention (Triton vs SDPA). Each is getfast.bench.<name>.
"""
from __future__ import annotations

from getfast.bench.config import CPU_BENCHMARKS, GPU_BENCHMARKS, QUICK_GPU_BUDGET_S, BenchConfig, names  # noqa: F401


def run(cfg: BenchConfig) -> int:
    """Run the benchmarks ``cfg`` selects: 0, or 1 when one failed; ``ValueError`` first when CUDA is not visible."""
    from getfast.bench.runner import run_config

    return run_config(cfg)
