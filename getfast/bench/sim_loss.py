"""The fused SIM surrogate (``getfast.ops.sim_loss``) vs the eager composition differentiated by autograd
(``sim_loss_reference``): one forward and ``torch.autograd.grad`` w.r.t. the three (B, ...) inputs.

CPU (target ≥ 2× faster, less peak memory): the cpp backend at 64×3×32×32 and 64×4×64×64 fp32 with 1 and
torch's default threads; eager and fused alternate over rounds in one process (speed-up = median of the
per-round ratios of ``torch.utils.benchmark`` medians); with 1 thread also the calling thread's CPU time
(contention-robust); the peak of PyTorch's CPU allocator during one fwd+bwd.

GPU: every GPU backend forced (triton, cuda) and the default dispatch, at 256×3×64×64, 7×3×33×31 (launch
overhead dominates) and 64×3×32×32, fp32 (and bf16 in a full run), each checked against a float64
reference before timing; effective GB/s from the least bytes a fused fwd+bwd moves (9 tensors,
:func:`getfast.bench.common.sim_loss_bytes`) and its share of the peak bandwidth, applied to eager too.
"""
from __future__ import annotations

import contextlib
import statistics

import torch

from getfast.bench.common import (Budget, attempt, cpu_peak_bytes, default_backend, dtype_name, fmt, fmt_bytes, fmt_pct,
                                  fmt_ratio, forced_backend, kernel_ms, machine_info, machine_line, markdown_safe,
                                  markdown_table, not_measured, one_thread, rate, share, sim_loss_bytes, thread_cpu_s,
                                  median_s)

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


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None) -> dict:
    return run_gpu(device, quick, budget, peak_bw) if device.type == "cuda" else run_cpu(quick)


# ---- CPU --------------------------------------------------------------------------------------------
def run_cpu(quick: bool, threads: tuple[int, ...] | None = None) -> dict:
    rows, default_threads = [], torch.get_num_threads()
    try:
        for nt in threads or tuple(sorted({1, default_threads})):
            for shape in CPU_SHAPES:
                torch.set_num_threads(nt)
                args = inputs(shape)
                e_fn, f_fn = (lambda: eager(*args)), (lambda: fused(*args, backend="cpp"))
                for x, y in zip(e_fn(), f_fn()):  # correctness guard before timing
                    torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
                t_e, t_f = [], []
                for _ in range(1 if quick else 5):  # interleaved rounds share the machine's noise
                    t_e.append(median_s(e_fn, 0.3 if quick else 1.0))
                    t_f.append(median_s(f_fn, 0.3 if quick else 1.0))
                cpu_e = cpu_f = None
                if nt == 1:  # contention-robust: CPU seconds of the calling thread
                    with one_thread():
                        cpu_e, cpu_f = (thread_cpu_s(fn, min_cpu_time=0.5 if quick else 2.0, repeats=5)
                                        for fn in (e_fn, f_fn))
                me, mf = cpu_peak_bytes(e_fn), cpu_peak_bytes(f_fn)
                te, tf = statistics.median_low(t_e), statistics.median_low(t_f)
                rows.append({"shape": list(shape), "dtype": "float32", "threads": nt, "eager_median_s": te,
                             "fused_median_s": tf, "speedup": statistics.median_low([e / f for e, f in zip(t_e, t_f)]),
                             "ratio_of_medians": te / tf, "eager_thread_cpu_s": cpu_e, "fused_thread_cpu_s": cpu_f,
                             "speedup_thread_cpu": (cpu_e / cpu_f) if cpu_e else None,
                             "rounds": {"eager_s": t_e, "fused_s": t_f}, "eager_peak_bytes": me, "fused_peak_bytes": mf,
                             "memory_ratio": me / mf, "input_bytes_each": args[0].numel() * 4})
    finally:
        torch.set_num_threads(default_threads)
    return {"name": "sim_loss",
            "what": "getfast.ops.sim_loss (cpp backend, fused fwd + bwd) vs sim_loss_reference (eager torch ops + "
                    "autograd); one forward + torch.autograd.grad w.r.t. d_teacher, d_fake, x_g",
            "timing": "torch.utils.benchmark blocked_autorange median per round; eager and fused alternate for 5 "
                      "rounds in one process; speed-up = median over rounds of the per-round ratio of medians; CPU time "
                      "(1 thread only) = median time.thread_time per call, unaffected by other processes preempting this one",
            "memory": "peak bytes of PyTorch's CPU allocator during one fwd+bwd, from torch.profiler allocation events "
                      "(profile_memory=True), above what was live before the call; includes the 3 gradients",
            "quick": quick, "machine": machine_info(), "results": rows}


