"""The benchmarks' configuration: names per device and :class:`BenchConfig` (re-exported by getfast.bench)."""
from __future__ import annotations

from dataclasses import dataclass

from getfast.options import check_bool, check_device, check_number, check_text

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
        check_device("device", self.device, auto=False)  # a benchmark names the device it measures
        check_bool("quick", self.quick)
        check_text("out", self.out, "a folder path", empty=True)
        check_number("budget_s", self.budget_s, lo=0)
        self.only, known = (self.only,) if isinstance(self.only, str) else tuple(self.only), names(self.device)
        if any(n not in known for n in self.only):
            raise ValueError(f"only: unknown benchmark(s) {', '.join(n for n in self.only if n not in known)} for device "
                             f"{self.device}; choose from {', '.join(known)}")

    def chosen(self) -> list[str]:
        """The benchmarks to run, in :data:`GPU_BENCHMARKS` / :data:`CPU_BENCHMARKS` order."""
        return [n for n in names(self.device) if not self.only or n in self.only]
