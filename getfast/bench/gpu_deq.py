"""DEQ solvers on the GPU: getfast's Anderson, fixed-point and Broyden vs torchdeq's.

1. Cost per iteration outside f, at GET-B/2's state (B = 128 samples of D = 256 tokens × 768):
   whole solves of ``n1`` and ``n2`` iterations are timed (``tol=None`` for getfast: exactly that
   many iterations; torchdeq with a tolerance it never reaches), the difference divided by
   ``n2 − n1`` removes the set-up, and the time of one ``f`` call is subtracted. getfast runs with
   each backend forced (triton, cuda, and the plain-PyTorch reference step, which is the built-in
   the fused step must beat) and with its default dispatch; fp32 and bf16 states (torchdeq's
   Anderson does not run in bf16: the error is shown). Anderson and fixed-point rows carry the
   bytes model (3m+4)·B·D·itemsize (m = 1 for fixed point) and its share of the peak bandwidth.
   Broyden keeps every update (``memory = None``, torchdeq's default), so its cost grows with the
   iteration count; no bytes model is claimed for it.
2. Time to tolerance on the same problem with ``f(z) = x + a ⊙ tanh(z)`` (a ∈ [0.5, 0.95]),
   relative tolerance 1e-4, each solver stopping by its own rule; host wall time, synchronised.

torchdeq is optional: without it the comparison columns say so and the getfast rows still run.
"""
from __future__ import annotations

import torch

from getfast.bench.gpu_common import (
    Budget,
    anderson_bytes,
    attempt,
    default_backend,
    dtype_name,
    fmt,
    fmt_pct,
    fmt_ratio,
    kernel_ms,
    latency_ms,
    markdown_safe,
    rate,
    share,
)

NAME = "deq"
TITLE = "GPU deq — fixed-point solvers vs torchdeq"

B, D = 128, 256 * 768  # GET-B/2 at 32×32: 256 tokens of width 768
M, LAM = 6, 1e-4
N1, N2 = 5, 15
TOL, STOP = 1e-4, "rel"
SOLVERS = ("anderson", "fixed_point", "broyden")
_TORCHDEQ_NAME = {"anderson": "anderson", "fixed_point": "fixed_point_iter", "broyden": "broyden"}
_MAX_ITER = {"anderson": 100, "fixed_point": 300, "broyden": 40}
_NEVER = 1e-30  # a tolerance torchdeq never reaches, so it runs max_iter iterations


def torchdeq_solver(name: str):
    """torchdeq's solver for getfast's solver ``name``; raises ImportError when torchdeq is absent."""
    from torchdeq.solver import get_solver

    return get_solver(_TORCHDEQ_NAME[name])


def torchdeq_missing() -> str | None:
    try:
        import torchdeq  # noqa: F401
    except ImportError as exc:
        return f"torchdeq not installed ({exc})"
    return None


def problem(batch: int, dim: int, dtype, device, seed: int = 0):
    """``(f, z0)``: the contraction ``f(z) = x + a ⊙ tanh(z)`` with a ∈ [0.5, 0.95], from zeros."""
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(batch, dim, generator=g, device=device).to(dtype)
    a = (0.5 + 0.45 * torch.rand(batch, dim, generator=g, device=device)).to(dtype)
    return (lambda z: torch.addcmul(x, a, torch.tanh(z))), torch.zeros(batch, dim, device=device, dtype=dtype)


def _solve_ours(solver: str, f, z0, n: int, backend: str | None, tol=None):
    import getfast.deq as deq

    kw = {"m": M, "lam": LAM} if solver == "anderson" else {}
    return deq.solve(f, z0, solver=solver, max_iter=n, tol=tol, stop_mode=STOP, backend=backend, **kw)


def _solve_theirs(solver: str, f, z0, n: int, tol=_NEVER):
    kw = {"m": M, "lam": LAM} if solver == "anderson" else {}
    return torchdeq_solver(solver)(f, z0, max_iter=n, tol=tol, stop_mode=STOP, **kw)


