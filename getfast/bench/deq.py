"""getfast.deq's Anderson, fixed point and Broyden vs torchdeq 0.1.0 (optional) on ``f(z) = x + a ⊙ tanh(z)``, m = 6,
λ = 1e-4, relative tol 1e-4 (much tighter puts ‖g‖² below λ: both Andersons average): per iteration per backend
with the bytes model, time to tolerance; on CPU also op and sync counts, CPU time and memory.
"""
from __future__ import annotations

import importlib.util
import statistics

import torch

from getfast.bench.common import (SYNC_OPS, Budget, OpCounter, anderson_bytes, attempt, cell, cpu_peak_bytes,
                                  default_backend, dtype_name, fmt, fmt_bytes, fmt_pct, fmt_ratio, kernel_ms,
                                  machine_info, markdown_safe, markdown_table, one_thread, rate, section, share,
                                  thread_cpu_s, wall_ms)

TITLES = {"cpu": "deq — DEQ solvers vs torchdeq (CPU)", "cuda": "GPU deq — fixed-point solvers vs torchdeq"}
M, LAM, TOL, STOP = 6, 1e-4, 1e-4, "rel"
N1, N2 = 5, 15
SOLVERS = ("anderson", "fixed_point", "broyden")
_THEIRS = {"anderson": "anderson", "fixed_point": "fixed_point_iter", "broyden": "broyden"}
_MAX_ITER = {"anderson": 100, "fixed_point": 300, "broyden": 40}
_NEVER = 1e-30  # a tolerance never reached: torchdeq cannot switch its convergence test off


def torchdeq_missing() -> str | None:
    return None if importlib.util.find_spec("torchdeq") else "torchdeq not installed (no module named 'torchdeq')"


