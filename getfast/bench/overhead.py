"""Per-call host cost of the fused ops vs the PyTorch compositions they replace, at sizes where the host cost is
all there is (CPU, one thread, alternating rounds): sim_loss fwd+bwd at 2×1×4×4 (target ratio ≤ 0.5), one
Anderson and one Broyden step (B=2, D=64, m=6) and 20-iteration solves, each vs the reference step.
"""
from __future__ import annotations

import statistics

import torch

from getfast.bench.common import Budget, forced_backend, kernel_ms, machine_info, markdown_table, one_thread, section
from getfast.bench.sim_loss import eager, fused, inputs

TITLES = {"cpu": "overhead — host cost per call of the fused ops vs the compositions they replace (CPU)"}


def pairs():
    """``(what, baseline label, baseline fn, fused label, fused fn)`` for every measured pair."""
    import getfast.deq as deq
    from getfast.ops import anderson as A
    from getfast.ops import broyden as BR

    B, D, m, k = 2, 64, 6, 9
    g = torch.Generator().manual_seed(0)
    sim = inputs((2, 1, 4, 4))
    z = torch.randn(B, D, generator=g)
    fx, xs = torch.tanh(z), torch.randn(B, D, generator=g)
    sa, sb = A.AndersonState.new(z, m, 16), BR.BroydenState.new(z, m, 16)
    for j in range(k):  # fill the history with the reference step
        A.anderson_step(sa, torch.tanh(sa.X[j % m]), j, backend="reference")
        BR.broyden_step(sb, torch.tanh(sb.x), j, backend="reference")
    states = {"a": [A.AndersonState(*(t.clone() for t in sa)) for _ in range(2)],
              "b": [BR.BroydenState(*(t.clone() for t in sb)) for _ in range(2)]}

    def step(kind, i, backend):  # the same step each call: the buffers' values stay bounded
        fn = A.anderson_step if kind == "a" else BR.broyden_step
        return lambda: fn(states[kind][i], fx, k, backend=backend, validate=False)

    def solve(name, backend):
        return lambda: deq.solve(lambda v: torch.tanh(0.5 * v + xs), torch.zeros(B, D), solver=name, max_iter=20,
                                 tol=None, backend=backend)

    yield ("sim_loss fwd+bwd, 2×1×4×4 fp32", "eager composition + autograd", lambda: eager(*sim),
           "fused op (default backend)", lambda: fused(*sim))
    yield "anderson step, B=2 D=64 m=6", "reference step", step("a", 0, "reference"), "default backend", step("a", 1, None)
    yield "broyden step, B=2 D=64 mem=6", "reference step", step("b", 0, "reference"), "default backend", step("b", 1, None)
    for name in ("anderson", "broyden", "fixed_point"):
        yield (f"{name} solve, 20 iterations, tol=None, B=2 D=64", "reference step", solve(name, "reference"),
               "default backend", solve(name, None))


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None) -> dict:
    from getfast.ops import OPS

    rounds, mrt = (2, 0.2) if quick else (5, 0.5)
    rows = []
    with forced_backend(None), one_thread():  # the default path; host cost: one thread, no OpenMP wake-ups
        for what, base_label, base, fused_label, fn in pairs():
            tb, tf = zip(*[(kernel_ms(base, device, quick, min_run_time=mrt) / 1e3,  # alternating: one machine noise
                            kernel_ms(fn, device, quick, min_run_time=mrt) / 1e3) for _ in range(rounds)])
            rows.append({"what": what, "baseline": base_label, "fused": fused_label,
                         "baseline_us": statistics.median_high(tb) * 1e6, "fused_us": statistics.median_high(tf) * 1e6,
                         "ratio": statistics.median_high([f / b for b, f in zip(tb, tf)]),
                         "rounds": {"baseline_s": tb, "fused_s": tf}})
        defaults = {name: op.choose(torch.device("cpu"), torch.float32) for name, op in OPS.items()}
    return {"name": "overhead",
            "what": "host cost per call at tiny sizes: getfast's default path vs the PyTorch composition it replaces",
            "timing": f"torch.utils.benchmark blocked_autorange median, 1 thread; baseline and fused alternate for {rounds} "
                      "rounds in one process; ratio = median over rounds of fused / baseline (target for sim_loss: <= 0.5)",
            "defaults_cpu": defaults, "quick": quick, "machine": machine_info(), "results": rows}


def report(res: dict) -> str:
    rows = [[r["what"], r["baseline"], f"{r['baseline_us']:.1f}", f"{r['fused_us']:.1f}", f"**{r['ratio']:.2f}**"]
            for r in res["results"]]
    return section(res, f"{res['what']}.\n\n" + markdown_table(["call", "baseline", "baseline µs", "fused µs",
                   "fused / baseline"], rows) + f"\n\nTiming: {res['timing']}." + (" (quick run)" if res["quick"] else ""), True)
