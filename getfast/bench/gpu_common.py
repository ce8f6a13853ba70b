"""What every GPU benchmark shares: the device description (name, versions, peak memory
bandwidth), timers, a time budget, the FLOP and byte models, and error capture.

Timing method (DESIGN.md, "Performance method"): kernels with ``triton.testing.do_bench`` (it
warms up, flushes L2 between calls and times each call with CUDA events); end-to-end steps with
CUDA events around back-to-back calls after warm-up; latency (what a caller waits for one batch)
as host wall time between two ``torch.cuda.synchronize()``. Every function here also runs on a
CPU device (``torch.utils.benchmark`` / ``time.perf_counter``), which is how the tests exercise
the GPU benchmarks on machines without one; numbers from a CPU device are never GPU figures.
"""
from __future__ import annotations

import math
import os
import statistics
import time
import traceback
from typing import Callable

import torch

# --------------------------------------------------------------------------------------
# device
# --------------------------------------------------------------------------------------
# Peak HBM bandwidth from NVIDIA's data sheets, TB/s (10^12 bytes/s), matched on the name torch
# reports. First match wins, so the more specific patterns come first.
_SPEC_SHEET_TBS: tuple[tuple[tuple[str, ...], float, str], ...] = (
    (("H200",), 4.8, "H200 (HBM3e)"),
    (("H100", "NVL"), 3.9, "H100 NVL"),
    (("H100", "PCIE"), 2.0, "H100 PCIe"),
    (("H100",), 3.35, "H100 SXM (HBM3)"),
    (("A100", "80GB", "PCIE"), 1.935, "A100 80GB PCIe"),
    (("A100", "80GB"), 2.039, "A100 80GB SXM"),
    (("A100",), 1.555, "A100 40GB"),
)


def spec_sheet_bandwidth(name: str) -> tuple[float, str] | None:
    """``(bytes/s, which sheet)`` for a device name torch reports, or ``None`` when not in the table."""
    upper = name.upper()
    for keys, tbs, label in _SPEC_SHEET_TBS:
        if all(k in upper for k in keys):
            return tbs * 1e12, label
    return None


def formula_bandwidth(memory_clock_khz: int | None, bus_width_bits: int | None) -> float | None:
    """Theoretical DRAM bandwidth in bytes/s = 2 (double data rate) × memory clock × bus width / 8."""
    if not memory_clock_khz or not bus_width_bits:
        return None
    return 2.0 * memory_clock_khz * 1e3 * bus_width_bits / 8


def peak_bandwidth(name: str, memory_clock_khz: int | None = None, bus_width_bits: int | None = None) -> dict:
    """The device's peak memory bandwidth: the data-sheet figure when the name is known, else the
    clock × bus-width formula; both recorded."""
    sheet = spec_sheet_bandwidth(name)
    formula = formula_bandwidth(memory_clock_khz, bus_width_bits)
    if sheet is not None:
        value, source = sheet[0], f"data sheet, {sheet[1]}"
    elif formula is not None:
        value, source = formula, "2 × memory clock × bus width (device properties)"
    else:
        value, source = None, "unknown"
    return {"bytes_per_s": value, "source": source, "formula_bytes_per_s": formula}


def device_info(device: torch.device) -> dict:
    """Name, capability, memory, versions (torch, CUDA, triton) and peak bandwidth of ``device``."""
    info: dict = {"device": str(device), "torch": torch.__version__, "torch_cuda": torch.version.cuda}
    try:
        import triton

        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if device.type != "cuda":
        info.update(name=f"{device.type} (not a GPU)", peak_bandwidth={"bytes_per_s": None, "source": "not a GPU"})
        return info
    p = torch.cuda.get_device_properties(device)
    clock, bus = getattr(p, "memory_clock_rate", None), getattr(p, "memory_bus_width", None)
    info.update(
        name=p.name,
        capability=f"{p.major}.{p.minor}",
        total_memory_gib=round(p.total_memory / 2**30, 1),
        multiprocessors=p.multi_processor_count,
        memory_clock_khz=clock,
        memory_bus_width_bits=bus,
        peak_bandwidth=peak_bandwidth(p.name, clock, bus),
        tf32_matmul=torch.backends.cuda.matmul.allow_tf32,
        tf32_cudnn=torch.backends.cudnn.allow_tf32,
        cudnn=torch.backends.cudnn.version(),
    )
    return info