def problem(batch: int, dim: int, dtype=torch.float32, device=torch.device("cpu"), seed: int = 0):
    """``(f, z0)``: ``f(z) = x + a ⊙ tanh(z)`` with a ∈ [0.5, 0.95], from zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, device=device).to(dtype)
    a = (0.5 + 0.45 * torch.rand(batch, dim, generator=g, device=device)).to(dtype)
    return (lambda z: torch.addcmul(x, a, torch.tanh(z))), torch.zeros(batch, dim, device=device, dtype=dtype)


def counted(f):
    """``f`` counting its calls in ``.n``."""
    def g(z):
        g.n += 1
        return f(z)
    g.n = 0
    return g


def ours(solver: str, f, z0, n: int, backend: str | None, tol=None, **kw):
    import getfast.deq as deq

    kw = {"m": M, "lam": LAM, **kw} if solver == "anderson" else kw
    return deq.solve(f, z0, solver=solver, max_iter=n, tol=tol, stop_mode=STOP, backend=backend, **kw)


def theirs(solver: str, f, z0, n: int, tol=_NEVER):
    from torchdeq.solver import get_solver

    kw = {"m": M, "lam": LAM} if solver == "anderson" else {}
    return get_solver(_THEIRS[solver])(f, z0, max_iter=n, tol=tol, stop_mode=STOP, **kw)


def op_counts(B: int = 4, D: int = 1000) -> list[dict]:
    """ATen ops and host syncs per iteration outside f (see the module docstring)."""
    import getfast.deq as deq

    x, z0 = torch.randn(B, D), torch.zeros(B, D)
    f = lambda z: torch.tanh(0.5 * z + x)  # noqa: E731

    def mine(name, backend, tol=None, check_every=1):
        return lambda g, n: deq.solve(g, z0, solver=name, max_iter=n, tol=tol, check_every=check_every, backend=backend)

    cases = [("getfast anderson (cpp), tol=None", mine("anderson", "cpp")),  # eager: the reference step's own ATen ops
             ("getfast anderson (reference step unfolded), tol=None", mine("anderson", "reference")),
             ("getfast anderson (cpp), tol, check_every=1", mine("anderson", "cpp", _NEVER)),
             ("getfast anderson (cpp), tol, check_every=5", mine("anderson", "cpp", _NEVER, 5))]
    for name in ("anderson", "fixed_point", "broyden"):
        if name != "anderson":
            cases.append((f"getfast {name} (cpp), tol=None", mine(name, "cpp")))
        if torchdeq_missing() is None:  # torchdeq's own defaults (stop_mode abs), as getfast's rows
            from torchdeq.solver import get_solver
            cases.append((f"torchdeq {_THEIRS[name]}", lambda g, n, t=_THEIRS[name]: get_solver(t)(g, z0, max_iter=n,
                                                                                                     tol=_NEVER)))
    rows = []
    for label, call in cases:
        counts = []
        for n in (10, 20):
            with OpCounter() as c:
                call(c.excluding(f), n)
            counts.append(c.counts)
        per = {k: (counts[1][k] - counts[0][k]) / 10 for k in {*counts[0], *counts[1]} if counts[1][k] != counts[0][k]}
        rows.append({"solver": label, "ops_per_iter": sum(per.values()),
                     "syncs_per_iter": sum(v for k, v in per.items() if any(s in k for s in SYNC_OPS)),
                     "top_ops": dict(sorted(per.items(), key=lambda kv: -kv[1])[:6])})
    return rows


def to_tolerance(solver: str, device, B: int, D: int, backend: str | None = None, repeats: int = 3,
                 cpu_repeats: int = 0) -> dict:
    """f evaluations, residual at exit and wall time to ``TOL`` (fp32), getfast vs torchdeq when installed;
    interleaved and synchronised; ``cpu_repeats``: also single-thread CPU time and the cost per iteration."""
    f, z0 = problem(B, D, device=device)
    fc, missing = counted(f), torchdeq_missing()
    runs = {"ours": lambda: ours(solver, fc, z0, _MAX_ITER[solver], backend, tol=TOL)}
    if missing is None:
        runs["theirs"] = lambda: theirs(solver, fc, z0, _MAX_ITER[solver], tol=TOL)
    step = "broyden_step" if solver == "broyden" else "anderson_step"
    out = {"solver": solver, "B": B, "D": D, "m": M, "lam": LAM, "tol": TOL, "stop_mode": STOP,
           "backend": backend or default_backend(step, device, torch.float32), "f_calls": {}, "final_max_residual": {},
           "final_max_rel_residual": {}, "errors": {"theirs": missing} if missing else {}}
    for who, fn in list(runs.items()):
        fc.n = 0
        res, err = attempt(fn)  # also the warm-up: the first custom-op call imports torch._dynamo
        if err:
            out["errors"][who] = err
            del runs[who]
            continue
        fz, r = f(res[0]), (f(res[0]) - res[0]).norm(dim=1)
        out["f_calls"][who], out["final_max_residual"][who] = fc.n, float(r.max())
        out["final_max_rel_residual"][who] = float((r / fz.norm(dim=1).clamp_min(1e-30)).max())
        if who == "ours":
            out["converged"] = bool(res[1]["converged"].all())
    wall = {who: [] for who in runs}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        for who, fn in runs.items():
            wall[who] += [t / 1e3 for t in wall_ms(fn, device)]
    out["wall_s"] = {k: statistics.median(v) for k, v in wall.items() if v}
    out["wall_min_s"] = {k: min(v) for k, v in wall.items() if v}
    out["f_call_s"] = min(wall_ms(lambda: f(z0), device, 10)) / 1e3
    if cpu_repeats:
        with one_thread():
            out["cpu_1thread_s"] = {who: thread_cpu_s(fn, repeats=cpu_repeats) for who, fn in runs.items()}
            out["cpu_1thread_f_call_s"] = thread_cpu_s(lambda: f(z0), min_cpu_time=0.05)
    for key, f_s, name in (("wall_min_s", "f_call_s", "overhead_per_iter_s"),
                           ("cpu_1thread_s", "cpu_1thread_f_call_s", "overhead_per_iter_cpu_1thread_s")):
        if key in out:  # the solver's own time per iteration: f's time subtracted
            out[name] = {k: (out[key][k] - n * out[f_s]) / n for k, n in out["f_calls"].items()}
    if len(runs) == 2:
        out.update({ratio: out[key]["ours"] / out[key]["theirs"] for key, ratio in (
            ("wall_s", "ratio_wall"), ("wall_min_s", "ratio_wall_min"), ("cpu_1thread_s", "ratio_cpu_1thread")) if out.get(key)})
    return out


def memory(B: int, D: int) -> list[dict]:
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        f, z0 = problem(B, D, dtype)
        item = z0.element_size()
        row = {"dtype": dtype_name(dtype), "state_bytes": B * D * item,
               "ours_history_bytes": 2 * M * B * D * item + B * M * M * 4,  # X, G in the state dtype + fp32 Gram
               "ours_peak_bytes": cpu_peak_bytes(lambda: ours("anderson", f, z0, 12, "cpp"))}
        peak, err = attempt(lambda: cpu_peak_bytes(lambda: theirs("anderson", f, z0, 12)))  # fails on bf16 states
        row.update(theirs_peak_bytes=peak, theirs_error=err,
                   theirs_history_bytes=None if err else 2 * M * B * D * item + B * (M + 1) ** 2 * item)  # X, F, bordered H
        rows.append(row)
    return rows


# ---- GPU --------------------------------------------------------------------------------------------
def per_iteration(solver: str, dtype, device, quick: bool, batch: int, dim: int, backends, peak_bw=None) -> dict:
    """ms per iteration outside f for every getfast backend and torchdeq (see the module docstring)."""
    f, z0 = problem(batch, dim, dtype, device)
    t_f = kernel_ms(lambda: f(z0), device, quick)
    model = None if solver == "broyden" else anderson_bytes(M if solver == "anderson" else 1, batch, dim,
                                                             z0.element_size())
    dflt = default_backend("broyden_step" if solver == "broyden" else "anderson_step", device, dtype)
    out = {"solver": solver, "dtype": dtype_name(dtype), "B": batch, "D": dim, "f_ms": t_f, "model_bytes": model,
           "default_backend": dflt, "impls": {}}
    impls = {(f"getfast {b}" if b else f"getfast default ({dflt})"): (lambda n, b=b: ours(solver, f, z0, n, b))
             for b in backends}
    missing = torchdeq_missing()
    impls["torchdeq"] = None if missing else (lambda n: theirs(solver, f, z0, n))
    for label, call in impls.items():
        t1, err = (None, missing) if call is None else attempt(lambda: kernel_ms(lambda: call(N1), device, quick))
        t2, err = (None, err) if err else attempt(lambda: kernel_ms(lambda: call(N2), device, quick))
        if err:
            out["impls"][label] = {"error": err}
            continue
        e = out["impls"][label] = {"ms_per_iter_total": (t2 - t1) / (N2 - N1), "ms_per_iter": (t2 - t1) / (N2 - N1) - t_f}
        if e["ms_per_iter"] <= 0:  # the solver's own cost is below the timing noise of f's
            e["note"] = "below timing noise"
        elif model is not None:
            e["gb_s"], e["bw_share"] = rate(model, e["ms_per_iter"]) / 1e9, share(rate(model, e["ms_per_iter"]), peak_bw)
    ref = out["impls"].get("torchdeq", {}).get("ms_per_iter")
    for e in out["impls"].values():
        if ref and ref > 0 and e.get("ms_per_iter", 0) > 0:
            e["ratio_vs_torchdeq"] = e["ms_per_iter"] / ref
    return out


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None, batch: int | None = None,
        dim: int | None = None, dtypes=None, solvers=SOLVERS) -> dict:
    """Every solver per iteration (each backend, the default dispatch, torchdeq) and to tolerance; on CPU also op and
    sync counts, single-thread CPU time and memory. ``batch``/``dim`` (tests): a small problem, no CPU extras."""
    cpu = device.type == "cpu"
    size = (8, 8192) if quick else (32, 65536) if cpu else (128, 256 * 768)  # GPU: GET-B/2's state, 256 tokens × 768
    B, D = batch or size[0], dim or size[1]
    backends = ("cpp", "reference", None) if cpu else ("triton", "cuda", "reference", None)
    res = {"quick": quick, "on": device.type, "machine": machine_info(), "m": M, "lam": LAM, "n1": N1, "n2": N2,
           "per_iteration": [], "to_tolerance": [], "skipped": [], "torchdeq": torchdeq_missing() or "present",
           "bytes_model": "(3m+4)·B·D·itemsize per Anderson step; m = 1 for fixed point"}
    if cpu and batch is None:
        res["op_counts"], res["memory"] = op_counts(), memory(*((8, 8192) if quick else (B, D)))
    for solver in solvers:
        for dtype in dtypes or ((torch.float32,) if cpu else (torch.float32, torch.bfloat16)):
            row = budget.measure(15.0, f"{solver} {dtype_name(dtype)} per iteration", res["skipped"],
                                 lambda: per_iteration(solver, dtype, device, quick, B, D, backends, peak_bw))
            res["per_iteration"] += [row] if row else []
    for solver in solvers:  # on CPU the fused C++ step, as the default dispatch picks it
        row = budget.measure(10.0, f"{solver} to tolerance", res["skipped"], lambda: to_tolerance(
            solver, device, B, D, "cpp" if cpu else None, 3 if quick else 7, cpu_repeats=3 if cpu else 0))
        res["to_tolerance"] += [row] if row else []
    if torchdeq_missing():
        res["skipped"].append(f"the torchdeq columns ({torchdeq_missing()}; pip install torchdeq==0.1.0)")
    return res


def report(res: dict) -> str:
    lines, cpu = [], res.get("on") == "cpu"
    for r in res["per_iteration"]:
        for label, e in r["impls"].items():
            lines.append([r["solver"], r["dtype"], label, e.get("note") or cell(e, "ms_per_iter", ".3f")] + (
                ["–"] * 3 if e.get("error") else [fmt(e.get("gb_s"), ".0f"), fmt_pct(e.get("bw_share")),
                                                   fmt_ratio(e.get("ratio_vs_torchdeq"))]))
    shape = "".join(f"B={p['B']}, D={p['D']}, " for p in res["per_iteration"][:1])
    text = "" if not res.get("op_counts") else (
        "**Solver overhead** (B=4, D=1000, `tanh` map; f's own ops not counted; a getfast custom op counts as one op; "
        "20 minus 10 iterations):\n\n" + markdown_table(["solver", "ATen ops / iteration (excl. f)", "host syncs / "
        "iteration"], [(r["solver"], r["ops_per_iter"], r["syncs_per_iter"]) for r in res["op_counts"]]) + "\n\n")
    text += (f"**Per iteration outside f** ({shape}m={res['m']}, "
             f"λ={res['lam']}; whole solves of {res['n1']} and {res['n2']} iterations, the difference per iteration "
             f"minus one f call). GB/s from the bytes model {res['bytes_model']}; ratio = getfast ÷ torchdeq time "
             f"(< 1: getfast is faster). torchdeq: {res['torchdeq']}.\n\n"
             + markdown_table(["solver", "state dtype", "implementation", "ms / iteration", "GB/s (model)", "% of peak",
                               "vs torchdeq"], lines) + "\n")

    def both(r, key, spec, scale=1):  # "getfast / torchdeq"; an error in place of its wall time
        return " / ".join(markdown_safe(r["errors"][w]) if key == "wall_s" and w in r["errors"] else
                          fmt(r[key][w] * scale if w in r.get(key, {}) else None, spec) for w in ("ours", "theirs"))
    tl = [[f"{r['solver']} ({r['backend']})", both(r, "wall_s", ".2f", 1e3), fmt_ratio(r.get("ratio_wall")),
           both(r, "cpu_1thread_s", ".2f", 1e3), fmt_ratio(r.get("ratio_cpu_1thread")),
           both(r, "overhead_per_iter_s", ".3f", 1e3), both(r, "f_calls", "d"), both(r, "final_max_rel_residual", ".2g")]
          for r in res["to_tolerance"]]
    if tl:
        text += (f"\n**Time to tolerance** (fp32, relative tol {TOL}; torchdeq stops when every sample's current residual "
                 "< tol, getfast when every sample's best one is, converged samples frozen). Wall: synchronised, median, "
                 "interleaved; CPU time: the calling thread on one torch thread; solver ms per iteration excluding f from "
                 "the fastest wall time.\n\n" + markdown_table(
                     ["solver", "wall ms getfast / torchdeq", "ratio", "CPU ms, 1 thread", "ratio",
                      "solver ms / iteration excl. f", "f evaluations", "max rel. residual"], tl) + "\n")
    if res.get("memory"):
        text += (f"\n**Memory** (Anderson, m={res['m']}, 12 iterations; history analytic, peak of the CPU allocator):\n\n"
                 + markdown_table(["state dtype", "getfast history", "torchdeq history", "getfast peak", "torchdeq peak"],
                                  [(r["dtype"], *[fmt(r[k], fmt_bytes, markdown_safe(r.get("theirs_error") or "fails"))
                                                  for k in ("ours_history_bytes", "theirs_history_bytes", "ours_peak_bytes",
                                                            "theirs_peak_bytes")]) for r in res["memory"]]))
    return section(res, text, cpu, "the single-thread CPU-time figures are the contention-robust ones")
