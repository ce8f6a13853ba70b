"""Sampling latency of a one-step GET student vs an EDM UNet teacher's Heun sampler (random weights, through
``getfast.sampling.load``): GPU GET-B/2 and UNet-DDPMpp at 32×32×3, eager fp32 / bf16 and the bf16 call replayed
from a CUDA graph (an error if it ran eagerly; checked against eager bf16); CPU GET-N/4 and UNet-S, fp32.
"""
from __future__ import annotations

import statistics
import tempfile
from pathlib import Path

import torch

from getfast.bench.common import Budget, attempt, cell, fmt, fmt_ratio, machine_info, markdown_table, section, wall_ms

TITLES = {"cpu": "sampling — one-step GET-N/4 vs the UNet-S teacher's Heun sampler (CPU latency)",
          "cuda": "GPU sampling latency — one-step GET-B/2 vs UNet-DDPMpp teacher (Heun, 35 evaluations)"}
VARIANTS = ("eager fp32", "eager bf16", "CUDA graph bf16")
NONDETERMINISTIC = "two eager calls differ (random fixed-point start): replay not compared"
DEFAULT_PLAN = {"student": "GET-B/2", "teacher": "UNet-DDPMpp", "resolution": 32, "channels": 3, "num_classes": 10,
                "batches": (1, 64), "heun_steps": 18,
                "student_iters": None, "teacher_iters": None}  # timed calls per variant (None: by --quick)
CPU_PLAN = {**DEFAULT_PLAN, "student": "GET-N/4", "teacher": "UNet-S", "resolution": 28, "channels": 1,
            "batches": (64,), "teacher_iters": 2}  # the Fashion-MNIST models


def export_checkpoints(plan: dict, folder: Path) -> tuple[Path, Path, dict]:
    """Random-weight student and teacher checkpoints as getfast writes them, and their parameters (millions)."""
    from getfast.bench.train import get_method
    from getfast.methods import save_student, student_meta
    from getfast.teacher import build_denoiser, export

    r, c, K = plan["resolution"], plan["channels"], plan["num_classes"]
    method = get_method({**plan, "batch": 1})
    student, teacher = method.modules["student"], build_denoiser(plan["teacher"], r, c, K)
    save_student(student, student_meta(method), folder / "student.safetensors")
    export(teacher, {"model": plan["teacher"], "resolution": r, "channels": c, "num_classes": K, "label_dropout": 0.0,
                     "data": "random weights (benchmark)"}, folder / "teacher.safetensors")
    params = {k: sum(p.numel() for p in m.parameters()) / 1e6 for k, m in (("student", student), ("teacher", teacher))}
    return folder / "student.safetensors", folder / "teacher.safetensors", params


def graph_entry(graphs) -> str | None:
    """Why a call that should have replayed a CUDA graph ran eagerly (an error row), else None."""
    reasons = "; ".join(graphs.reasons.values()) if graphs is not None else ""
    if graphs is not None and graphs.captures >= 1 and not reasons:
        return None
    return f"replayed eagerly, not from a CUDA graph: {reasons or 'no graph captured'}"