def matmul_tflops(device: torch.device, quick: bool, n: int = 8192) -> float | None:
    """Measured bf16 matmul rate (n×n×n, TFLOP/s): the compute ceiling the attention rows are read against."""
    if device.type != "cuda":
        return None
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = kernel_ms(lambda: a @ b, device, quick)
    return 2 * n**3 / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------
# timers
# --------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def kernel_ms(fn: Callable[[], object], device: torch.device, quick: bool,
              grad_to_none: list[torch.Tensor] | None = None) -> float:
    """Median milliseconds per call of a kernel-sized ``fn``: ``triton.testing.do_bench`` on CUDA
    (warm-up, L2 flush, CUDA events), ``torch.utils.benchmark`` on CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=10 if quick else 25, rep=40 if quick else 100,
                              grad_to_none=grad_to_none, return_mode="median"))
    from torch.utils import benchmark

    fn()
    t = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return float(t.blocked_autorange(min_run_time=0.02 if quick else 0.2).median) * 1e3


def throughput_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> float:
    """Milliseconds per call of ``fn`` run ``iters`` times back to back after ``warmup`` calls
    (CUDA events on GPU: the host may run ahead, as in a training loop)."""
    for _ in range(warmup):
        fn()
    sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / iters
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    return (time.perf_counter() - t0) * 1e3 / iters


def latency_ms(fn: Callable[[], object], device: torch.device, iters: int, warmup: int) -> dict:
    """Wall milliseconds from call to finished result, one call at a time (synchronised before and
    after each): ``{"median", "min", "n"}``."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"median": statistics.median(times), "min": min(times), "n": len(times)}


def peak_memory_bytes(device: torch.device) -> int | None:
    return int(torch.cuda.max_memory_allocated(device)) if device.type == "cuda" else None


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


# --------------------------------------------------------------------------------------
# budget and errors
# --------------------------------------------------------------------------------------
class Budget:
    """Wall-clock budget for a whole run: a benchmark asks :meth:`allows` before starting an
    expensive measurement and records it as skipped when the budget would be exceeded."""

    def __init__(self, seconds: float | None = None):
        self.t0 = time.monotonic()
        self.seconds = seconds if seconds and seconds > 0 else None

    def left(self) -> float:
        if self.seconds is None:
            return math.inf
        return self.seconds - (time.monotonic() - self.t0)

    def allows(self, need_s: float) -> bool:
        return self.left() >= need_s

    def skip_note(self, need_s: float) -> str:
        return f"skipped: time budget ({max(self.left(), 0):.0f} s left, needs ~{need_s:.0f} s)"


def attempt(fn: Callable[[], object]) -> tuple[object, str | None]:
    """``(fn(), None)``, or ``(None, "Type: first line")`` when it raises (CUDA OOM included): one
    failing measurement must not lose the others'."""
    try:
        return fn(), None
    except Exception as exc:  # noqa: BLE001  (recorded, shown in the table)
        if os.environ.get("GETFAST_BENCH_TRACEBACK"):
            traceback.print_exc()
        first = (str(exc).strip().splitlines() or [""])[0][:160]
        return None, f"{type(exc).__name__}: {first}"


class forced_backend:
    """Context manager: run getfast ops with ``GETFAST_BACKEND=<name>`` (``None``: the default
    dispatch), restoring the previous value afterwards."""

    def __init__(self, name: str | None):
        self.name = name

    def __enter__(self):
        self.prev = os.environ.get("GETFAST_BACKEND")
        if self.name is None:
            os.environ.pop("GETFAST_BACKEND", None)
        else:
            os.environ["GETFAST_BACKEND"] = self.name
        _clear_dispatch_cache()
        return self

    def __exit__(self, *exc):
        if self.prev is None:
            os.environ.pop("GETFAST_BACKEND", None)
        else:
            os.environ["GETFAST_BACKEND"] = self.prev
        _clear_dispatch_cache()
        return False


