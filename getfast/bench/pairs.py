"""Pair generation rate: the teacher's Heun sampler (35 evaluations per pair) at batch 64, alone and inside
``make_pairs``, and reading pairs back; the committed Fashion-MNIST teacher, else a fresh UNet-S (the rate
depends on the architecture, not the weights). On CUDA when present.
"""
from __future__ import annotations

import os
import statistics
import tempfile
from pathlib import Path

import torch

from getfast.bench.common import Budget, machine_info, markdown_table, section, wall_ms

TITLES = {"cpu": "pairs — teacher pair generation rate (make-pairs)"}
BATCH, STEPS = 64, 18


def _teacher(tmp: Path):
    from getfast.teacher import EMBEDDED, build_denoiser, export, load

    if EMBEDDED["fashion-mnist"].exists():
        return str(EMBEDDED["fashion-mnist"]), "committed teacher-fashion-mnist.safetensors"
    torch.manual_seed(0)
    meta = {"model": "UNet-S", "resolution": 28, "channels": 1, "num_classes": 10, "label_dropout": 0.1}
    export(build_denoiser("UNet-S", 28, 1, 10), meta, tmp / "unet-s.safetensors")
    load(str(tmp / "unet-s.safetensors"))  # check it round-trips
    return str(tmp / "unet-s.safetensors"), "fresh UNet-S 28×28×1, 10 classes (committed teacher not present)"


def run(device: torch.device, quick: bool, budget: Budget, peak_bw: float | None = None) -> dict:
    from getfast.data.pairs import PairDataset, noise_batch
    from getfast.diffusion import heun
    from getfast.sampling import PairsConfig, make_pairs
    from getfast.teacher import load

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    reps = 1 if quick else 3
    with tempfile.TemporaryDirectory() as td:
        td = Path(td)
        tpath, tdesc = _teacher(td)
        D = load(tpath, device=device)
        m = D.meta
        shape, cond = (m["channels"], m["resolution"], m["resolution"]), bool(m["num_classes"])
        labels = (torch.arange(BATCH) % m["num_classes"]).to(device) if cond else None
        heun(D, noise_batch(0, range(8), shape).to(device), steps=2, class_labels=labels[:8] if cond else None)  # warm-up
        zf, sig = noise_batch(9, range(BATCH), shape).to(device), torch.full((BATCH,), 1.0, device=device)
        with torch.no_grad():  # one batched network evaluation (what the sampler repeats 35 times)
            t_fwd = wall_ms(lambda: D(zf, sig, labels), device, 3 if quick else 7)
        t_sampler, t_e2e = [], []
        for r in range(reps):  # interleaved: the sampler alone, then the whole make_pairs path
            z = noise_batch(r, range(BATCH), shape).to(device)
            t_sampler += wall_ms(lambda: heun(D, z, steps=STEPS, class_labels=labels), device)
            cfg = PairsConfig(teacher=tpath, n=BATCH, out=str(td / f"pairs{r}"), cond=cond, shard_size=BATCH, batch=BATCH,
                              steps=STEPS, seed=r, progress=False, device=device.type)
            t_e2e += wall_ms(lambda: make_pairs(cfg), device)
        ds = PairDataset(td / f"pairs{reps - 1}")  # a training batch of 64 from the last set
        idx = torch.randperm(len(ds))
        t_read = wall_ms(lambda: ds.batch(idx), torch.device("cpu"), 20)
        t_noise = statistics.median(wall_ms(lambda: noise_batch(0, range(BATCH), shape), torch.device("cpu"), 20)) / 1e3
    nfe = 2 * STEPS - 1
    tf, ts, te, tr = (statistics.median(t) / 1e3 for t in (t_fwd, t_sampler, t_e2e, t_read))
    return {"machine": machine_info(), "quick": quick, "load_avg_1m": os.getloadavg()[0], "device": str(device),
            "teacher": tdesc, "model": m["model"], "params": sum(p.numel() for p in D.parameters()), "shape": list(shape),
            "cond": cond, "batch": BATCH, "steps": STEPS, "nfe_per_pair": nfe, "repetitions": reps,
            "forward_s_batch64": tf, "forward_evals_per_s": BATCH / tf, "pairs_per_s_from_forward": BATCH / (nfe * tf),
            "sampler_s_per_batch": ts, "sampler_pairs_per_s": BATCH / ts, "sampler_evals_per_s": BATCH * nfe / ts,
            "sampler_forward_calls_per_s": nfe / ts, "make_pairs_s_per_64": te, "make_pairs_pairs_per_s": BATCH / te,
            "make_pairs_over_sampler": te / ts, "read_batch64_s": tr, "read_pairs_per_s": BATCH / tr,
            "noise_regen_us_per_sample": t_noise / BATCH * 1e6, "read_over_sampler": tr / ts}


def report(res: dict) -> str:
    nfe, B, reps = res["nfe_per_pair"], res["batch"], res["repetitions"]
    tf, ts, te, tr = res["forward_s_batch64"], res["sampler_s_per_batch"], res["make_pairs_s_per_64"], res["read_batch64_s"]
    rows = [[f"one batched evaluation × {nfe} (estimate)", f"{B / (nfe * tf):.2f}", f"{B / tf:.0f}", f"{nfe * tf / ts:.2f}×"],
            ["Heun sampler alone", f"{B / ts:.2f}", f"{B * nfe / ts:.0f}", "1.00×"],
            ["`make_pairs` end to end (1 shard of 64)", f"{B / te:.2f}", f"{B * nfe / te:.0f}", f"{te / ts:.3f}×"],
            ["`PairDataset.batch(64)` read back (seeded noise)", f"{B / tr:,.0f}", "—", f"{tr / ts:.1e}×"]]
    cores, shape = res["machine"].get("cpu_count") or 1, res["shape"]
    caveat = (f" The machine was oversubscribed (load {res['load_avg_1m']:.1f} on {cores} cores): the absolute rates are "
              f"lower bounds, the ratios are the figures to quote." if res["load_avg_1m"] > cores else
              f" At {B / te:.1f} pairs/s, 20k pairs take {20000 / (B / te) / 3600:.1f} h on this machine (split across "
              f"ranks with torchrun).")
    return section(res, f"Teacher: {res['teacher']}; {res['model']}, {res['params'] / 1e6:.2f}M parameters, {shape[1]}×"
                   f"{shape[2]}×{shape[0]}, {'class-conditional' if res['cond'] else 'unconditional'}. Heun {res['steps']} "
                   f"steps = {nfe} network evaluations per pair, batch {B}, on {res['device']}.\n\n"
                   + markdown_table(["path", "pairs/s", "network evaluations/s (per image)", "time vs sampler"], rows)
                   + f"\n\nMedian of {reps} interleaved repetition(s) in one process. Noise regeneration from per-sample "
                   f"seeds: {res['noise_regen_us_per_sample']:.0f} µs per sample." + caveat
                   + (" (quick run)" if res["quick"] else ""), True)