def per_iteration(solver: str, dtype, device, quick: bool, batch: int, dim: int, backends) -> dict:
    """ms per iteration outside f for every getfast backend and torchdeq (see the module docstring)."""
    f, z0 = problem(batch, dim, dtype, device)
    t_f = kernel_ms(lambda: f(z0), device, quick)
    itemsize = z0.element_size()
    model = anderson_bytes(M if solver == "anderson" else 1, batch, dim, itemsize) if solver != "broyden" else None
    step_op = "broyden_step" if solver == "broyden" else "anderson_step"
    out = {"solver": solver, "dtype": dtype_name(dtype), "B": batch, "D": dim, "f_ms": t_f, "model_bytes": model,
           "default_backend": default_backend(step_op, device, dtype), "impls": {}}
    impls = [(f"getfast {b}" if b else f"getfast default ({out['default_backend']})",
              (lambda n, b=b: _solve_ours(solver, f, z0, n, b))) for b in backends]
    missing = torchdeq_missing()
    impls.append(("torchdeq", None if missing else (lambda n: _solve_theirs(solver, f, z0, n))))
    for label, call in impls:
        if call is None:
            out["impls"][label] = {"error": missing}
            continue
        t1, err = attempt(lambda: kernel_ms(lambda: call(N1), device, quick))
        t2, err2 = (None, None) if err else attempt(lambda: kernel_ms(lambda: call(N2), device, quick))
        if err or err2:
            out["impls"][label] = {"error": err or err2}
            continue
        total = (t2 - t1) / (N2 - N1)
        outside = total - t_f
        e = {"ms_per_iter_total": total, "ms_per_iter": outside}
        if outside <= 0:  # the solver's own cost is below the timing noise of f's
            e["note"] = "below timing noise"
        elif model is not None:
            e["gb_s"] = rate(model, outside) / 1e9
        out["impls"][label] = e
    theirs = out["impls"].get("torchdeq", {}).get("ms_per_iter")
    for e in out["impls"].values():
        ours = e.get("ms_per_iter")
        if theirs and theirs > 0 and ours and ours > 0:
            e["ratio_vs_torchdeq"] = ours / theirs
    return out


def to_tolerance(solver: str, device, quick: bool, batch: int, dim: int) -> dict:
    """f evaluations and synchronised wall ms to reach ``TOL`` (fp32), getfast default dispatch vs torchdeq."""
    f, z0 = problem(batch, dim, torch.float32, device)
    step_op = "broyden_step" if solver == "broyden" else "anderson_step"
    calls = {"n": 0}

    def fc(z):
        calls["n"] += 1
        return f(z)

    out = {"solver": solver, "tol": TOL, "stop_mode": STOP, "B": batch, "D": dim,
           "default_backend": default_backend(step_op, device, torch.float32)}
    runs = {"getfast": lambda: _solve_ours(solver, fc, z0, _MAX_ITER[solver], None, tol=TOL)}
    missing = torchdeq_missing()
    if missing is None:
        runs["torchdeq"] = lambda: _solve_theirs(solver, fc, z0, _MAX_ITER[solver], tol=TOL)
    else:
        out["torchdeq_error"] = missing
    reps = 3 if quick else 7
    for who, fn in runs.items():
        calls["n"] = 0
        res, err = attempt(fn)
        if err:
            out[f"{who}_error"] = err
            continue
        out[f"{who}_f_evals"] = calls["n"]
        z = res[0]
        out[f"{who}_max_rel_residual"] = float(((f(z) - z).norm(dim=1) / f(z).norm(dim=1).clamp_min(1e-30)).max())
        lat, err = attempt(lambda fn=fn: latency_ms(fn, device, reps, warmup=1))
        if err:
            out[f"{who}_error"] = err
        else:
            out[f"{who}_ms"] = lat["median"]
    if out.get("getfast_ms") and out.get("torchdeq_ms"):
        out["ratio"] = out["getfast_ms"] / out["torchdeq_ms"]
    return out


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None,
        batch: int = B, dim: int = D, dtypes=(torch.float32, torch.bfloat16), solvers=SOLVERS) -> dict:
    backends = ("triton", "cuda", "reference", None) if device.type == "cuda" else ("cpp", "reference", None)
    per_iter, skipped, tol_rows = [], [], []
    for solver in solvers:
        for dtype in dtypes:
            need = 15.0
            if not budget.allows(need):
                skipped.append(f"{solver} {dtype_name(dtype)} per iteration ({budget.skip_note(need)})")
                continue
            row = per_iteration(solver, dtype, device, quick, batch, dim, backends)
            for e in row["impls"].values():
                if row["model_bytes"] and e.get("gb_s") is not None:
                    e["bw_share"] = share(e["gb_s"] * 1e9, peak_bw)
            per_iter.append(row)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    for solver in solvers:
        need = 10.0
        if not budget.allows(need):
            skipped.append(f"{solver} to tolerance ({budget.skip_note(need)})")
            continue
        tol_rows.append(to_tolerance(solver, device, quick, batch, dim))
    return {"quick": quick, "m": M, "lam": LAM, "n1": N1, "n2": N2, "per_iteration": per_iter,
            "to_tolerance": tol_rows, "skipped": skipped, "torchdeq": torchdeq_missing() or "present",
            "bytes_model": "(3m+4)·B·D·itemsize per Anderson step; m = 1 for fixed point"}


