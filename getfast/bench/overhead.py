"""Per-call host cost of the fused ops against the PyTorch compositions they replace, at sizes so
small that the host cost is all there is (batch 1-2), on CPU, one thread.

Pairs, each timed side by side in one process, alternating over rounds:

* ``sim_loss`` fwd+bwd at 2×1×4×4 fp32: the default path of ``getfast.ops.sim_loss`` (the fused
  op) vs ``sim_loss_reference`` (eager ops + autograd), both followed by ``torch.autograd.grad``.
  Target: ratio ≤ 0.5.
* one Anderson step (B=2, D=64, m=6, ring full) and one Broyden step (B=2, D=64, memory 6): the
  default backend vs the reference step (plain ATen ops).
* a whole solve with ``tol=None`` (20 iterations of a cheap map, B=2, D=64) per solver: the
  default backend vs the reference step.

    python -m benchmarks --only overhead [--quick]   (or: python -m benchmarks.bench_overhead [--quick])
"""
from __future__ import annotations

import argparse
import os

import torch

from getfast.bench.common import machine_info, machine_line, markdown_table, publish, time_stats

NAME = "overhead"
TITLE = "overhead — host cost per call of the fused ops vs the compositions they replace (CPU)"


def _pairs():
    import getfast.deq as deq
    from getfast.ops import anderson as A
    from getfast.ops import broyden as BR
    from getfast.ops import sim_loss, sim_loss_reference

    g = torch.Generator().manual_seed(0)
    a, f, x = (torch.randn(2, 1, 4, 4, generator=g).requires_grad_() for _ in range(3))
    sigma, w = torch.rand(2, generator=g) + 0.5, torch.randn(2, generator=g)

    def sim(fn):
        return lambda: torch.autograd.grad((fn(a, f, x, sigma, 0.5) * w).sum(), (a, f, x))

    B, D, m, k = 2, 64, 6, 9
    z = torch.randn(B, D, generator=g)
    fx = torch.tanh(z)

    def anderson_state():
        s = A.AndersonState.new(z, m, 16)
        for j in range(k):
            A.anderson_step(s, torch.tanh(s.X[j % m]), j, backend="reference")
        return s

    def broyden_state():
        s = BR.BroydenState.new(z, m, 16)
        for j in range(k):
            BR.broyden_step(s, torch.tanh(s.x), j, backend="reference")
        return s

    sa, sb = anderson_state(), broyden_state()
    states = {"a": [A.AndersonState(*(t.clone() for t in sa)) for _ in range(2)],
              "b": [BR.BroydenState(*(t.clone() for t in sb)) for _ in range(2)]}

    def a_step(i, backend):  # the same step each call: the buffers' values stay bounded
        return lambda: A.anderson_step(states["a"][i], fx, k, backend=backend, validate=False)

    def b_step(i, backend):
        return lambda: BR.broyden_step(states["b"][i], fx, k, backend=backend, validate=False)

    xs = torch.randn(B, D, generator=g)

    def solve(name, backend):
        return lambda: deq.solve(lambda v: torch.tanh(0.5 * v + xs), torch.zeros(B, D), solver=name, max_iter=20,
                                 tol=None, backend=backend)

    yield "sim_loss fwd+bwd, 2×1×4×4 fp32", "eager composition + autograd", sim(sim_loss_reference), \
        "fused op (default backend)", sim(sim_loss)
    yield "anderson step, B=2 D=64 m=6", "reference step", a_step(0, "reference"), "default backend", a_step(1, None)
    yield "broyden step, B=2 D=64 mem=6", "reference step", b_step(0, "reference"), "default backend", b_step(1, None)
    for name in ("anderson", "broyden", "fixed_point"):
        yield f"{name} solve, 20 iterations, tol=None, B=2 D=64", "reference step", solve(name, "reference"), \
            "default backend", solve(name, None)


def run(quick: bool = False) -> dict:
    from getfast.ops import OPS

    prev_threads, prev_env = torch.get_num_threads(), os.environ.pop("GETFAST_BACKEND", None)
    torch.set_num_threads(1)  # host cost: one thread, no OpenMP wake-ups
    rounds, mrt = (2, 0.2) if quick else (5, 0.5)
    rows = []
    try:
        for what, base_label, base, fused_label, fused in _pairs():
            base(), fused()  # warm-up: dispatch decided and cached, kernels loaded
            tb, tf = [], []
            for _ in range(rounds):  # alternate so both sides share the machine's noise
                tb.append(time_stats(base, min_run_time=mrt)["median"])
                tf.append(time_stats(fused, min_run_time=mrt)["median"])
            ratios = sorted(f_ / b_ for b_, f_ in zip(tb, tf))
            rows.append({"what": what, "baseline": base_label, "fused": fused_label,
                         "baseline_us": sorted(tb)[len(tb) // 2] * 1e6, "fused_us": sorted(tf)[len(tf) // 2] * 1e6,
                         "ratio": ratios[len(ratios) // 2], "rounds": {"baseline_s": tb, "fused_s": tf}})
        defaults = {name: op.choose(torch.device("cpu"), torch.float32) for name, op in OPS.items()}
    finally:
        torch.set_num_threads(prev_threads)
        if prev_env is not None:
            os.environ["GETFAST_BACKEND"] = prev_env
    return {
        "name": NAME,
        "what": "host cost per call at tiny sizes: getfast's default path vs the PyTorch composition it replaces",
        "timing": f"torch.utils.benchmark blocked_autorange median, 1 thread; baseline and fused alternate for "
                  f"{rounds} rounds in one process; ratio = median over rounds of fused / baseline (target for "
                  "sim_loss: <= 0.5)",
        "defaults_cpu": defaults,
        "quick": quick,
        "machine": machine_info(),
        "results": rows,
    }


def report(res: dict) -> str:
    rows = [[r["what"], r["baseline"], f"{r['baseline_us']:.1f}", f"{r['fused_us']:.1f}", f"**{r['ratio']:.2f}**"]
            for r in res["results"]]
    table = markdown_table(["call", "baseline", "baseline µs", "fused µs", "fused / baseline"], rows)
    return (f"{res['what']}.\n\nMachine: {machine_line(res['machine'])}.\n\n{table}\n\n"
            f"Timing: {res['timing']}." + (" (quick run)" if res["quick"] else "") + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="short timing runs (smoke test)")
    res = run(quick=ap.parse_args(argv).quick)
    return publish(NAME, TITLE, res, report)


if __name__ == "__main__":
    main()
