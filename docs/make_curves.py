"""Learning curves: FID of a training run's EMA against the images it has seen, as PNGs in docs/.

    python docs/make_curves.py eval RUN [--n 1000] [--watch 600]   # FID of RUN's newest checkpoint(s)
    python docs/make_curves.py plot                                # docs/curves/*.jsonl -> docs/*.png

``eval`` measures the students RUN kept after each stage of docs/quality_runs.sh (``student-<K>kimg.safetensors``),
or, in a run without them, the EMA product of its newest good checkpoint (FID of ``--n`` samples from seeded
noise, classes cycled, against 10,000 Fashion-MNIST training images: the quick protocol of
docs/make_results.py) and appends {"kimg", "fid", "n"} to docs/curves/<run name>.jsonl, skipping a kimg
already measured. With ``--watch S`` it repeats every S seconds while the run trains (runs keep only their
newest checkpoints, so a curve is sampled while it is made). ``plot`` draws SIM's FID against kimg, GET
against ViT against training images, and GDD/GDD-I against kimg, from whichever curve files exist.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CURVES = ROOT / "docs" / "curves"


def product_from_checkpoint(run: Path):
    """(EMA product module, kimg seen, (C, H, W), classes) of the newest good checkpoint in ``run``."""
    import torch
    from getfast.train.checkpoint import latest_good_checkpoint
    path, state = latest_good_checkpoint(run)
    if state is None:
        raise FileNotFoundError(f"no readable checkpoint in {run}")
    cfg = dict(state["config"])
    name = cfg.pop("method")
    kimg = state["loop"]["nimg"] / 1000  # images the run has seen (train/loop.py's checkpoint format)
    from getfast.methods import METHODS
    cfg_cls, method_cls = METHODS[name]
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()}
    method = method_cls(cfg_cls(**fields))
    product = method.modules[method.ema_module]
    product.load_state_dict(state["ema"])
    product.eval().requires_grad_(False)
    torch.manual_seed(0)
    return product, kimg, tuple(method.shape), int(method.num_classes)


def records(path: Path) -> list[dict]:
    """The records of one curve file (docs/curves/<run>.jsonl); none when it does not exist yet."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def _measured(out: Path, kimg: float, n: int) -> bool:
    return any(abs(r["kimg"] - kimg) < 1e-9 and r["n"] == n for r in records(out))


def _measure(sample, shape, classes, kimg: float, n: int, out: Path, ref: str = "fashion-mnist",
             ref_n: int = 10000) -> dict:
    from getfast.metrics.fid import evaluate
    from make_results import seeded_sample_fn  # the same seeded noise and cycled classes as RESULTS.md
    t0 = time.time()
    res = evaluate(seeded_sample_fn(sample, shape, classes, seed=0), ref=ref, n=n, split="train",
                   ref_n=ref_n, batch_size=100, progress=False)
    rec = {"kimg": kimg, "fid": res["fid"], "n": n, **({} if ref == "fashion-mnist" else {"ref": ref, "ref_n": ref_n}),
           "seconds": round(time.time() - t0, 1)}
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
    return rec


def eval_once(run: Path, n: int, out: Path, ref: str = "fashion-mnist", ref_n: int = 10000) -> dict | None:
    """The newest checkpoint's EMA (None when its kimg is on the curve already)."""
    product, kimg, shape, classes = product_from_checkpoint(run)
    return None if _measured(out, kimg, n) else _measure(product, shape, classes, kimg, n, out, ref, ref_n)


STAGE_FILE = re.compile(r"student-(\d+(?:\.\d+)?)kimg\.safetensors$")


def eval_stage_files(run: Path, n: int, out: Path, ref: str = "fashion-mnist", ref_n: int = 10000) -> list[dict]:
    """The students docs/quality_runs.sh keeps after each stage (``student-<K>kimg.safetensors``), so a run trained
    where FID cannot be computed (a GPU machine without the Inception weights) gets its curve afterwards."""
    from getfast.sampling import load
    recs = []
    for f in sorted(run.glob("student-*kimg.safetensors"), key=lambda f: float(STAGE_FILE.search(f.name).group(1))):
        kimg = float(STAGE_FILE.search(f.name).group(1))
        if not _measured(out, kimg, n):
            s = load(str(f))
            recs.append(_measure(s, tuple(s.shape), s.num_classes, kimg, n, out, ref, ref_n))
    return recs


def read_curve(path: Path) -> list[tuple[float, float]]:
    return sorted((r["kimg"], r["fid"]) for r in records(path))