def report(res: dict) -> str:
    from getfast.bench.common import markdown_table

    lines = []
    for r in res["per_iteration"]:
        for label, e in r["impls"].items():
            if e.get("error"):
                lines.append([r["solver"], r["dtype"], label, markdown_safe(e["error"]), "–", "–", "–"])
                continue
            ms = e.get("note") or fmt(e.get("ms_per_iter"), ".3f")
            lines.append([r["solver"], r["dtype"], label, ms, fmt(e.get("gb_s"), ".0f"),
                          fmt_pct(e.get("bw_share")), fmt_ratio(e.get("ratio_vs_torchdeq"))])
    shape = (f"B={res['per_iteration'][0]['B']}, D={res['per_iteration'][0]['D']}" if res["per_iteration"] else "")
    text = (f"Per iteration outside f ({shape}, m={res['m']}, λ={res['lam']}; iterations {res['n1']}→{res['n2']}, "
            f"f's time subtracted). GB/s from the bytes model {res['bytes_model']}; ratio = getfast ÷ torchdeq "
            f"time (< 1: getfast is faster). torchdeq: {res['torchdeq']}.\n\n"
            + markdown_table(["solver", "state dtype", "implementation", "ms / iteration", "GB/s (model)", "% of peak",
                              "vs torchdeq"], lines) + "\n")
    tl = []
    for r in res["to_tolerance"]:
        def cell(who):
            if r.get(f"{who}_error"):
                return markdown_safe(r[f"{who}_error"]), "–", "–"
            return (fmt(r.get(f"{who}_ms"), ".2f"), fmt(r.get(f"{who}_f_evals"), "d"),
                    fmt(r.get(f"{who}_max_rel_residual"), ".2g"))
        g, t = cell("getfast"), cell("torchdeq")
        tl.append([f"{r['solver']} ({r.get('default_backend', '?')})", g[0], t[0], fmt_ratio(r.get("ratio")), f"{g[1]} / {t[1]}", f"{g[2]} / {t[2]}"])
    if tl:
        text += (f"\nTime to tolerance (fp32, relative tol {res['to_tolerance'][0]['tol']}, each solver's own stopping "
                 f"rule, getfast's default dispatch; synchronised wall time):\n\n"
                 + markdown_table(["solver", "getfast ms", "torchdeq ms", "ratio", "f evaluations getfast / torchdeq",
                                   "max rel. residual getfast / torchdeq"], tl) + "\n")
    if res["skipped"]:
        text += "\nNot measured: " + "; ".join(res["skipped"]) + "\n"
    return text