def default_backend(op_name: str, device: torch.device, dtype: torch.dtype) -> str:
    """The backend getfast's dispatch picks for ``getfast::<op_name>`` on ``device`` with ``dtype``
    states when ``GETFAST_BACKEND`` is unset (``"unknown: ..."`` if the op layer cannot say)."""
    try:
        from getfast.ops import OPS

        with forced_backend(None):
            return OPS[op_name].choose(device, dtype)
    except Exception as exc:  # noqa: BLE001  (recorded in the table, never fatal)
        return f"unknown: {type(exc).__name__}: {exc}"


def _clear_dispatch_cache() -> None:
    """Forget cached dispatch decisions, if the op layer caches them, so a changed
    ``GETFAST_BACKEND`` takes effect."""
    try:
        from getfast.ops import _framework as fw
    except ImportError:
        return
    clear = getattr(fw, "clear_dispatch_cache", None)
    if callable(clear):
        clear()


# --------------------------------------------------------------------------------------
# models of work
# --------------------------------------------------------------------------------------
def attention_flops(B: int, H: int, N: int, d: int, mode: str) -> float:
    """FLOPs of non-causal attention: forward 2 matmuls of 2·N·N·d each per head = 4·B·H·N²·d;
    the backward is counted as 2.5× the forward (5 matmuls, FlashAttention-2's convention, no
    recomputation), so fwd+bwd = 3.5× the forward."""
    fwd = 4.0 * B * H * N * N * d
    if mode == "fwd":
        return fwd
    if mode == "fwd+bwd":
        return 3.5 * fwd
    raise ValueError(f"mode must be 'fwd' or 'fwd+bwd', got {mode!r}")


def sim_loss_bytes(numel: int, itemsize: int) -> int:
    """Least bytes a fused SIM surrogate fwd+bwd moves: the forward reads the three (B, ...) inputs,
    the backward reads them again and writes three gradients = 9 tensors (per-sample scalars ignored)."""
    return 9 * numel * itemsize


def anderson_bytes(m: int, B: int, D: int, itemsize: int) -> int:
    """Bytes one fused Anderson step moves, (3m+4)·B·D·itemsize: the history of iterates X and of
    residuals G read for the mixing (2m), G read for the new Gram row (m), and fx, x_k, the new
    residual, the next iterate (4). A fixed-point iteration is the same step with m = 1."""
    return (3 * m + 4) * B * D * itemsize


def rate(amount: float | None, ms: float | None) -> float | None:
    """``amount`` per second from a time in milliseconds (``None`` when either is missing)."""
    if amount is None or not ms:
        return None
    return amount / (ms * 1e-3)


def share(value: float | None, peak: float | None) -> float | None:
    """``value / peak`` as a fraction, ``None`` when either is missing."""
    if value is None or not peak:
        return None
    return value / peak


# --------------------------------------------------------------------------------------
# formatting
# --------------------------------------------------------------------------------------
def fmt(v, spec: str = ".3g", none: str = "–") -> str:
    """A table cell: a number formatted with ``spec``, an error string as is, ``none`` for None."""
    if v is None:
        return none
    if isinstance(v, str):
        return v
    return format(v, spec)


def markdown_safe(v) -> str:
    """A string fit for one Markdown table cell (no pipes, no line breaks)."""
    return "–" if v is None else str(v).replace("|", "/").replace("\n", " ")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def fmt_pct(frac: float | None) -> str:
    return "–" if frac is None else f"{100 * frac:.0f} %"


def fmt_ratio(r: float | None) -> str:
    return "–" if r is None else f"**{r:.2f}×**"


def device_line(info: dict) -> str:
    """One Markdown line naming the GPU, its peak bandwidth and the software versions."""
    bw = info.get("peak_bandwidth", {})
    bw_txt = (f"peak {bw['bytes_per_s'] / 1e12:.2f} TB/s ({bw['source']})" if bw.get("bytes_per_s")
              else "peak bandwidth unknown")
    mm = info.get("matmul_bf16_tflops")
    mm_txt = f"; measured bf16 matmul {mm:.0f} TFLOP/s" if mm else ""
    return (f"{info.get('name')} (compute capability {info.get('capability', '–')}, "
            f"{info.get('total_memory_gib', '–')} GiB), {bw_txt}{mm_txt}; torch {info['torch']} "
            f"(CUDA {info.get('torch_cuda')}), triton {info.get('triton')}")
