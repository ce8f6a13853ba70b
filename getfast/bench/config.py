"""getfast benchmarks: kernels and end-to-end paths, measured side by side in one process.

    python -m benchmarks [--device cpu|cuda] [--quick] [--only NAME ...] [--out DIR] [--budget-s S]
    getfast bench ...  |  python -m getfast.bench ...      (the same options)

CPU (the default): deq (solvers vs torchdeq), overhead (host cost of the fused ops at tiny sizes), pairs
(teacher pair generation), sampling (one step vs Heun), sim_loss (fused vs eager), train (eager vs compile).
CUDA, in this order: sampling (latency eager / bf16 / CUDA graph), deq (vs torchdeq), train (img/s eager
vs --compile), sim_loss (vs eager: GB/s, % of peak), attention (Triton vs SDPA): gpu_<name>.json and the
gpu-<name> sections after a `gpu` section naming the device. Each is the module getfast.bench.<name>.
"""
from __future__ import annotations

import math
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
        if not isinstance(self.device, str) or not (
            self.device == "cpu" or self.device == "cuda" or
            (self.device.startswith("cuda:") and self.device[5:].isdigit())
        ):
            raise ValueError(f"device must be cpu, cuda or cuda:N, got {self.device!r}")
        if not isinstance(self.quick, bool):
            raise ValueError(f"quick must be true or false, got {self.quick!r}")
        if isinstance(self.only, str):
            self.only = (self.only,)
        self.only = tuple(self.only)
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