# ---- GPU --------------------------------------------------------------------------------------------
def measure(shape, dtype, device, quick: bool, peak_bw: float | None) -> dict:
    args = inputs(shape, dtype, device)
    nbytes = sim_loss_bytes(args[0].numel(), args[0].element_size())
    row = {"shape": list(shape), "dtype": dtype_name(dtype), "model_bytes": nbytes, "impls": {},
           "default_backend": default_backend("sim_loss", device, dtype)}
    # correctness guard against float64 (eager in bf16 is itself only bf16-accurate)
    ref = eager(*(t.detach().double().requires_grad_() for t in args[:3]), args[3].double(), args[4].double())
    impls = {"eager": lambda: eager(*args)}
    impls.update({b: (lambda b=b: fused(*args, backend=b))
                  for b in (("triton", "cuda") if device.type == "cuda" else ("cpp",))})
    impls["default"] = lambda: fused(*args)
    tol = 1e-4 if dtype == torch.float32 else 3e-2  # relative to the largest gradient entry
    for name, fn in impls.items():
        entry: dict = {}
        got, err = attempt(fn)
        if err is None:
            diff = max(float((g.double() - r).abs().max() / r.abs().max().clamp_min(1e-30)) for g, r in zip(got, ref))
            entry["max_rel_diff_vs_fp64"] = diff
            if name != "eager" and not diff <= tol:  # the reference's own rounding is recorded, not judged
                err = f"wrong result: max relative difference {diff:.2g} > {tol:g}"
        if err is None:
            entry["ms"], err = attempt(lambda fn=fn: kernel_ms(fn, device, quick))
            entry["gb_s"] = None if entry["ms"] is None else rate(nbytes, entry["ms"]) / 1e9
            entry["bw_share"] = None if entry["ms"] is None else share(rate(nbytes, entry["ms"]), peak_bw)
        entry["error"] = err
        row["impls"][name] = entry
    t_e = row["impls"]["eager"].get("ms")
    for entry in row["impls"].values():
        entry["speedup_vs_eager"] = (t_e / entry["ms"]) if (t_e and entry.get("ms")) else None
    return row


def plan(quick: bool) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(s, d) for d in ((torch.float32,) if quick else (torch.float32, torch.bfloat16)) for s in GPU_SHAPES]


def run_gpu(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None, cases=None) -> dict:
    """The GPU measurements (on CPU tensors too, with the cpp backend: tests)."""
    rows, skipped = [], []
    for shape, dtype in (cases if cases is not None else plan(quick)):
        if budget.allows(5.0):
            with forced_backend(None):  # `default` is the dispatch with GETFAST_BACKEND unset
                rows.append(measure(shape, dtype, device, quick, peak_bw))
        else:
            skipped.append(f"{'×'.join(map(str, shape))} {dtype_name(dtype)} ({budget.skip_note(5.0)})")
    return {"quick": quick, "c": C, "rows": rows, "skipped": skipped,
            "bytes_model": "9·numel·itemsize (fwd reads 3 inputs; bwd reads 3, writes 3 gradients)"}


def report(res: dict) -> str:
    if "rows" not in res:
        return _report_cpu(res)
    lines = []
    for r in res["rows"]:
        for name, e in r["impls"].items():
            label = {"eager": "eager autograd (reference)",
                     "default": f"getfast default dispatch ({r.get('default_backend', '?')})"}.get(name, f"fused, {name}")
            lines.append(["×".join(map(str, r["shape"])), r["dtype"], label] + (
                [markdown_safe(e["error"]), "–", "–", "–"] if e.get("error") else
                [fmt(e.get("ms"), ".3f"), fmt(e.get("gb_s"), ".0f"), fmt_pct(e.get("bw_share")),
                 fmt_ratio(e.get("speedup_vs_eager"))]))
    return (f"One forward + `torch.autograd.grad` w.r.t. the three inputs, c = {res['c']}; effective GB/s from the bytes "
            f"model {res['bytes_model']}, applied to every row.\n\n"
            + markdown_table(["B×C×H×W", "dtype", "implementation", "ms", "GB/s", "% of peak", "speed-up vs eager"], lines)
            + "\n" + not_measured(res["skipped"]))


def _report_cpu(res: dict) -> str:
    rows = [["×".join(map(str, r["shape"])), r["threads"], f"{r['eager_median_s'] * 1e3:.2f}",
             f"{r['fused_median_s'] * 1e3:.2f}", f"**{r['speedup']:.1f}×**",
             f"{r['eager_thread_cpu_s'] * 1e3:.2f} / {r['fused_thread_cpu_s'] * 1e3:.2f}" if r["eager_thread_cpu_s"] else "–",
             f"**{r['speedup_thread_cpu']:.1f}×**" if r["speedup_thread_cpu"] else "–", fmt_bytes(r["eager_peak_bytes"]),
             fmt_bytes(r["fused_peak_bytes"]), f"**{r['memory_ratio']:.1f}×**"] for r in res["results"]]
    table = markdown_table(["B×C×H×W (fp32)", "threads", "eager ms", "fused ms", "speed-up (median)",
                            "CPU ms eager / fused", "speed-up (CPU time)", "eager peak", "fused peak", "memory saved"], rows)
    return (f"{res['what']}.\n\nMachine: {machine_line(res['machine'])}.\n\n{table}\n\nTiming: {res['timing']}. Memory: "
            f"{res['memory']}." + (" (quick run)" if res["quick"] else "") + " On a shared, loaded machine (see the load "
            "average) wall-clock medians include preemption and, with 2 threads, OpenMP stalls on both sides; the "
            "CPU-time column is the contention-robust figure.\n")
