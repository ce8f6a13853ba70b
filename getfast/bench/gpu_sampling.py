"""Sampling latency on the GPU: a one-step GET-B/2 student vs the UNet-DDPMpp teacher with Heun.

At 32×32×3 and batch 1 and 64: GET-B/2 (62.2M parameters, unconditional; its default solve of 6
fixed-point iterations) and the EDM UNet-DDPMpp teacher (class-conditional, 10 classes) sampled
with EDM's Heun sampler, 18 steps = 35 network evaluations. Weights are random (exported to a
temporary folder in getfast's checkpoint formats): latency depends on the architecture, not the
weights.

Variants, side by side in one process, each through ``getfast.sampling.load(ckpt, ...)`` — the
sampler ``getfast sample`` uses, its input checks and finite-output check included:

* eager fp32 (``bf16=False``; TF32 as the process has it, recorded in the device line),
* eager under bf16 autocast (``bf16=True``),
* CUDA graph (``bf16=True, compile=True``): the whole call — for the teacher all 35 evaluations —
  captured once per batch shape and replayed; the row is an error if the sampler fell back to
  eager (its reason is shown). The replay is checked against the eager bf16 result.

Where the exported checkpoints cannot be loaded, the same variants run on the modules directly —
the teacher through ``getfast.diffusion.heun``, the graph captured by
:class:`getfast.sampling.graphs.GraphCache`, the capture ``load(..., compile=True)`` uses — and the
section names which path ran and why. Latency = host wall time from call to finished result, synchronised,
median of several calls.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import torch

from getfast.bench.gpu_common import Budget, attempt, fmt, fmt_ratio, latency_ms, markdown_safe

NAME = "sampling"
TITLE = "GPU sampling latency — one-step GET-B/2 vs UNet-DDPMpp teacher (Heun, 35 evaluations)"

VARIANTS = ("eager fp32", "eager bf16", "CUDA graph bf16")
SAMPLER_PATH = "getfast.sampling.load (the Sampler of `getfast sample`)"


def _autocast(device, enabled: bool, cache: bool = True):
    if not enabled:
        return contextlib.nullcontext()
    # autocast's weight cast cache must be off inside a CUDA graph capture (PyTorch's CUDA graphs notes)
    return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=cache)


def models(plan: dict):
    """(student, teacher) with random weights, in eval mode, on the CPU."""
    from getfast.diffusion import EDMPrecond
    from getfast.models import create

    torch.manual_seed(0)
    r, c = plan["resolution"], plan["channels"]
    student = create(plan["student"], img_resolution=r, in_channels=c, num_classes=0)
    teacher = EDMPrecond(create(plan["teacher"], img_resolution=r, in_channels=c, num_classes=plan["num_classes"]))
    return student.eval().requires_grad_(False), teacher.eval().requires_grad_(False)


def export_checkpoints(plan: dict, folder: Path) -> tuple[Path, Path]:
    """Random-weight checkpoints of the student and the teacher in getfast's own formats (what
    ``getfast distill get`` and ``getfast train-teacher`` write), for ``getfast.sampling.load``."""
    from getfast.bench.gpu_train import RandomPairs
    from getfast.methods import save_student, student_meta
    from getfast.methods.get_distill import GETDistillConfig, GETDistillMethod
    from getfast.teacher import build_denoiser, export

    r, c, K = plan["resolution"], plan["channels"], plan["num_classes"]
    torch.manual_seed(0)
    method = GETDistillMethod(GETDistillConfig(model=plan["student"]), data=RandomPairs(1, (c, r, r)))
    student_path = folder / "student.safetensors"
    save_student(method.modules["student"], student_meta(method), student_path)
    teacher_path = folder / "teacher.safetensors"
    meta = {"model": plan["teacher"], "resolution": r, "channels": c, "num_classes": K, "label_dropout": 0.0,
            "data": "random weights (benchmark)"}
    export(build_denoiser(plan["teacher"], r, c, K), meta, teacher_path)
    return student_path, teacher_path


def _diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def _latency(fn, device, iters, warmup) -> dict:
    lat, err = attempt(lambda: latency_ms(fn, device, iters, warmup))
    return {"ms": lat["median"], "min_ms": lat["min"], "n": lat["n"]} if lat else {"error": err}


def sampler_variants(ckpt: Path, z, labels, device, iters: int, warmup: int, steps: int | None = None,
                     graph_backend=None) -> dict:
    """Latency of ``getfast.sampling.load(ckpt)`` eager fp32, eager bf16 and CUDA-graph bf16
    (``steps``: the teacher's Heun steps; None for a one-step student). ``graph_backend`` replaces the
    CUDA capture of the graph row (tests run its bookkeeping on the CPU with a stand-in)."""
    from getfast.sampling import load

    out: dict = {}
    for name, bf16, graph in (("eager fp32", False, False), ("eager bf16", True, False), ("CUDA graph bf16", True, True)):
        if graph and device.type != "cuda" and graph_backend is None:
            out[name] = {"error": "needs a CUDA device"}
            continue
        notes: list[str] = []
        kw = {} if not graph else {"compile": True} if graph_backend is None else {"graph_backend": graph_backend}
        sampler, err = attempt(lambda: load(str(ckpt), steps=steps, device=device, bf16=bf16, log=notes.append,
                                            **kw))
        if err:
            out[name] = {"error": err}
            continue
        entry = _latency(lambda: sampler(z, labels), device, iters, warmup)
        if graph and "error" not in entry:
            g = sampler.graphs
            bad = graph_entry(g, g is not None and g.replays >= 1)
            if bad:
                entry = bad
            else:
                eager = out.get("eager bf16", {}).get("_out")
                if eager is not None:  # only a deterministic sampler can be compared call for call
                    entry["max_abs_diff_vs_eager_bf16"] = _diff(sampler(z, labels), eager)
                entry.update(captures=g.captures, replays=g.replays, eager_calls=g.eager_calls)
        if name == "eager bf16" and "error" not in entry:
            first, second = sampler(z, labels), sampler(z, labels)
            if torch.equal(first, second):
                entry["_out"] = first
            else:
                entry["nondeterministic"] = "two eager calls differ (random fixed-point start): replay not compared"
        out[name] = entry
        sampler = None
        if device.type == "cuda":
            torch.cuda.empty_cache()
    for e in out.values():
        e.pop("_out", None)
    return out


def graph_entry(graphs, replayed: bool) -> dict | None:
    """An error entry when a call that should have replayed a CUDA graph ran eagerly (with the capture's
    reason), else None: a graph row must never time the eager path under the graph's name."""
    if graphs is not None and replayed and graphs.captures >= 1 and not graphs.reasons:
        return None
    why = "; ".join(graphs.reasons.values()) if graphs is not None and graphs.reasons else "no graph captured"
    return {"error": f"replayed eagerly, not from a CUDA graph: {why}"}


def module_variants(sample, z, device, iters: int, warmup: int, graph_backend=None) -> dict:
    """The same variants on a module directly (``sample(z)``), the graph captured and replayed by
    :class:`getfast.sampling.graphs.GraphCache` (the capture of ``getfast.sampling.load(..., compile=True)``;
    ``graph_backend`` replaces the CUDA capture, for tests)."""
    from getfast.sampling.graphs import GraphCache

    out: dict = {}
    with torch.no_grad():
        for name, bf16 in (("eager fp32", False), ("eager bf16", True)):
            def call(bf16=bf16):
                with _autocast(device, bf16):
                    return sample(z)
            out[name] = _latency(call, device, iters, warmup)
        if device.type != "cuda" and graph_backend is None:
            out["CUDA graph bf16"] = {"error": "needs a CUDA device"}
            return out

        def graph_fn(x, labels):
            with _autocast(device, True, cache=False):
                return (sample(x),)

        notes: list[str] = []
        graphs = GraphCache(graph_fn, backend=graph_backend, max_graphs=1, log=notes.append)
        replay, err = attempt(lambda: graphs(z)[0])
        bad = {"error": f"capture failed: {err}"} if err else graph_entry(graphs, graphs.replays >= 1)
        if bad:
            out["CUDA graph bf16"] = bad
            return out
        first, second = graph_fn(z, None)[0], graph_fn(z, None)[0]
        entry = ({"max_abs_diff_vs_eager_bf16": _diff(replay, first)} if torch.equal(first, second) else
                 {"nondeterministic": "two eager calls differ (random fixed-point start): replay not compared"})
        entry.update(_latency(lambda: graphs(z), device, iters, warmup))
        if "error" not in entry:
            bad = graph_entry(graphs, True)
            if bad:  # a later signature fell back: the timed calls were not all replays
                entry = bad
            else:
                entry.update(captures=graphs.captures, replays=graphs.replays, eager_calls=graphs.eager_calls)
        out["CUDA graph bf16"] = entry
        graphs = None  # frees the graph and its memory pool before the next model
    return out


DEFAULT_PLAN = {"student": "GET-B/2", "teacher": "UNet-DDPMpp", "resolution": 32, "channels": 3, "num_classes": 10,
                "batches": (1, 64), "heun_steps": 18,
                "student_iters": None, "teacher_iters": None,  # timed calls per variant (None: by --quick)
                "use_sampler": True}  # False: time the modules directly (the fallback path)


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None, plan: dict | None = None) -> dict:
    plan = {**DEFAULT_PLAN, **(plan or {})}
    student, teacher = models(plan)
    res = {"quick": quick, "plan": {k: (list(v) if isinstance(v, tuple) else v) for k, v in plan.items()},
           "nfe_teacher": 2 * plan["heun_steps"] - 1,
           "params_M": {"student": sum(p.numel() for p in student.parameters()) / 1e6,
                        "teacher": sum(p.numel() for p in teacher.parameters()) / 1e6},
           "rows": [], "skipped": []}
    r, c, K = plan["resolution"], plan["channels"], plan["num_classes"]
    with tempfile.TemporaryDirectory() as td:
        ckpts, why = (None, "plan asks for the modules") if not plan["use_sampler"] else \
            attempt(lambda: export_checkpoints(plan, Path(td)))
        res["path"] = SAMPLER_PATH if ckpts else f"modules directly, graph by GraphCache ({why})"
        if ckpts is None:
            from getfast.diffusion import heun

            student, teacher = student.to(device), teacher.to(device)
        for batch in plan["batches"]:
            g = torch.Generator(device=device).manual_seed(batch)
            z = torch.randn(batch, c, r, r, generator=g, device=device)
            labels = torch.arange(batch, device=device) % K
            for who, need, iters, warmup in (
                ("student", 20.0, plan["student_iters"] or (20 if quick else 100), 3),
                ("teacher", 40.0, plan["teacher_iters"] or (3 if quick else 10), 1),
            ):
                if not budget.allows(need):
                    res["skipped"].append(f"{who} batch {batch} ({budget.skip_note(need)})")
                    continue
                if ckpts is not None:
                    ckpt = ckpts[0] if who == "student" else ckpts[1]
                    variants = sampler_variants(ckpt, z, None if who == "student" else labels, device, iters, warmup,
                                                None if who == "student" else plan["heun_steps"])
                elif who == "student":
                    variants = module_variants(lambda x: student(x), z, device, iters, warmup)
                else:
                    variants = module_variants(lambda x: heun(teacher, x, plan["heun_steps"], labels), z, device,
                                               iters, warmup)
                res["rows"].append({"model": who, "batch": batch, "variants": variants})
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    for row in res["rows"]:  # one-step vs teacher, same batch and variant
        if row["model"] != "student":
            continue
        t = next((x for x in res["rows"] if x["model"] == "teacher" and x["batch"] == row["batch"]), None)
        for name, e in row["variants"].items():
            te = t["variants"].get(name, {}).get("ms") if t else None
            if te and e.get("ms"):
                e["speedup_vs_teacher"] = te / e["ms"]
    return res


