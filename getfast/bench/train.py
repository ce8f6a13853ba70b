"""Training img/s of ``getfast.train.train`` itself, eager then ``--compile`` (the first logged interval holds
compilation, reported as its excess) and peak memory: GPU bf16, batch 128, GET-B/2 distillation and (full runs)
the UNet-DDPMpp EDM teacher step at 32×32×3; CPU the Fashion-MNIST models (GET-N/4, UNet-S), fp32.
"""
from __future__ import annotations

import json
import statistics
import tempfile
from pathlib import Path

import torch

from getfast.bench.common import Budget, attempt, cell, fmt, fmt_bytes, fmt_ratio, machine_info, markdown_table, section

TITLES = {"cpu": "train — training throughput of the shared loop, eager vs torch.compile (CPU)",
          "cuda": "GPU training throughput — eager vs --compile (the shared loop, bf16)"}
DEFAULT_PLAN = {"student": "GET-B/2", "teacher": "UNet-DDPMpp", "resolution": 32, "channels": 3, "num_classes": 10,
                "batch": 128, "bf16": True, "compile": True}
CPU_PLAN = {"student": "GET-N/4", "teacher": "UNet-S", "resolution": 28, "channels": 1, "num_classes": 10, "batch": 64,
            "bf16": False, "compile": True}  # the Fashion-MNIST models


class RandomPairs:
    """Noise/image pairs in memory with the interface ``GETDistillMethod`` reads from a pair set."""

    def __init__(self, n: int, shape: tuple[int, int, int], seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.shape, self.num_classes = tuple(shape), 0
        self.noise, self.images = torch.randn(n, *shape, generator=g), torch.rand(n, *shape, generator=g) * 2 - 1

    def __len__(self):
        return len(self.noise)

    def batch(self, idx):
        return self.noise[idx], self.images[idx], None


def get_method(plan: dict, folder: Path | None = None):
    from getfast.methods.get_distill import GETDistillConfig, GETDistillMethod

    torch.manual_seed(0)
    shape = (plan["channels"], plan["resolution"], plan["resolution"])
    return GETDistillMethod(GETDistillConfig(model=plan["student"], lr=1e-4), data=RandomPairs(2 * plan["batch"], shape))


def teacher_method(plan: dict, folder: Path):
    import numpy as np

    from getfast.teacher import TeacherConfig, TeacherMethod

    n, r, c = 2 * plan["batch"], plan["resolution"], plan["channels"]
    np.savez(folder / "images.npz", x=np.random.default_rng(0).integers(0, 256, size=(n, r, r, c), dtype=np.uint8),
             y=np.arange(n, dtype=np.int64) % plan["num_classes"])
    return TeacherMethod(TeacherConfig(data=str(folder / "images.npz"), model=plan["teacher"], cond=True,
                                       label_dropout=0.1), seed=0)


def throughput(make_method, plan: dict, device: torch.device, compile: bool, log_every: int, intervals: int) -> dict:
    """Train ``1 + intervals`` logged intervals of ``log_every`` steps; img/s from the loop's own log."""
    from getfast.train import LoopConfig, train

    batch, steps = plan["batch"], log_every * (1 + intervals)
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        method = make_method(plan, td)
        cfg = LoopConfig(out=str(td / "run"), kimg=steps * batch / 1000, batch=batch, log_every=log_every,
                         ckpt_every=10**9, grid_every=0, grid_n=1, warmup_kimg=0.0, compile=compile, bf16=plan["bf16"],
                         device=device.type, progress=False)
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        train(method, cfg)
        peak = torch.cuda.max_memory_allocated(device) if cuda else None
        records = [json.loads(line) for line in (td / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
        del method
    if cuda:
        torch.cuda.empty_cache()
    if compile:
        torch._dynamo.reset()  # free the compiled graphs before the next model
    rates = [r["img_per_s"] for r in records[1:]]
    if not rates:
        raise RuntimeError(f"the loop logged {len(records)} record(s); need at least 2")
    steady = statistics.median(rates)
    return {"img_s": steady, "img_s_all": rates, "steps": steps, "first_interval_s": records[0]["time"],
            "warmup_excess_s": records[0]["time"] - log_every * batch / steady, "peak_bytes": peak}


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None, plan: dict | None = None,
        log_every: int | None = None, intervals: int | None = None) -> dict:
    cpu = device.type == "cpu"
    plan = {**(CPU_PLAN if cpu else DEFAULT_PLAN), **({"batch": 16} if cpu and quick else {}), **(plan or {})}
    log_every = log_every or ((3 if quick else 5) if cpu else (5 if quick else 10))
    intervals = intervals or (2 if quick else 4)
    res = {"quick": quick, "plan": plan, "log_every": log_every, "intervals": intervals, "rows": [], "skipped": [],
           "on": device.type, "machine": machine_info()}
    jobs = [(f"{plan['student']} distillation", get_method), (f"{plan['teacher']} EDM teacher step", teacher_method)]
    if quick and device.type == "cuda":
        res["skipped"].append(f"{jobs.pop()[0]} (quick run: one row)")
    cost = {False: 40.0, True: 150.0}  # seconds on one H100, compilation included
    rows = {label: {"model": label, "batch": plan["batch"]} for label, _ in jobs}
    for compiled in (False, True) if plan["compile"] else (False,):  # eager first: a tight budget keeps those
        for label, make in jobs:
            key = "compiled" if compiled else "eager"
            out = budget.measure(cost[compiled], f"{label} {key}", res["skipped"],
                                 lambda: attempt(lambda: throughput(make, plan, device, compiled, log_every, intervals)))
            if out:
                rows[label][key] = out[0] if out[1] is None else {"error": out[1]}
    for row in rows.values():
        e, c = row.get("eager", {}).get("img_s"), row.get("compiled", {}).get("img_s")
        row["compile_speedup"] = (c / e) if (e and c) else None
        res["rows"].append(row)
    return res


def report(res: dict) -> str:
    lines = [[r["model"], r["batch"], cell(r.get("eager"), "img_s", ".0f"), cell(r.get("compiled"), "img_s", ".0f"),
              fmt_ratio(r.get("compile_speedup")), cell(r.get("compiled"), "warmup_excess_s", ".0f"),
              *[fmt((r.get(k) or {}).get("peak_bytes"), fmt_bytes) for k in ("eager", "compiled")]] for r in res["rows"]]
    p = res["plan"]
    return section(res, f"{p['resolution']}×{p['resolution']}×{p['channels']}, batch {p['batch']}, bf16 autocast: "
                   f"{p['bf16']}; `getfast.train.train` for {1 + res['intervals']} log intervals of {res['log_every']} "
                   "steps, img/s = median of the loop's own rate over the intervals after the first.\n\n"
                   + markdown_table(["train step", "batch", "eager img/s", "compiled img/s", "compile speed-up",
                                     "compile + warm-up s", "eager peak memory", "compiled peak memory"], lines),
                   res.get("on") == "cpu")
