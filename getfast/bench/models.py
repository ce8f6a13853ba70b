"""One step vs many: student sampling latency against the teacher's Heun sampler, and training
throughput eager vs ``torch.compile`` (CPU here; the same code times CUDA when present).

All ratios are measured in one process, interleaved, at the same batch size.

    python -m benchmarks --only models [--quick]   (or: python -m benchmarks.bench_models [--quick])
"""
from __future__ import annotations

import argparse

import torch

from getfast.bench.common import (contention_note, machine_info, machine_line, markdown_table, median_time,
                                  publish)

NAME = "models"
TITLE = "models — one step vs many, and torch.compile"
SHAPE = (1, 28, 28)  # the embedded Fashion-MNIST teacher's data


def _teacher():
    from getfast.teacher import EMBEDDED, build_denoiser, load

    if EMBEDDED["fashion-mnist"].exists():
        return load("fashion-mnist"), "embedded Fashion-MNIST teacher (UNet-S)"
    return build_denoiser("UNet-S", 28, 1, 10).eval(), "UNet-S (untrained, same architecture)"


def latency(batch: int, min_run_time: float) -> list[dict]:
    from getfast.diffusion import heun, nfe
    from getfast.models import create

    teacher, tname = _teacher()
    labels = torch.arange(batch) % 10
    z = torch.randn(batch, *SHAPE)
    rows = []
    with torch.no_grad():
        t_teacher = median_time(lambda: heun(teacher, z, steps=18, class_labels=labels), min_run_time=min_run_time)
        rows.append({"model": f"{tname}, Heun 18 steps", "nfe": nfe("heun", 18), "batch": batch,
                     "ms": t_teacher * 1e3, "speedup_vs_teacher": 1.0})
        for name in ("GET-N/4", "GET-T/2"):
            student = create(name, img_resolution=28, in_channels=1, num_classes=10).eval()
            t = median_time(lambda: student(z, labels), min_run_time=min_run_time)
            rows.append({"model": f"{name} (6 fixed-point iterations)", "nfe": 1, "batch": batch,
                         "params_M": sum(p.numel() for p in student.parameters()) / 1e6,
                         "ms": t * 1e3, "speedup_vs_teacher": t_teacher / t})
        student = load_student_if_any()
        if student is not None:
            t = median_time(lambda: student(z, labels), min_run_time=min_run_time)
            rows.append({"model": "committed SIM student (UNet-S, 1 step)", "nfe": 1, "batch": batch,
                         "ms": t * 1e3, "speedup_vs_teacher": t_teacher / t})
    return rows


def load_student_if_any():
    from getfast.methods import load_student
    from getfast.teacher import ASSETS
    p = ASSETS / "students" / "sim-fashion-mnist.safetensors"
    return load_student(p) if p.exists() else None


def train_throughput(batch: int, quick: bool) -> list[dict]:
    """img/s of the real training loop (``getfast.train.train``: update, EMA, logging) eager vs ``compile=True``,
    for the EDM teacher step of UNet-S and a GET-N/4 distillation step (random data; see bench/gpu_train.py)."""
    from getfast.bench.gpu_train import get_method, teacher_method, throughput

    plan = {"student": "GET-N/4", "teacher": "UNet-S", "resolution": 28, "channels": 1, "num_classes": 10,
            "batch": batch, "bf16": False}
    log_every, intervals = (3, 2) if quick else (5, 4)
    rows = []
    for name, make in (("UNet-S teacher step (EDM loss)", teacher_method),
                       ("GET-N/4 distillation step (6 states)", get_method)):
        e, c = (throughput(make, plan, torch.device("cpu"), compiled, log_every, intervals) for compiled in (False, True))
        rows.append({"model": name, "batch": batch, "eager_img_s": e["img_s"], "compiled_img_s": c["img_s"],
                     "compile_speedup": c["img_s"] / e["img_s"], "compile_time_s": c["warmup_excess_s"]})
    return rows


def run(quick: bool = False) -> dict:
    batch = 16 if quick else 64
    mrt = 0.5 if quick else 2.0
    return {"machine": machine_info(), "quick": quick, "latency": latency(batch, mrt),
            "train": train_throughput(batch, quick)}


def report(result: dict) -> str:
    lat = markdown_table(["sampler", "NFE", "batch", "ms / batch", "speed-up vs teacher"],
                         [[r["model"], r["nfe"], r["batch"], r["ms"], f"**{r['speedup_vs_teacher']:.1f}×**"]
                          for r in result["latency"]])
    tr = markdown_table(["train step", "batch", "eager img/s", "compiled img/s", "compile speed-up", "compile time s"],
                        [[r["model"], r["batch"], r["eager_img_s"], r["compiled_img_s"],
                          f"**{r['compile_speedup']:.2f}×**", r["compile_time_s"]] for r in result["train"]])
    return (f"Machine: {machine_line(result['machine'])}.\n\n"
            f"Sampling latency at 28×28×1, one batch, medians of torch.utils.benchmark:\n\n{lat}\n\n"
            f"Training throughput of the training loop itself, eager vs `compile=True` (`--compile`), same "
            f"process; compile time is the first logged interval's excess over the steady rate:\n\n{tr}\n"
            + ("\n(quick run)" if result.get("quick") else "")
            + contention_note(result["machine"], "even the ratios move with the load here, since the "
                                              "teacher and the students, and eager and compiled, are timed one after "
                                              "the other rather than interleaved") + "\n")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    result = run(args.quick)
    return publish(NAME, TITLE, result, report)


if __name__ == "__main__":
    main()
