"""getfast benchmarks, measured side by side in one process (``getfast bench`` and ``python -m getfast.bench`` too):

    python -m benchmarks [--device cpu|cuda] [--quick] [--only NAME ...] [--out DIR] [--budget-s S]

CPU (the default): deq (solvers vs torchdeq), overhead (host cost of the fused ops at tiny sizes), pairs
(teacher pair generation), sampling (one step vs Heun), sim_loss (fused vs eager), train (eager vs compile).
CUDA, in this order: sampling (latency eager / bf16 / CUDA graph), deq (vs torchdeq), train (img/s eager vs
--compile), sim_loss (vs eager: GB/s, % of peak), attention (Triton vs SDPA). Each is getfast.bench.<name>.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

CPU_BENCHMARKS = ("deq", "overhead", "pairs", "sampling", "sim_loss", "train")
GPU_BENCHMARKS = ("sampling", "deq", "train", "sim_loss", "attention")  # the most telling first (a cut-off run keeps them)
QUICK_GPU_BUDGET_S = 330.0  # --quick on CUDA: the whole run within 6 minutes on one H100, with margin


def names(device: str = "cpu") -> list[str]:
    """The benchmarks ``--device`` runs, in order."""
    return list(GPU_BENCHMARKS if device.split(":")[0] == "cuda" else CPU_BENCHMARKS)


@dataclass
class BenchConfig:
    """Benchmarks: JSON per benchmark and the sections of RESULTS.md (ratios measured in one process)."""

    device: str = "cpu"          # cpu | cuda (cuda:N): the CPU benchmarks or the GPU ones; cuda needs a visible GPU
    quick: bool = False          # smaller sizes, shorter timing, 2 attention tile configs; cuda: within 6 minutes on one H100
    only: tuple[str, ...] = ()   # run only these (cpu: deq overhead pairs sampling sim_loss train; cuda: sampling deq train sim_loss attention)
    out: str = ""                # folder for <name>.json and RESULTS.md ("": benchmarks/ of a source checkout, else ./getfast-bench)
    budget_s: float = 0.0        # start no new measurement after this many seconds (0: no limit; cuda with --quick: 330)

    def __post_init__(self):
        if not (isinstance(self.device, str) and re.fullmatch(r"cpu|cuda(:\d+)?", self.device)):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if not isinstance(self.quick, bool):
            raise ValueError(f"quick must be true or false, got {self.quick!r}")
        self.only = (self.only,) if isinstance(self.only, str) else tuple(self.only)
        known = names(self.device)
        unknown = [n for n in self.only if n not in known]
        if unknown:
            raise ValueError(f"only: unknown benchmark(s) {', '.join(unknown)} for device {self.device}; "
                             f"choose from {', '.join(known)}")
        if not isinstance(self.out, str):
            raise ValueError(f"out must be a folder path string, got {self.out!r}")
        if (isinstance(self.budget_s, bool) or not isinstance(self.budget_s, (int, float))
                or not math.isfinite(self.budget_s) or self.budget_s < 0):
            raise ValueError(f"budget_s must be a finite number of seconds >= 0, got {self.budget_s!r}")

    def chosen(self) -> list[str]:
        """The benchmarks to run, in :data:`GPU_BENCHMARKS` / :data:`CPU_BENCHMARKS` order."""
        return [n for n in names(self.device) if not self.only or n in self.only]


def run(cfg: BenchConfig) -> int:
    """Run the benchmarks ``cfg`` selects: 0 when every one ran (skipped measurements carry their reason), 1 when
    one failed (the others still ran); ``ValueError`` before any work when CUDA is asked for and not visible."""
    from getfast.bench.runner import run_config

    return run_config(cfg)
