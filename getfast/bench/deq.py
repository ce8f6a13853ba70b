"""DEQ solvers (getfast.deq) vs torchdeq 0.1.0 on CPU.

    python -m benchmarks --only deq [--quick]      (or: python -m benchmarks.bench_deq [--quick])

torchdeq is optional (``pip install torchdeq==0.1.0``, in the ``test`` extra): without it this
benchmark is skipped with a message.

Measured, side by side in one process:

1. solver overhead: ATen ops per iteration, *excluding f's own ops* (a TorchDispatchMode counts
   every op; counting pauses while f runs), from the difference between a 20- and a 10-iteration
   run. A custom op (``getfast::anderson_step``) counts as one op — its native kernel does the
   whole step — so the plain-PyTorch reference step is also counted unfolded. Target ≤ 12.
2. host syncs per iteration: ``aten._local_scalar_dense`` / ``item`` / ``is_nonzero`` in the same
   counts. Target 0 with ``tol=None``.
3. wall time to tolerance at B=32, D=65536 on a cheap map (``f(z) = x + a ⊙ tanh(z)``, 2 ops)
   so the solver's own cost shows: getfast Anderson (cpp backend) vs torchdeq Anderson with the
   same ``m``, ``lam``, ``tol`` (relative 1e-4, where Anderson needs 13 evaluations and the
   fixed-point iteration 23; both Anderson implementations add ``lam`` to the Gram matrix
   *absolutely*, so a much tighter tolerance puts ``‖g‖²`` below ``lam`` and turns either into
   plain averaging); each stops by its own rule. Target ratio ≤ 0.5. Also the time per iteration with f's cost removed, and
   single-thread CPU time (contention-robust). fixed_point and broyden vs their torchdeq twins
   on the same problem (single-thread CPU time).
4. memory: bytes of the history buffers (analytic) and the measured peak of a whole solve
   (PyTorch CPU allocator, ``getfast.bench.common.cpu_peak_bytes``).
"""
from __future__ import annotations

import argparse
import collections
import math
import os
import time

import torch

from getfast.bench.common import (
    SYNC_OPS,
    OpCounter,
    publish,
    Skipped,
    contention_note,
    cpu_peak_bytes,
    fmt_bytes,
    machine_info,
    machine_line,
    markdown_table,
)

NAME = "deq"
TITLE = "deq — DEQ solvers vs torchdeq (CPU)"


def _per_iteration(call, f, n1=10, n2=20) -> tuple[float, float, dict]:
    """(ops/iter, syncs/iter, top ops) from runs of n1 and n2 iterations."""
    res = []
    for n in (n1, n2):
        c = OpCounter()
        with c:
            call(c.excluding(f), n)
        res.append(c.counts)
    diff = collections.Counter(res[1])
    diff.subtract(res[0])
    per = {k: v / (n2 - n1) for k, v in diff.items() if v}
    ops = sum(per.values())
    syncs = sum(v for k, v in per.items() if any(s in k for s in SYNC_OPS))
    top = dict(sorted(per.items(), key=lambda kv: -kv[1])[:6])
    return ops, syncs, top