def report(res: dict) -> str:
    from getfast.bench.common import markdown_table

    p = res["plan"]
    names = {"student": f"{p['student']} one step (6 fixed-point iterations)",
             "teacher": f"{p['teacher']} teacher, Heun {p['heun_steps']} steps ({res['nfe_teacher']} evaluations)"}
    lines = []
    for row in res["rows"]:
        cells = [names[row["model"]], row["batch"]]
        for v in VARIANTS:
            e = row["variants"].get(v, {})
            cells.append(markdown_safe(e["error"]) if e.get("error") else fmt(e.get("ms"), ".2f"))
        eager, graph = row["variants"].get("eager bf16", {}).get("ms"), row["variants"].get("CUDA graph bf16", {}).get("ms")
        cells.append(fmt_ratio(eager / graph) if (eager and graph) else "–")
        cells.append(fmt_ratio(row["variants"].get("CUDA graph bf16", {}).get("speedup_vs_teacher"))
                     if row["model"] == "student" else "")
        g = row["variants"].get("CUDA graph bf16", {})
        cells.append(fmt(g.get("max_abs_diff_vs_eager_bf16"), ".2g") if "max_abs_diff_vs_eager_bf16" in g
                     else ("random start: not compared" if row["variants"].get("eager bf16", {}).get("nondeterministic")
                           else "–"))
        lines.append(cells)
    text = (f"{p['resolution']}×{p['resolution']}×{p['channels']}, random weights "
            f"({res['params_M']['student']:.1f}M / {res['params_M']['teacher']:.1f}M parameters), sampled through "
            f"{res.get('path', '?')}. Latency: synchronised wall ms per batch, median. Graph = one CUDA-graph capture "
            f"of the whole bf16 call, replayed.\n\n"
            + markdown_table(["sampler", "batch", *[f"{v} ms" for v in VARIANTS], "graph speed-up vs eager bf16",
                              "one step vs teacher (graph)", "replay vs eager bf16, max abs diff"], lines) + "\n")
    if res["skipped"]:
        text += "\nNot measured: " + "; ".join(res["skipped"]) + "\n"
    return text
