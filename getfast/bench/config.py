"""getfast benchmarks: kernels and end-to-end paths, measured side by side in one process.

    python -m benchmarks [--device cpu|cuda] [--quick] [--only NAME ...] [--out DIR] [--budget-s S]
    getfast bench ...        (the same options)
    python -m getfast.bench ...

Library use: ``getfast.bench.run(BenchConfig(device="cuda", quick=True))`` returns the exit status (0: every
benchmark ran or was skipped with a message; 1: one failed) and writes ``<name>.json`` files and
the sections of RESULTS.md (see :func:`getfast.bench.common.set_output` for where).

CPU benchmarks (``--device cpu``, the default): ``deq`` (solvers vs torchdeq), ``models`` (one step
vs Heun, eager vs compile), ``pairs`` (teacher pair generation), ``sim_loss`` (fused vs eager),
``overhead`` (host cost per call of the fused ops at tiny sizes), and, in a source checkout, any
``benchmarks/bench_<name>.py`` module that is not one of these. GPU benchmarks (``--device cuda``):
``attention``, ``sim_loss``, ``deq``, ``sampling``, ``train`` (modules
``getfast.bench.gpu_<name>``), written as ``gpu_<name>.json`` and the ``gpu-<name>`` sections after
a ``gpu`` section naming the device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CPU_BENCHMARKS = {
    "deq": "getfast.bench.deq",
    "models": "getfast.bench.models",
    "overhead": "getfast.bench.overhead",
    "pairs": "getfast.bench.pairs",
    "sim_loss": "getfast.bench.sim_loss",
}
GPU_BENCHMARKS = {
    "attention": "getfast.bench.gpu_attention",
    "sim_loss": "getfast.bench.gpu_sim_loss",
    "deq": "getfast.bench.gpu_deq",
    "sampling": "getfast.bench.gpu_sampling",
    "train": "getfast.bench.gpu_train",
}
QUICK_GPU_BUDGET_S = 330.0  # --quick on CUDA: the whole run within 6 minutes on one H100, with margin


def checkout_benchmarks() -> dict[str, str]:
    """``{name: file}`` of ``bench_<name>.py`` modules in a source checkout's ``benchmarks/`` folder
    that are not thin entry points to the built-in CPU benchmarks."""
    from getfast.bench.common import source_checkout

    root = source_checkout()
    if root is None:
        return {}
    found = {}
    for path in sorted((root / "benchmarks").glob("bench_*.py")):
        name = path.stem[len("bench_"):]
        if name not in CPU_BENCHMARKS:
            found[name] = str(path)
    return found


def names(device: str = "cpu") -> list[str]:
    """The benchmarks ``--device`` runs, in order."""
    if device.split(":")[0] == "cuda":
        return list(GPU_BENCHMARKS)
    return sorted({*CPU_BENCHMARKS, *checkout_benchmarks()})


@dataclass
class BenchConfig:
    """Benchmarks: JSON per benchmark and the sections of RESULTS.md (ratios measured in one process)."""

    device: str = "cpu"          # cpu | cuda (cuda:N): the CPU benchmarks or the GPU ones; cuda needs a visible GPU
    quick: bool = False          # smaller sizes, shorter timing; cuda: the whole run within 6 minutes on one H100
    only: tuple[str, ...] = ()   # run only these (cpu: deq models overhead pairs sim_loss + checkout extras; cuda: attention sim_loss deq sampling train)
    out: str = ""                # folder for <name>.json and RESULTS.md ("": benchmarks/ of a source checkout, else ./getfast-bench)
    budget_s: float = 0.0        # cuda: start no new measurement after this many seconds (0: no limit; with --quick: 330)

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
        return list(self.only) if self.only else names(self.device)