def _op_counts(B: int, D: int) -> list[dict]:
    import getfast.deq as deq
    from getfast.deq import solvers as S
    from getfast.ops import anderson as A
    from torchdeq.solver import get_solver

    x = torch.randn(B, D)
    f = lambda z: torch.tanh(0.5 * z + x)  # noqa: E731
    z0 = torch.zeros(B, D)
    never = 1e-30  # torchdeq cannot disable its convergence test: a tolerance never reached

    def ours(name, backend, tol=None, check_every=1):
        return lambda g, n: deq.solve(g, z0, solver=name, max_iter=n, tol=tol, check_every=check_every,
                                      backend=backend)

    def ours_unfolded(g, n):  # the reference step as plain ATen ops (not through the custom op)
        real = S.anderson_step

        def step(state, fx, k, *, tau, lam, tol, stop_mode, backend=None, validate=True):
            A.anderson_step_reference(*state, fx, k, tau, lam, -1.0 if tol is None else tol, stop_mode == "rel")

        S.anderson_step = step
        try:
            return deq.anderson(g, z0, max_iter=n, tol=None)
        finally:
            S.anderson_step = real

    def theirs(name):
        return lambda g, n: get_solver(name)(g, z0, max_iter=n, tol=never)

    cases = [
        ("getfast anderson (cpp), tol=None", ours("anderson", "cpp")),
        ("getfast anderson (reference step unfolded), tol=None", ours_unfolded),
        ("getfast anderson (cpp), tol, check_every=1", ours("anderson", "cpp", tol=never)),
        ("getfast anderson (cpp), tol, check_every=5", ours("anderson", "cpp", tol=never, check_every=5)),
        ("torchdeq anderson", theirs("anderson")),
        ("getfast fixed_point (cpp), tol=None", ours("fixed_point", "cpp")),
        ("torchdeq fixed_point_iter", theirs("fixed_point_iter")),
        ("getfast broyden (cpp), tol=None", ours("broyden", "cpp")),
        ("torchdeq broyden", theirs("broyden")),
    ]
    rows = []
    for label, call in cases:
        ops, syncs, top = _per_iteration(call, f)
        rows.append({"solver": label, "ops_per_iter": ops, "syncs_per_iter": syncs, "top_ops": top})
    return rows


def _cheap_map(B: int, D: int, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, D, generator=g).to(dtype)
    a = (0.5 + 0.45 * torch.rand(B, D, generator=g)).to(dtype)  # contraction factors in [0.5, 0.95]
    return lambda z: torch.addcmul(x, a, torch.tanh(z)), torch.zeros(B, D, dtype=dtype)


