"""The fused SIM surrogate (``getfast.ops.sim_loss``) vs the eager composition under autograd: one forward and
``torch.autograd.grad`` w.r.t. the three inputs, each fused backend forced and the default dispatch, checked
against float64 first; GB/s and % of peak from the 9-tensor bytes model; on CPU also CPU time and memory.
"""
from __future__ import annotations

import contextlib
import statistics

import torch

from getfast.bench.common import (Budget, attempt, cell, cpu_peak_bytes, default_backend, dtype_name, fmt, fmt_bytes,
                                  fmt_pct, fmt_ratio, forced_backend, kernel_ms, machine_info, markdown_table, rate,
                                  section, share, sim_loss_bytes, thread_cpu_s)

TITLES = {"cpu": "sim_loss — fused SIM surrogate vs eager (CPU, fwd+bwd)",
          "cuda": "GPU sim_loss — fused SIM surrogate vs eager autograd (fwd+bwd)"}
CPU_SHAPES = ((64, 3, 32, 32), (64, 4, 64, 64))
GPU_SHAPES = ((256, 3, 64, 64), (7, 3, 33, 31), (64, 3, 32, 32))
C = 0.5  # pseudo-Huber c


def inputs(shape, dtype=torch.float32, device=torch.device("cpu"), seed: int = 0):
    """``(a, f, x, sigma, w)``: three (B, ...) inputs requiring grad, σ ∈ [0.1, 2.1], upstream weights ``w``."""
    g = torch.Generator(device=device).manual_seed(seed)
    a, f, x = (torch.randn(shape, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(3))
    return a, f, x, torch.rand(shape[0], generator=g, device=device) * 2 + 0.1, torch.randn(shape[0], generator=g,
                                                                                            device=device)


def fused(a, f, x, sigma, w, backend=None):
    from getfast.ops import sim_loss

    with forced_backend(backend) if backend else contextlib.nullcontext():  # no environment cost on the default path
        return torch.autograd.grad((sim_loss(a, f, x, sigma, C) * w).sum(), (a, f, x))


def eager(a, f, x, sigma, w):
    from getfast.ops import sim_loss_reference

    return torch.autograd.grad((sim_loss_reference(a, f, x, sigma, C) * w).sum(), (a, f, x))


def measure(shape, dtype, device, quick: bool, peak_bw: float | None, threads: int | None = None) -> dict:
    """One row: eager autograd, each fused backend and the default dispatch where it is neither, checked against
    float64 before timing; on CPU with ``threads`` also the allocator's peak and (one thread) CPU time."""
    args = inputs(shape, dtype, device)
    nbytes = sim_loss_bytes(args[0].numel(), args[0].element_size())
    backends = ("triton", "cuda") if device.type == "cuda" else ("cpp",)
    row = {"shape": list(shape), "dtype": dtype_name(dtype), "threads": threads, "model_bytes": nbytes, "impls": {},
           "default_backend": default_backend("sim_loss", device, dtype)}
    ref = eager(*(t.detach().double().requires_grad_() for t in args[:3]), args[3].double(), args[4].double())
    impls = {"eager": lambda: eager(*args), **{b: (lambda b=b: fused(*args, backend=b)) for b in backends}}
    if row["default_backend"] not in backends:
        impls["default"] = lambda: fused(*args)
    tol, timed = (1e-4 if dtype == torch.float32 else 3e-2), {}  # relative to the largest gradient entry
    for name, fn in impls.items():
        got, err = attempt(fn)
        entry = row["impls"][name] = {"error": err}
        if err is None:
            diff = max(float((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(got, ref))
            entry["max_rel_diff_vs_fp64"] = diff
            if name != "eager" and not diff <= tol:  # the reference's own rounding is recorded, not judged
                entry["error"] = f"wrong result: max relative difference {diff:.2g} > {tol:g}"
            else:
                timed[name] = []
    for _ in range(1 if quick or device.type == "cuda" else 5):  # CPU: interleaved rounds share the machine's noise
        for name in timed:
            ms, err = attempt(lambda: kernel_ms(impls[name], device, quick))
            timed[name].append(ms)
            row["impls"][name]["error"] = row["impls"][name]["error"] or err
    for name, ts in timed.items():
        e = row["impls"][name]
        e["ms"] = None if None in ts else statistics.median(ts)
        e["gb_s"], e["bw_share"] = (None, None) if e["ms"] is None else (rate(nbytes, e["ms"]) / 1e9,
                                                                          share(rate(nbytes, e["ms"]), peak_bw))
        if device.type == "cpu" and threads:
            e["peak_bytes"] = cpu_peak_bytes(impls[name])
            if threads == 1:  # contention-robust: CPU time of the calling thread
                e["cpu_ms"] = 1e3 * thread_cpu_s(impls[name], min_cpu_time=0.5 if quick else 2.0, repeats=5)
    t_e = row["impls"]["eager"].get("ms")
    for e in row["impls"].values():
        e["speedup_vs_eager"] = (t_e / e["ms"]) if (t_e and e.get("ms")) else None
    return row


def plan(device: torch.device, quick: bool) -> list[tuple]:
    """(shape, dtype, torch threads): CPU fp32 with 1 and the default threads; CUDA fp32 (and bf16 in a full run)."""
    if device.type == "cpu":
        return [(s, torch.float32, n) for n in sorted({1, torch.get_num_threads()}) for s in CPU_SHAPES]
    return [(s, d, None) for d in ((torch.float32,) if quick else (torch.float32, torch.bfloat16)) for s in GPU_SHAPES]


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None, cases=None) -> dict:
    rows, skipped, default_threads = [], [], torch.get_num_threads()
    try:
        for shape, dtype, threads in (cases if cases is not None else plan(device, quick)):
            torch.set_num_threads(threads or default_threads)
            with forced_backend(None):  # `default` is the dispatch with GETFAST_BACKEND unset
                row = budget.measure(5.0, f"{'×'.join(map(str, shape))} {dtype_name(dtype)}", skipped,
                                     lambda: measure(shape, dtype, device, quick, peak_bw, threads))
            rows += [row] if row else []
    finally:
        torch.set_num_threads(default_threads)
    return {"quick": quick, "c": C, "rows": rows, "skipped": skipped, "machine": machine_info(),
            "bytes_model": "9·numel·itemsize (fwd reads 3 inputs; bwd reads 3, writes 3 gradients)"}


def report(res: dict) -> str:
    cpu, lines = any(r.get("threads") for r in res["rows"]), []
    for r in res["rows"]:
        for name, e in r["impls"].items():
            label = {"eager": "eager autograd (reference)",
                     "default": f"getfast default dispatch ({r.get('default_backend', '?')})"}.get(name, f"fused, {name}")
            lines.append(["×".join(map(str, r["shape"])), r["dtype"]] + ([r["threads"]] if cpu else []) + [label]
                         + [cell(e, "ms", ".3f")] + (["–"] * 3 if e.get("error") else [
                             fmt(e.get("gb_s"), ".1f"), fmt_pct(e.get("bw_share")), fmt_ratio(e.get("speedup_vs_eager"))])
                         + ([fmt(e.get("cpu_ms"), ".2f"), fmt(e.get("peak_bytes"), fmt_bytes)]
                            if cpu else []))
    head = ["B×C×H×W", "dtype"] + (["threads"] if cpu else []) + ["implementation", "ms", "GB/s", "% of peak",
                                                                 "speed-up vs eager"]
    head += ["CPU ms, 1 thread", "peak memory (CPU allocator)"] if cpu else []
    return section(res, f"One forward + `torch.autograd.grad` w.r.t. the three inputs, c = {res['c']}; effective GB/s "
                   f"from the bytes model {res['bytes_model']}, applied to every row." + (
                       " CPU: median of 5 interleaved rounds of torch.utils.benchmark medians; CPU ms = the calling "
                       "thread's CPU time (contention-robust); peak memory from torch.profiler's allocation events "
                       "during one fwd+bwd." if cpu else "") + "\n\n" + markdown_table(head, lines), cpu)
