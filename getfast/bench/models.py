"""One step vs many on the CPU: student sampling latency against the teacher's Heun sampler (18 steps),
and training throughput of the real loop eager vs ``torch.compile`` (the GPU figures: ``sampling``
and ``train`` with ``--device cuda``). Same process, same batch; the embedded Fashion-MNIST teacher
(or an untrained UNet-S of the same architecture), GET-N/4, GET-T/2 and the committed SIM student.
"""
from __future__ import annotations

import torch

from getfast.bench.common import Budget, contention_note, machine_info, machine_line, markdown_table, median_s

TITLES = {"cpu": "models — one step vs many, and torch.compile"}
SHAPE = (1, 28, 28)  # the embedded Fashion-MNIST teacher's data


def latency(batch: int, min_run_time: float) -> list[dict]:
    from getfast.diffusion import heun, nfe
    from getfast.methods import load_student
    from getfast.models import create
    from getfast.teacher import ASSETS, EMBEDDED, build_denoiser, load

    if EMBEDDED["fashion-mnist"].exists():
        teacher, tname = load("fashion-mnist"), "embedded Fashion-MNIST teacher (UNet-S)"
    else:
        teacher, tname = build_denoiser("UNet-S", 28, 1, 10).eval(), "UNet-S (untrained, same architecture)"
    labels, z = torch.arange(batch) % 10, torch.randn(batch, *SHAPE)
    students = [(f"{name} (6 fixed-point iterations)", create(name, img_resolution=28, in_channels=1, num_classes=10).eval())
                for name in ("GET-N/4", "GET-T/2")]
    sim = ASSETS / "students" / "sim-fashion-mnist.safetensors"
    if sim.exists():
        students.append(("committed SIM student (UNet-S, 1 step)", load_student(sim)))
    with torch.no_grad():
        t_teacher = median_s(lambda: heun(teacher, z, steps=18, class_labels=labels), min_run_time)
        rows = [{"model": f"{tname}, Heun 18 steps", "nfe": nfe("heun", 18), "batch": batch, "ms": t_teacher * 1e3,
                 "speedup_vs_teacher": 1.0}]
        for name, student in students:
            t = median_s(lambda: student(z, labels), min_run_time)
            row = {"model": name, "nfe": 1, "batch": batch, "ms": t * 1e3, "speedup_vs_teacher": t_teacher / t}
            if name.startswith("GET"):
                row["params_M"] = sum(p.numel() for p in student.parameters()) / 1e6
            rows.append(row)
    return rows


def train_throughput(batch: int, quick: bool) -> list[dict]:
    """img/s of ``getfast.train.train`` eager vs ``compile=True`` for the EDM teacher step of UNet-S and a
    GET-N/4 distillation step (random data; :mod:`getfast.bench.train`)."""
    from getfast.bench.train import get_method, teacher_method, throughput

    plan = {"student": "GET-N/4", "teacher": "UNet-S", "resolution": 28, "channels": 1, "num_classes": 10,
            "batch": batch, "bf16": False}
    log_every, intervals = (3, 2) if quick else (5, 4)
    rows = []
    for name, make in (("UNet-S teacher step (EDM loss)", teacher_method), ("GET-N/4 distillation step (6 states)", get_method)):
        e, c = (throughput(make, plan, torch.device("cpu"), compiled, log_every, intervals) for compiled in (False, True))
        rows.append({"model": name, "batch": batch, "eager_img_s": e["img_s"], "compiled_img_s": c["img_s"],
                     "compile_speedup": c["img_s"] / e["img_s"], "compile_time_s": c["warmup_excess_s"]})
    return rows


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None) -> dict:
    batch = 16 if quick else 64
    return {"machine": machine_info(), "quick": quick, "latency": latency(batch, 0.5 if quick else 2.0),
            "train": train_throughput(batch, quick)}


def report(result: dict) -> str:
    lat = markdown_table(["sampler", "NFE", "batch", "ms / batch", "speed-up vs teacher"],
                         [[r["model"], r["nfe"], r["batch"], r["ms"], f"**{r['speedup_vs_teacher']:.1f}×**"]
                          for r in result["latency"]])
    tr = markdown_table(["train step", "batch", "eager img/s", "compiled img/s", "compile speed-up", "compile time s"],
                        [[r["model"], r["batch"], r["eager_img_s"], r["compiled_img_s"], f"**{r['compile_speedup']:.2f}×**",
                          r["compile_time_s"]] for r in result["train"]])
    return (f"Machine: {machine_line(result['machine'])}.\n\nSampling latency at 28×28×1, one batch, medians of "
            f"torch.utils.benchmark:\n\n{lat}\n\nTraining throughput of the training loop itself, eager vs `compile=True` "
            f"(`--compile`), same process; compile time is the first logged interval's excess over the steady rate:\n\n"
            f"{tr}\n" + ("\n(quick run)" if result.get("quick") else "")
            + contention_note(result["machine"], "even the ratios move with the load here, since the teacher and the "
                              "students, and eager and compiled, are timed one after the other rather than interleaved")
            + "\n")