def _timed(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def _wall_to_tolerance(B: int, D: int, m: int, lam: float, tol: float, stop_mode: str, repeats: int) -> dict:
    import getfast.deq as deq
    from torchdeq.solver import get_solver

    f, z0 = _cheap_map(B, D)
    calls = {"n": 0}

    def fc(z):
        calls["n"] += 1
        return f(z)

    def ours():
        return deq.anderson(fc, z0, m=m, lam=lam, tol=tol, stop_mode=stop_mode, max_iter=100, backend="cpp")

    def theirs():
        return get_solver("anderson")(fc, z0, m=m, lam=lam, tol=tol, stop_mode=stop_mode, max_iter=100)

    # warm-up (the first custom-op call imports torch._dynamo) and correctness guard
    calls["n"] = 0
    z, st = ours()
    n_ours = calls["n"]
    calls["n"] = 0
    zt, _, stt = theirs()
    n_theirs = calls["n"]
    assert bool(st["converged"].all())
    res_ours = torch.linalg.vector_norm(f(z) - z, dim=1).max().item()
    res_theirs = torch.linalg.vector_norm(f(zt) - zt, dim=1).max().item()
    t_f = min(_timed(lambda: f(z0), 10))

    wall = {"ours": [], "theirs": []}
    for _ in range(repeats):  # interleaved, so both see the same machine load
        wall["ours"] += _timed(ours, 1)
        wall["theirs"] += _timed(theirs, 1)

    def med(v):
        return sorted(v)[len(v) // 2]

    cpu, cpu_f = _cpu_1thread({"ours": ours, "theirs": theirs}, lambda: f(z0))
    out = {
        "B": B, "D": D, "m": m, "lam": lam, "tol": tol, "stop_mode": stop_mode,
        "f_calls": {"ours": n_ours, "theirs": n_theirs},
        "final_max_residual": {"ours": res_ours, "theirs": res_theirs},
        "wall_s": {k: med(v) for k, v in wall.items()},
        "wall_min_s": {k: min(v) for k, v in wall.items()},
        "f_call_s": t_f,
        "cpu_1thread_s": cpu,
        "cpu_1thread_f_call_s": cpu_f,
    }
    out["ratio_wall"] = out["wall_s"]["ours"] / out["wall_s"]["theirs"]
    out["ratio_wall_min"] = out["wall_min_s"]["ours"] / out["wall_min_s"]["theirs"]
    out["ratio_cpu_1thread"] = cpu["ours"] / cpu["theirs"]
    out["overhead_per_iter_s"] = {
        "ours": (out["wall_min_s"]["ours"] - n_ours * t_f) / n_ours,
        "theirs": (out["wall_min_s"]["theirs"] - n_theirs * t_f) / n_theirs,
    }
    out["overhead_per_iter_cpu_1thread_s"] = {
        "ours": (cpu["ours"] - n_ours * cpu_f) / n_ours,
        "theirs": (cpu["theirs"] - n_theirs * cpu_f) / n_theirs,
    }
    return out


def _cpu_1thread(fns: dict, f_call, repeats: int = 3) -> tuple[dict, float]:
    """Median CPU seconds of the calling thread per call, with torch (and OpenMP) on 1 thread:
    robust to other processes on a shared machine."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out = {}
        for key, fn in fns.items():
            fn()
            ts = []
            for _ in range(repeats):
                t0 = time.thread_time()
                fn()
                ts.append(time.thread_time() - t0)
            out[key] = sorted(ts)[len(ts) // 2]
        t0 = time.thread_time()
        for _ in range(10):
            f_call()
        cpu_f = (time.thread_time() - t0) / 10
    finally:
        torch.set_num_threads(prev)
    return out, cpu_f


def _other_solvers(B: int, D: int, tol: float, stop_mode: str) -> list[dict]:
    """Single-thread CPU time to tolerance of fixed_point and broyden vs their torchdeq twins."""
    import getfast.deq as deq
    from torchdeq.solver import get_solver

    f, z0 = _cheap_map(B, D)
    rows = []
    for ours_name, theirs_name, max_iter in (("fixed_point", "fixed_point_iter", 300), ("broyden", "broyden", 40)):
        calls = {"n": 0}

        def fc(z):
            calls["n"] += 1
            return f(z)

        def ours():
            return deq.solve(fc, z0, solver=ours_name, tol=tol, stop_mode=stop_mode, max_iter=max_iter, backend="cpp")

        def theirs():
            return get_solver(theirs_name)(fc, z0, tol=tol, stop_mode=stop_mode, max_iter=max_iter)

        calls["n"] = 0
        _, st = ours()
        n_ours = calls["n"]
        calls["n"] = 0
        theirs()
        n_theirs = calls["n"]
        cpu, cpu_f = _cpu_1thread({"ours": ours, "theirs": theirs}, lambda: f(z0), repeats=1)
        rows.append({"solver": ours_name, "converged": bool(st["converged"].all()),
                     "f_calls": {"ours": n_ours, "theirs": n_theirs}, "cpu_1thread_s": cpu,
                     "ratio_cpu_1thread": cpu["ours"] / cpu["theirs"], "cpu_1thread_f_call_s": cpu_f})
    return rows


def _memory(B: int, D: int, m: int) -> list[dict]:
    import getfast.deq as deq
    from torchdeq.solver import get_solver

    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        f, z0 = _cheap_map(B, D, dtype)
        item = torch.finfo(dtype).bits // 8
        ours_hist = 2 * m * B * D * item + B * m * m * 4  # X, G in the state dtype + fp32 Gram
        ours_peak = cpu_peak_bytes(lambda: deq.anderson(f, z0, m=m, max_iter=12, tol=None, backend="cpp"))
        row = {"dtype": str(dtype).replace("torch.", ""), "state_bytes": B * D * item,
               "ours_history_bytes": ours_hist, "ours_peak_bytes": ours_peak}
        theirs_hist = 2 * m * B * D * item + B * (m + 1) * (m + 1) * item  # X, F + bordered H
        try:
            theirs_peak = cpu_peak_bytes(lambda: get_solver("anderson")(f, z0, m=m, max_iter=12, tol=1e-30))
            row.update(theirs_history_bytes=theirs_hist, theirs_peak_bytes=theirs_peak)
        except Exception as exc:  # torchdeq's Anderson does not run on bf16 states
            row.update(theirs_history_bytes=None, theirs_peak_bytes=None,
                       theirs_error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:80]}")
        rows.append(row)
    return rows


def _step_micro(B: int, D: int, m: int, repeats: int) -> dict:
    """One Anderson step with full history: fused cpp op vs the reference composition."""
    from getfast.ops import anderson as A

    def bufs():
        g = torch.Generator().manual_seed(0)
        X = torch.randn(m, B, D, generator=g)
        G = torch.randn(m, B, D, generator=g) * 0.1
        H = torch.einsum("jbd,kbd->bjk", G, G)
        best = X[0].clone()
        lowest = torch.zeros(3, B)
        lowest[:2] = math.inf
        return [X, G, H, best, lowest, torch.zeros(2, B, 64), torch.zeros(B, dtype=torch.int32)]

    fx = torch.randn(B, D)
    out = {}
    fns = {}
    for backend in ("cpp", "reference"):
        b = bufs()
        k = m + 3  # ring full
        state = A.AndersonState(*b)
        A.anderson_step(state, fx, k, backend=backend)  # warm-up
        fns[backend] = (lambda state=state, backend=backend: A.anderson_step(state, fx, k, backend=backend))
        out[backend] = min(_timed(fns[backend], repeats))
    out["speedup"] = out["reference"] / out["cpp"]
    cpu, _ = _cpu_1thread(fns, lambda: None)
    out["cpu_1thread_s"] = cpu
    out["speedup_cpu_1thread"] = cpu["reference"] / cpu["cpp"]
    out["bytes_fused_model"] = (3 * m + 4) * B * D * 4  # see getfast/ops/anderson/__init__.py
    return out


def _require_torchdeq() -> None:
    try:
        import torchdeq  # noqa: F401
    except ImportError as exc:
        raise Skipped(f"torchdeq is not installed ({exc}); pip install torchdeq==0.1.0 to compare against it") from exc


def run(quick: bool = False) -> dict:
    _require_torchdeq()
    torch.manual_seed(0)
    B, D = (8, 8192) if quick else (32, 65536)
    m, lam, tol, stop_mode = 6, 1e-4, 1e-4, "rel"
    reps = 2 if quick else 7
    res = {
        "what": "getfast.deq vs torchdeq 0.1.0 (CPU)",
        "quick": quick,
        "machine": machine_info(),
        "loadavg": os.getloadavg(),
        "op_counts": _op_counts(4, 1000),
        "wall_to_tolerance": _wall_to_tolerance(B, D, m, lam, tol, stop_mode, reps),
        "other_solvers": _other_solvers(B, D, tol, stop_mode),
        "anderson_step_micro": _step_micro(B, D, m, reps),
        "memory": _memory(8, 8192, m) if quick else _memory(B, D, m),
    }
    return res


def report(res: dict) -> str:
    ops = markdown_table(
        ["solver", "ATen ops / iteration (excl. f)", "host syncs / iteration"],
        [(r["solver"], r["ops_per_iter"], r["syncs_per_iter"]) for r in res["op_counts"]],
    )
    w = res["wall_to_tolerance"]
    wall = markdown_table(
        ["", "getfast anderson (cpp)", "torchdeq anderson", "ratio (target ≤ 0.5)"],
        [
            ("f evaluations to tol", w["f_calls"]["ours"], w["f_calls"]["theirs"],
             w["f_calls"]["ours"] / w["f_calls"]["theirs"]),
            ("wall s to tol (median)", w["wall_s"]["ours"], w["wall_s"]["theirs"], w["ratio_wall"]),
            ("wall s to tol (min)", w["wall_min_s"]["ours"], w["wall_min_s"]["theirs"], w["ratio_wall_min"]),
            ("CPU s to tol, 1 thread", w["cpu_1thread_s"]["ours"], w["cpu_1thread_s"]["theirs"],
             w["ratio_cpu_1thread"]),
            ("solver ms / iteration excl. f (min wall)", 1e3 * w["overhead_per_iter_s"]["ours"],
             1e3 * w["overhead_per_iter_s"]["theirs"],
             w["overhead_per_iter_s"]["ours"] / w["overhead_per_iter_s"]["theirs"]),
            ("solver ms / iteration excl. f (CPU, 1 thread)", 1e3 * w["overhead_per_iter_cpu_1thread_s"]["ours"],
             1e3 * w["overhead_per_iter_cpu_1thread_s"]["theirs"],
             w["overhead_per_iter_cpu_1thread_s"]["ours"] / w["overhead_per_iter_cpu_1thread_s"]["theirs"]),
            ("max residual at exit", w["final_max_residual"]["ours"], w["final_max_residual"]["theirs"], ""),
        ],
    )
    mem = markdown_table(
        ["state dtype", "getfast history", "torchdeq history", "getfast peak (whole solve)",
         "torchdeq peak (whole solve)"],
        [(r["dtype"], fmt_bytes(r["ours_history_bytes"]),
          fmt_bytes(r["theirs_history_bytes"]) if r["theirs_history_bytes"] else "fails",
          fmt_bytes(r["ours_peak_bytes"]),
          fmt_bytes(r["theirs_peak_bytes"]) if r["theirs_peak_bytes"] else r.get("theirs_error", "fails"))
         for r in res["memory"]],
    )
    others = markdown_table(
        ["solver", "f evaluations getfast / torchdeq", "CPU s to tol, 1 thread, getfast", "torchdeq", "ratio"],
        [(r["solver"], f"{r['f_calls']['ours']} / {r['f_calls']['theirs']}", r["cpu_1thread_s"]["ours"],
          r["cpu_1thread_s"]["theirs"], r["ratio_cpu_1thread"]) for r in res["other_solvers"]],
    )
    s = res["anderson_step_micro"]
    load = ", ".join(f"{v:.1f}" for v in res["loadavg"])
    return (
        f"{res['what']}. Machine: {machine_line(res['machine'])}; load average {load}.\n\n"
        f"**Solver overhead** (B=4, D=1000, `tanh` map; f's own ops not counted; a getfast custom op "
        f"counts as one op):\n\n{ops}\n\n"
        f"**Time to tolerance** — B={w['B']}, D={w['D']}, f(z) = x + a⊙tanh(z) (a ∈ [0.5, 0.95]), "
        f"m={w['m']}, lam={w['lam']}, tol={w['tol']} ({w['stop_mode']}), each solver stopping by its own rule "
        f"(torchdeq: the current residual of every sample < tol; getfast: every sample's best residual "
        f"< tol, converged samples frozen). One f call: {1e3 * w['f_call_s']:.1f} ms (wall, min).\n\n"
        f"{wall}\n\n"
        f"Same problem, the other solvers (torchdeq `fixed_point_iter`, `broyden` with its defaults):\n\n"
        f"{others}\n\n"
        f"Fused step alone (B={w['B']}, D={w['D']}, m={w['m']}, ring full): cpp {1e3 * s['cpp']:.1f} ms vs "
        f"reference composition {1e3 * s['reference']:.1f} ms wall, min (**{s['speedup']:.1f}×**); "
        f"single-thread CPU {1e3 * s['cpu_1thread_s']['cpp']:.1f} vs {1e3 * s['cpu_1thread_s']['reference']:.1f} ms "
        f"(**{s['speedup_cpu_1thread']:.1f}×**); model of bytes moved by the fused step (3m+4)·B·D·4 = "
        f"{fmt_bytes(s['bytes_fused_model'])}.\n\n"
        f"**Memory** (Anderson, m={w['m']}, 12 iterations):\n\n{mem}\n"
        + ("\n(quick run)" if res["quick"] else "") + contention_note(res["machine"]) + "\n"
    )


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="small sizes, few repeats (smoke test)")
    args = ap.parse_args(argv)
    res = run(quick=args.quick)
    return publish(NAME, TITLE, res, report)


if __name__ == "__main__":
    main()
