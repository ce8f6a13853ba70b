"""Noise/image pair generation rate: the teacher's Heun sampler (18 steps, 35 network evaluations per
pair) at batch 64, alone and inside ``make_pairs`` (seeded noise, quantisation, sha256, atomic shard
writes), plus the cost of reading pairs back (``PairDataset.batch`` with noise regenerated from seeds).

Teacher: the committed Fashion-MNIST teacher when present, else a freshly built UNet-S at 28×28×1
with 10 classes (the same architecture: the rate depends on the architecture, not the weights).

    python -m benchmarks --only pairs [--quick]   (or: python -m benchmarks.bench_pairs [--quick] [--threads N])
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from getfast.bench.common import machine_info, machine_line, markdown_table, update_results_md, write_json

NAME = "pairs"
TITLE = "pairs — teacher pair generation rate (make-pairs)"
BATCH, STEPS = 64, 18


def _teacher(tmp: Path):
    from getfast.teacher import EMBEDDED, build_denoiser, export, load
    path = EMBEDDED["fashion-mnist"]
    if path.exists():
        return str(path), "committed teacher-fashion-mnist.safetensors"
    torch.manual_seed(0)
    meta = {"model": "UNet-S", "resolution": 28, "channels": 1, "num_classes": 10, "label_dropout": 0.1}
    D = build_denoiser("UNet-S", 28, 1, 10)
    path = tmp / "unet-s.safetensors"
    export(D, meta, path)
    load(str(path))  # check it round-trips
    return str(path), "fresh UNet-S 28×28×1, 10 classes (committed teacher not present)"


def run(quick: bool = False) -> dict:
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
        shape = (m["channels"], m["resolution"], m["resolution"])
        params = sum(p.numel() for p in D.parameters())
        cond = bool(m["num_classes"])
        labels = (torch.arange(BATCH) % m["num_classes"]).to(device) if cond else None
        nfe = 2 * STEPS - 1

        def sync():
            if device.type == "cuda":
                torch.cuda.synchronize()

        heun(D, noise_batch(0, range(8), shape).to(device), steps=2,
             class_labels=labels[:8] if cond else None)  # warm-up
        # One batched network evaluation (what the sampler repeats 35 times), median of several.
        zf = noise_batch(9, range(BATCH), shape).to(device)
        sig = torch.full((BATCH,), 1.0, device=device)
        t_fwd = []
        with torch.no_grad():
            for _ in range(3 if quick else 7):
                sync()
                t0 = time.perf_counter()
                D(zf, sig, labels)
                sync()
                t_fwd.append(time.perf_counter() - t0)
        t_sampler, t_e2e = [], []
        for r in range(reps):  # interleaved: sampler alone, then the whole make_pairs path, per repetition
            z = noise_batch(r, range(BATCH), shape).to(device)
            sync()
            t0 = time.perf_counter()
            heun(D, z, steps=STEPS, class_labels=labels)
            sync()
            t_sampler.append(time.perf_counter() - t0)
            out = td / f"pairs{r}"
            cfg = PairsConfig(teacher=tpath, n=BATCH, out=str(out), cond=cond, shard_size=BATCH, batch=BATCH,
                              steps=STEPS, seed=r, progress=False, device=device.type)
            t0 = time.perf_counter()
            make_pairs(cfg)
            t_e2e.append(time.perf_counter() - t0)

        # Reading back: a training batch of 64 (noise regenerated from seeds) from the last set.
        ds = PairDataset(td / f"pairs{reps - 1}")
        idx = torch.randperm(len(ds))
        t_read = []
        for _ in range(20):
            t0 = time.perf_counter()
            ds.batch(idx)
            t_read.append(time.perf_counter() - t0)
        t_noise = []
        for _ in range(20):
            t0 = time.perf_counter()
            noise_batch(0, range(BATCH), shape)
            t_noise.append(time.perf_counter() - t0)
        t_noise = statistics.median(t_noise)

    ts, te, tr = statistics.median(t_sampler), statistics.median(t_e2e), statistics.median(t_read)
    tf = statistics.median(t_fwd)
    result = {
        "machine": machine_info(), "quick": quick, "load_avg_1m": os.getloadavg()[0], "device": str(device),
        "teacher": tdesc, "model": m["model"], "params": params, "shape": list(shape), "cond": cond,
        "batch": BATCH, "steps": STEPS, "nfe_per_pair": nfe, "repetitions": reps,
        "forward_s_batch64": tf, "forward_evals_per_s": BATCH / tf, "pairs_per_s_from_forward": BATCH / (nfe * tf),
        "sampler_s_per_batch": ts, "sampler_pairs_per_s": BATCH / ts, "sampler_evals_per_s": BATCH * nfe / ts,
        "sampler_forward_calls_per_s": nfe / ts,
        "make_pairs_s_per_64": te, "make_pairs_pairs_per_s": BATCH / te, "make_pairs_over_sampler": te / ts,
        "read_batch64_s": tr, "read_pairs_per_s": BATCH / tr, "noise_regen_us_per_sample": t_noise / BATCH * 1e6,
        "read_over_sampler": tr / ts,
    }
    return result


def report(result: dict) -> str:
    nfe, BATCH, reps = result["nfe_per_pair"], result["batch"], result["repetitions"]
    tf, ts = result["forward_s_batch64"], result["sampler_s_per_batch"]
    te, tr = result["make_pairs_s_per_64"], result["read_batch64_s"]
    shape = result["shape"]
    rows = [[f"one batched evaluation × {nfe} (estimate)", f"{BATCH / (nfe * tf):.2f}", f"{BATCH / tf:.0f}",
             f"{nfe * tf / ts:.2f}×"],
            ["Heun sampler alone", f"{BATCH / ts:.2f}", f"{BATCH * nfe / ts:.0f}", "1.00×"],
            ["`make_pairs` end to end (1 shard of 64)", f"{BATCH / te:.2f}", f"{BATCH * nfe / te:.0f}",
             f"{te / ts:.3f}×"],
            ["`PairDataset.batch(64)` read back (seeded noise)", f"{BATCH / tr:,.0f}", "—", f"{tr / ts:.1e}×"]]
    cores = result["machine"].get("cpu_count") or 1
    busy = result["load_avg_1m"] > cores
    caveat = (f" The machine was oversubscribed (load {result['load_avg_1m']:.1f} on {cores} cores): the absolute "
              f"rates are lower bounds, the ratios are the figures to quote."
              if busy else f" At {BATCH / te:.1f} pairs/s, 20k pairs take {20000 / (BATCH / te) / 3600:.1f} h "
              f"on this machine (split across ranks with torchrun).")
    return (f"Teacher: {result['teacher']}; {result['model']}, {result['params'] / 1e6:.2f}M parameters, "
            f"{shape[1]}×{shape[2]}×{shape[0]}, {'class-conditional' if result['cond'] else 'unconditional'}. "
            f"Heun {result['steps']} steps = {nfe} network evaluations per pair, batch {BATCH}, on {result['device']}.\n\n"
            f"Machine: {machine_line(result['machine'])}.\n\n"
            + markdown_table(["path", "pairs/s", "network evaluations/s (per image)", "time vs sampler"], rows)
            + f"\n\nMedian of {reps} interleaved repetition(s) in one process. Noise regeneration from per-sample "
            f"seeds: {result['noise_regen_us_per_sample']:.0f} µs per sample." + caveat
            + (" (quick run)" if result["quick"] else ""))


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--quick", action="store_true", help="one repetition")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    r = run(quick=args.quick)
    write_json(NAME, r)
    update_results_md(NAME, report(r), title=TITLE)
    print(f"sampler {r['sampler_pairs_per_s']:.2f} pairs/s ({r['sampler_evals_per_s']:.0f} evals/s); "
          f"make_pairs {r['make_pairs_pairs_per_s']:.2f} pairs/s ({r['make_pairs_over_sampler']:.3f}× sampler time); "
          f"read {r['read_pairs_per_s']:.0f} pairs/s")
    return r


if __name__ == "__main__":
    main()
