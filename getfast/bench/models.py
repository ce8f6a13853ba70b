"""One step vs many: student sampling latency against the teacher's Heun sampler, and training
throughput eager vs ``torch.compile`` (CPU here; the same code times CUDA when present).

All ratios are measured in one process, interleaved, at the same batch size.

    python -m benchmarks --only models [--quick]   (or: python -m benchmarks.bench_models [--quick])
"""
from __future__ import annotations

import argparse
import time

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


def _train_step_fn(model_fn, batch):
    def make(compiled: bool):
        torch.manual_seed(0)
        net, loss_fn, inputs = model_fn(batch)
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        fwd = torch.compile(net) if compiled else net

        def step():
            loss = loss_fn(fwd, *inputs)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return step
    return make


def _teacher_train(batch):
    from getfast.diffusion import EDMLoss
    from getfast.teacher import build_denoiser

    net = build_denoiser("UNet-S", 28, 1, 10, 0.1)
    y, labels = torch.randn(batch, *SHAPE), torch.arange(batch) % 10
    sigma, noise = EDMLoss().sample_sigma(batch, "cpu"), torch.randn(batch, *SHAPE)
    return net, lambda f, y, l: EDMLoss()(f, y, l, sigma=sigma, noise=noise).mean(), (y, labels)


def _get_train(batch):
    from getfast.models import create

    net = create("GET-N/4", img_resolution=28, in_channels=1, num_classes=10)
    z, x, labels = torch.randn(batch, *SHAPE), torch.randn(batch, *SHAPE), torch.arange(batch) % 10
    return net, lambda f, z, l: sum((s - x).abs().mean() for s in f(z, l)), (z, labels)


def train_throughput(batch: int, min_run_time: float) -> list[dict]:
    rows = []
    for name, fn in (("UNet-S teacher step (EDM loss)", _teacher_train), ("GET-N/4 distillation step (6 states)", _get_train)):
        make = _train_step_fn(fn, batch)
        eager, compiled = make(False), make(True)
        t0 = time.perf_counter()
        compiled()  # compile once, outside the timing
        compile_s = time.perf_counter() - t0
        te, tc = median_time(eager, min_run_time=min_run_time), median_time(compiled, min_run_time=min_run_time)
        rows.append({"model": name, "batch": batch, "eager_img_s": batch / te, "compiled_img_s": batch / tc,
                     "compile_speedup": te / tc, "compile_time_s": compile_s})
    return rows


def run(quick: bool = False) -> dict:
    batch = 16 if quick else 64
    mrt = 0.5 if quick else 2.0
    return {"machine": machine_info(), "quick": quick, "latency": latency(batch, mrt),
            "train": train_throughput(batch, mrt)}


def report(result: dict) -> str:
    lat = markdown_table(["sampler", "NFE", "batch", "ms / batch", "speed-up vs teacher"],
                         [[r["model"], r["nfe"], r["batch"], r["ms"], f"**{r['speedup_vs_teacher']:.1f}×**"]
                          for r in result["latency"]])
    tr = markdown_table(["train step", "batch", "eager img/s", "compiled img/s", "compile speed-up", "compile time s"],
                        [[r["model"], r["batch"], r["eager_img_s"], r["compiled_img_s"],
                          f"**{r['compile_speedup']:.2f}×**", r["compile_time_s"]] for r in result["train"]])
    return (f"Machine: {machine_line(result['machine'])}.\n\n"
            f"Sampling latency at 28×28×1, one batch, medians of torch.utils.benchmark:\n\n{lat}\n\n"
            f"Training throughput, eager vs `torch.compile` (default mode), same process:\n\n{tr}\n"
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
