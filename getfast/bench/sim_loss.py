"""Fused SIM surrogate (getfast::sim_loss, cpp backend) vs the eager composition of torch ops,
forward + backward on CPU. Target: >= 2x faster and less peak memory.

    python -m benchmarks --only sim_loss [--quick]   (or: python -m benchmarks.bench_sim_loss [--quick] [--threads N ...])
"""
from __future__ import annotations

import argparse
import os

import torch

from getfast.bench.common import (
    publish,
    cpu_peak_bytes,
    fmt_bytes,
    machine_info,
    machine_line,
    markdown_table,
    thread_cpu_time,
    time_stats,
)

NAME = "sim_loss"
TITLE = "sim_loss — fused SIM surrogate vs eager (CPU, fwd+bwd)"
SHAPES = [(64, 3, 32, 32), (64, 4, 64, 64)]


def _make(shape, dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, f, g = (torch.randn(shape, generator=gen, dtype=dtype).requires_grad_() for _ in range(3))
    sigma = torch.rand(shape[0], generator=gen) * 2 + 0.1
    return a, f, g, sigma


def run(quick: bool = False, threads: tuple[int, ...] | None = None) -> dict:
    from getfast.ops import sim_loss, sim_loss_reference

    default_threads = torch.get_num_threads()
    threads = threads or tuple(sorted({1, default_threads}))
    prev = os.environ.pop("GETFAST_BACKEND", None)
    os.environ["GETFAST_BACKEND"] = "cpp"
    try:
        rows = []
        for nt, shape in ((nt, shape) for nt in threads for shape in SHAPES):
            torch.set_num_threads(nt)
            a, f, g, sigma = _make(shape)
            w = torch.randn(shape[0])

            def eager():
                loss = sim_loss_reference(a, f, g, sigma, 0.5)
                return torch.autograd.grad((loss * w).sum(), (a, f, g))

            def fused():
                loss = sim_loss(a, f, g, sigma, 0.5)
                return torch.autograd.grad((loss * w).sum(), (a, f, g))

            # correctness guard before timing
            for x, y in zip(eager(), fused()):
                torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-6)
            mrt = 0.3 if quick else 1.0
            # interleave to share machine noise; take the best of the medians' ratios per round
            s_e, s_f = [], []
            for _ in range(1 if quick else 5):
                s_e.append(time_stats(eager, min_run_time=mrt))
                s_f.append(time_stats(fused, min_run_time=mrt))
            t_e, t_f = [x["median"] for x in s_e], [x["median"] for x in s_f]
            med = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
            te, tf = med(t_e), med(t_f)
            round_ratio = med([e / f for e, f in zip(t_e, t_f)])
            cpu_e = cpu_f = None
            if nt == 1:  # contention-robust: CPU seconds of the calling thread
                cpu_e = thread_cpu_time(eager, min_cpu_time=0.5 if quick else 2.0)
                cpu_f = thread_cpu_time(fused, min_cpu_time=0.5 if quick else 2.0)
            me, mf = cpu_peak_bytes(eager), cpu_peak_bytes(fused)
            n = a.numel()
            rows.append({
                "shape": list(shape),
                "dtype": "float32",
                "threads": nt,
                "eager_median_s": te,
                "fused_median_s": tf,
                "speedup": round_ratio,
                "ratio_of_medians": te / tf,
                "eager_thread_cpu_s": cpu_e,
                "fused_thread_cpu_s": cpu_f,
                "speedup_thread_cpu": (cpu_e / cpu_f) if cpu_e else None,
                "rounds": {"eager_s": t_e, "fused_s": t_f},
                "eager_peak_bytes": me,
                "fused_peak_bytes": mf,
                "memory_ratio": me / mf,
                "input_bytes_each": n * 4,
            })
    finally:
        torch.set_num_threads(default_threads)
        os.environ.pop("GETFAST_BACKEND", None)
        if prev is not None:
            os.environ["GETFAST_BACKEND"] = prev
    return {
        "name": NAME,
        "what": "getfast.ops.sim_loss (cpp backend, fused fwd + bwd) vs sim_loss_reference (eager torch ops + "
                "autograd); one forward + torch.autograd.grad w.r.t. d_teacher, d_fake, x_g",
        "timing": "torch.utils.benchmark blocked_autorange median per round; eager and fused alternate for 5 "
                  "rounds in one process; speed-up = median over rounds of the per-round ratio of medians; "
                  "CPU time (1 thread only) = median "
                  "time.thread_time per call, unaffected by other processes preempting this one",
        "memory": "peak bytes of PyTorch's CPU allocator during one fwd+bwd, from torch.profiler allocation "
                  "events (profile_memory=True), above what was live before the call; includes the 3 gradients",
        "quick": quick,
        "machine": machine_info(),
        "results": rows,
    }


def report(res: dict) -> str:
    rows = [
        ["×".join(map(str, r["shape"])), r["threads"], f"{r['eager_median_s'] * 1e3:.2f}", f"{r['fused_median_s'] * 1e3:.2f}",
         f"**{r['speedup']:.1f}×**", (f"{r['eager_thread_cpu_s'] * 1e3:.2f} / {r['fused_thread_cpu_s'] * 1e3:.2f}"
          if r["eager_thread_cpu_s"] else "–"),
         f"**{r['speedup_thread_cpu']:.1f}×**" if r["speedup_thread_cpu"] else "–", fmt_bytes(r["eager_peak_bytes"]), fmt_bytes(r["fused_peak_bytes"]),
         f"**{r['memory_ratio']:.1f}×**"]
        for r in res["results"]
    ]
    table = markdown_table(
        ["B×C×H×W (fp32)", "threads", "eager ms", "fused ms", "speed-up (median)", "CPU ms eager / fused", "speed-up (CPU time)", "eager peak", "fused peak", "memory saved"], rows)
    return (f"{res['what']}.\n\nMachine: {machine_line(res['machine'])}.\n\n{table}\n\n"
            f"Timing: {res['timing']}. Memory: {res['memory']}."
            + (" (quick run)" if res["quick"] else "")
            + " On a shared, loaded machine (see the load average) wall-clock medians include preemption "
              "and, with 2 threads, OpenMP stalls on both sides; the CPU-time column is the "
              "contention-robust figure.\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short timing runs (smoke test)")
    ap.add_argument("--threads", type=int, nargs="*", help="thread counts (default: 1 and torch's default)")
    args = ap.parse_args(argv)
    res = run(quick=args.quick, threads=tuple(args.threads) if args.threads else None)
    return publish(NAME, TITLE, res, report)


if __name__ == "__main__":
    main()