def plot(teacher_fid: float | None = None, floor_fid: float | None = None) -> list[Path]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []
    groups = {"sim": ("SIM: FID (n=1,000) against generator training images", ["sim"]),
              "get-vit": ("GET vs ViT: FID (n=1,000) against training images", ["get", "vit"]),
              "gdd": ("GDD and GDD-I: FID (n=1,000) against generator training images", ["gdd"]),
              "r16": ("16×16 regime: GET-P/2 vs ViT-P6/2 vs ViT-P5x/2, FID (n=1,000)", ["r16-"])}
    for name, (title, prefixes) in groups.items():
        files = sorted(p for p in CURVES.glob("*.jsonl") if any(p.stem.startswith(pre) for pre in prefixes))
        if not files:
            continue
        fig, ax = plt.subplots(figsize=(6, 4))
        for p in files:
            pts = read_curve(p)
            ax.plot([k for k, _ in pts], [f for _, f in pts], marker="o", label=p.stem)
        lines = (teacher_fid, floor_fid)
        if name == "r16":  # its own teacher and floor (16×16), not the 28×28 protocol's
            refs = json.loads((CURVES / "r16-refs.json").read_text()) if (CURVES / "r16-refs.json").exists() else {}
            lines = (refs.get("teacher"), refs.get("real"))
        if lines[0] is not None:
            ax.axhline(lines[0], color="k", ls="--", lw=1, label=f"teacher ({lines[0]:.1f})")
        if lines[1] is not None:  # FID's bias at n = 1,000: no model can score below real images
            ax.axhline(lines[1], color="grey", ls=":", lw=1, label=f"real test images ({lines[1]:.1f})")
        ax.set(xlabel="training images (kimg)", ylabel="FID", title=title)
        ax.grid(alpha=0.3)
        ax.legend()
        out = ROOT / "docs" / f"curves-{name}.png"
        fig.tight_layout()
        fig.savefig(out, dpi=120)
        plt.close(fig)
        written.append(out)
    return written


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    e = sub.add_parser("eval", help="FID of a run's newest checkpoint, appended to docs/curves/<name>.jsonl")
    e.add_argument("run", type=Path)
    e.add_argument("--n", type=int, default=1000, help="generated samples")
    e.add_argument("--name", default="", help="curve name (default: the run folder's name)")
    e.add_argument("--watch", type=float, default=0, help="repeat every this many seconds (0: once)")
    e.add_argument("--ref", default="fashion-mnist", help="reference images: fashion-mnist or an .npz")
    e.add_argument("--ref-n", type=int, default=10000, help="reference images used (the first ones)")
    sub.add_parser("plot", help="draw docs/curves-*.png from docs/curves/*.jsonl")
    r = sub.add_parser("refs", help="a curve group's scale lines: its teacher's FID and real test images' FID")
    r.add_argument("teacher", help="teacher run folder or weights (sampled with Heun, 18 steps)")
    r.add_argument("--ref", required=True, help="reference .npz (its first 10,000 images)")
    r.add_argument("--test", required=True, help=".npz of held-out real images (the floor at --n)")
    r.add_argument("--name", required=True, help="curve group: writes docs/curves/<name>-refs.json")
    r.add_argument("--n", type=int, default=1000)
    r.add_argument("--ref-n", type=int, default=10000)
    a = p.parse_args(argv)
    if a.cmd == "refs":
        from getfast.io import atomic_write_json
        from getfast.metrics.fid import evaluate
        from getfast.sampling import load
        from make_results import seeded_sample_fn
        s = load(a.teacher)
        kw = dict(ref=a.ref, n=a.n, split="train", ref_n=a.ref_n, batch_size=100, progress=False)
        rec = {"teacher": evaluate(seeded_sample_fn(s, tuple(s.shape), s.num_classes, seed=0), **kw)["fid"],
               "real": evaluate(a.test, **kw)["fid"], "n": a.n, "ref_n": a.ref_n, "teacher_sampler": s.description}
        print(json.dumps(rec))
        atomic_write_json(CURVES / f"{a.name}-refs.json", rec)
        return 0
    if a.cmd == "plot":
        from make_results import _records  # the quick protocol's records: the teacher and the real-data floor
        recs, teacher = _records(ROOT / "docs" / "fid" / "n1000")
        for out in plot(teacher, recs.get("real", {}).get("fid")):
            print(f"wrote {out}")
        return 0
    if a.n < 2:
        p.error(f"--n must be >= 2, got {a.n}")
    if not a.run.is_dir():
        p.error(f"run folder {a.run} does not exist")
    out = CURVES / f"{a.name or a.run.name}.jsonl"
    while True:
        if any(a.run.glob("student-*kimg.safetensors")):  # a staged run: its curve is its stage students
            recs = eval_stage_files(a.run, a.n, out, a.ref, a.ref_n)
        else:
            recs = [r for r in [eval_once(a.run, a.n, out, a.ref, a.ref_n)] if r]
        for rec in recs:
            print(json.dumps(rec), flush=True)
        if not recs:
            print("nothing new to measure", flush=True)
        if not a.watch:
            return 0
        time.sleep(a.watch)


if __name__ == "__main__":
    sys.exit(main())