def sampler_variants(ckpt: Path, z, labels, device, iters: int, warmup: int, steps: int | None = None,
                     graph_backend=None) -> dict:
    """The three variants through ``getfast.sampling.load(ckpt)`` (``steps``: the teacher's Heun steps);
    ``graph_backend`` replaces the CUDA capture of the graph row (tests run its bookkeeping on CPU)."""
    from getfast.sampling import load

    out, eager = {}, None
    for name, bf16, graph in (("eager fp32", False, False), ("eager bf16", True, False), ("CUDA graph bf16", True, True)):
        if bf16 and device.type != "cuda" and graph_backend is None:
            out[name] = {"skipped": "needs a CUDA device" if graph else "CPU: fp32 only"}
            continue
        kw = {} if not graph else {"compile": True} if graph_backend is None else {"graph_backend": graph_backend}
        sampler, err = attempt(lambda: load(str(ckpt), steps=steps, device=device, bf16=bf16, log=lambda _: None, **kw))
        call = lambda: sampler(z, labels)  # noqa: E731
        if graph and err is None:  # the first call captures
            err = attempt(call)[1] or graph_entry(sampler.graphs)
        lat, err = (None, err) if err else attempt(lambda: wall_ms(call, device, iters, warmup))
        entry = out[name] = {"error": err} if err else {"ms": statistics.median(lat), "min_ms": min(lat), "n": len(lat)}
        if err is None and bf16:
            if not graph:  # only a deterministic sampler can be compared call for call
                first, second = call(), call()
                eager = first if torch.equal(first, second) else None
            elif eager is not None:
                entry["max_abs_diff_vs_eager_bf16"] = float((call().float() - eager.float()).abs().max())
            if eager is None:
                entry["nondeterministic"] = NONDETERMINISTIC
            if graph:  # every timed call must have been a replay
                g = sampler.graphs
                out[name] = {"error": graph_entry(g)} if graph_entry(g) else {
                    **entry, "captures": g.captures, "replays": g.replays, "eager_calls": g.eager_calls}
        sampler = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return out


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None, plan: dict | None = None) -> dict:
    cpu = device.type == "cpu"
    plan = {**(CPU_PLAN if cpu else DEFAULT_PLAN), **({"batches": (16,), "teacher_iters": 1} if cpu and quick else {}),
            **(plan or {})}
    res = {"quick": quick, "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.items()},
           "nfe_teacher": 2 * plan["heun_steps"] - 1, "rows": [], "on": device.type, "machine": machine_info(),
           "skipped": ["the bf16 and CUDA-graph rows (CPU: eager fp32 only)"] if cpu else []}
    r, c, K = plan["resolution"], plan["channels"], plan["num_classes"]
    with tempfile.TemporaryDirectory() as td:
        *ckpts, res["params_M"] = export_checkpoints(plan, Path(td))
        for batch in plan["batches"]:
            z = torch.randn(batch, c, r, r, generator=torch.Generator(device=device).manual_seed(batch), device=device)
            labels = torch.arange(batch, device=device) % K
            for t, need, iters, warmup in ((0, 20.0, plan["student_iters"] or (20 if quick else 100), 3),
                                           (1, 40.0, plan["teacher_iters"] or (3 if quick else 10), 1)):
                who = ("student", "teacher")[t]
                row = budget.measure(need, f"{who} batch {batch}", res["skipped"], lambda: {
                    "model": who, "batch": batch, "variants": sampler_variants(
                        ckpts[t], z, labels if t else None, device, iters, warmup, plan["heun_steps"] if t else None)})
                res["rows"] += [row] if row else []
    teacher = {(r["batch"], n): e.get("ms") for r in res["rows"] if r["model"] == "teacher" for n, e in r["variants"].items()}
    for row in (r for r in res["rows"] if r["model"] == "student"):  # one step vs the teacher, same batch and variant
        for name, e in row["variants"].items():
            if teacher.get((row["batch"], name)) and e.get("ms"):
                e["speedup_vs_teacher"] = teacher[row["batch"], name] / e["ms"]
    return res


def report(res: dict) -> str:
    p = res["plan"]
    names = {"student": f"{p['student']} one step (6 fixed-point iterations)",
             "teacher": f"{p['teacher']} teacher, Heun {p['heun_steps']} steps ({res['nfe_teacher']} evaluations)"}
    lines = []
    for row in res["rows"]:
        v = {n: row["variants"].get(n, {}) for n in VARIANTS}
        g, eager = v["CUDA graph bf16"], v["eager bf16"]
        lines.append([names[row["model"]], row["batch"], *[cell(e, "ms", ".2f") for e in v.values()],
                      fmt_ratio(eager["ms"] / g["ms"]) if (eager.get("ms") and g.get("ms")) else "–",
                      fmt_ratio(g.get("speedup_vs_teacher")) if row["model"] == "student" else "",
                      fmt(g["max_abs_diff_vs_eager_bf16"], ".2g") if "max_abs_diff_vs_eager_bf16" in g
                      else "random start: not compared" if eager.get("nondeterministic") else "–"])
    return section(res, f"{p['resolution']}×{p['resolution']}×{p['channels']}, random weights "
                   f"({res['params_M']['student']:.1f}M / {res['params_M']['teacher']:.1f}M parameters), sampled through "
                   "`getfast.sampling.load` (the sampler of `getfast sample`). Latency: synchronised wall ms per batch, "
                   "median. Graph = one CUDA-graph capture of the whole bf16 call, replayed.\n\n"
                   + markdown_table(["sampler", "batch", *[f"{v} ms" for v in VARIANTS], "graph speed-up vs eager bf16",
                                     "one step vs teacher (graph)", "replay vs eager bf16, max abs diff"], lines),
                   res.get("on") == "cpu", "quote nothing from this run")
