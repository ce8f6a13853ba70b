"""``getfast`` command line. Every subcommand's options come from typed dataclass configs (defaults shown).

Each command first builds all of its configs (their checks run then), checks the device and that the output
paths can be written, and only then loads models or computes anything. Bad input is one line
``getfast <cmd>: error: ...`` and exit status 2; Ctrl-C (exit 130) and SIGTERM (exit 143) say how to
continue; an internal error keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import errno
import re
import shlex
import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path

from getfast.options import add_config, check_bool, check_choice, check_number, check_text, take_config

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_TERMINATED = 143  # 128 + SIGTERM: what a shell reports for a process that SIGTERM ended


class UsageError(ValueError):
    """Bad input found by the CLI itself (reported in one line, exit status 2)."""


def _fmt():
    return argparse.ArgumentDefaultsHelpFormatter


# A negative number in any notation (-1, -.5, -1e-3, -inf): argparse's own pattern misses exponents, so
# ``--lr -1e-3`` read as a second option and failed with "expected one argument" instead of the range check.
_NEGATIVE_NUMBER = re.compile(r"^-(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?$|^-(inf|infinity|nan)$", re.IGNORECASE)


class _Parser(argparse.ArgumentParser):
    """Parse errors are one line, ``getfast <cmd>: error: ...``, exit status 2 (the usage is in ``--help``).
    Negative numbers are values, not options (no option of getfast looks like one)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = _NEGATIVE_NUMBER

    def error(self, message):
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message}\n")

    def parse_args(self, args=None, namespace=None):
        ns, extras = self.parse_known_args(args, namespace)
        if extras:  # name the subcommand whose options these are not
            words = [w for w in (getattr(ns, "command", None), getattr(ns, "method", None)) if w]
            self.exit(EXIT_USAGE, f"{' '.join([self.prog, *words])}: error: unrecognized arguments: "
                                  f"{' '.join(extras)}\n")
        return ns


# --- configs of the commands without a library config ------------------------------------------------

@dataclass
class RuntimeConfig:
    """Process settings."""

    tf32: bool = True   # CUDA: TF32 tensor cores for float32 matmuls and convolutions (--no-tf32: full float32)


@dataclass
class FIDConfig:
    """FID of a teacher/student checkpoint's samples, or of an image folder/.npz, against a reference set."""

    gen: str = dataclasses.field(kw_only=True)  # checkpoint (embedded name, .safetensors, run folder) or image folder/.npz
    ref: str = "fashion-mnist"       # fashion-mnist | image folder | .npz (images, or mu/sigma statistics)
    split: str = "train"             # reference split of a named dataset: train | test
    n: int = 10000                   # generated images
    ref_n: int = 10000               # reference images (0: all); their statistics are cached
    sampler: str | None = None       # teacher sampler: heun | euler | ddim (checkpoints only; None: the model's own)
    steps: int | None = None         # sampler steps (None: the model's own)
    cfg_scale: float | None = None   # guidance weight w (conditional teachers, guided students)
    batch: int = 50                  # images per batch (sampling and Inception)
    seed: int = 0                    # seed of the noise and labels
    device: str = "auto"             # auto | cpu | cuda | cuda:N (sampling and Inception)
    bf16: bool | None = None         # bf16 autocast for sampling (None: on for CUDA)
    compile: bool = False            # CUDA: replay sampling from CUDA graphs; CPU: torch.compile
    online: bool = False             # use clean-fid's own (downloaded) Inception instead of the bundled one
    out: str = ""                    # also write the result JSON here ("": print only)
    allow_fewer: bool = False        # an image folder/.npz with fewer than --n images: use them all (else refused)

    def __post_init__(self):
        from getfast.limits import MAX_SEED
        from getfast.metrics.fid import _NAMED_DATASETS
        from getfast.sampling.sampler import SAMPLERS
        check_text("gen", self.gen, "a checkpoint or an image folder")
        for name, lo in (("n", 2), ("ref_n", 0), ("batch", 1)):
            check_number(name, getattr(self, name), lo=lo, integer=True)
        check_number("seed", self.seed, lo=0, hi=MAX_SEED, integer=True)
        check_bool("allow_fewer", self.allow_fewer)
        if self.ref.lower() not in _NAMED_DATASETS and not Path(self.ref).expanduser().exists():
            raise ValueError(f"ref (--ref) {self.ref!r}: not a known dataset ({', '.join(sorted(set(_NAMED_DATASETS.values())))}) "
                             f"and no such file or folder")
        if self.ref.lower() in _NAMED_DATASETS and self.split not in ("train", "test"):
            raise ValueError(f"split (--split) must be train or test, got {self.split!r}")
        if self.sampler is not None:
            check_choice("sampler", self.sampler, SAMPLERS)
        if self.steps is not None:
            check_number("steps", self.steps, lo=1, integer=True)
        if self.cfg_scale is not None:
            check_number("cfg_scale", self.cfg_scale)
        if self.out and Path(self.out).suffix.lower() != ".json":
            raise ValueError(f"out (--out) must be a .json file, got {self.out!r}")
        if self.gen_kind() == "images":
            given = [f"--{k.replace('_', '-')}" for k in ("sampler", "steps", "cfg_scale") if getattr(self, k) is not None]
            given += ["--compile"] if self.compile else []
            if given:
                raise ValueError(f"{', '.join(given)} apply to checkpoints; --gen {self.gen} holds images")
        elif self.allow_fewer:
            raise ValueError(f"--allow-fewer applies to image folders and .npz files; --gen {self.gen} is a checkpoint "
                             f"(it is sampled --n times)")

    def gen_kind(self) -> str:
        """"images" (a folder of images or an .npz) or "checkpoint"; a missing path is a ValueError."""
        from getfast.embedded import EMBEDDED
        if self.gen in EMBEDDED:
            return "checkpoint"
        p = Path(self.gen).expanduser()
        if not p.exists():
            raise ValueError(f"gen (--gen) {self.gen!r}: no such file or folder (and not an embedded teacher: "
                             f"{', '.join(sorted(EMBEDDED))})")
        if p.is_dir():
            from getfast.importers import is_diffusers_dir
            run = (p / "student.safetensors").exists() or (p / "teacher.safetensors").exists() \
                or (p / "config.json").exists() or any(p.glob("ckpt-*.pt")) or is_diffusers_dir(p)
            return "checkpoint" if run else "images"
        return "images" if p.suffix.lower() == ".npz" else "checkpoint"


# --- checks before any work --------------------------------------------------------------------------

def _check_devices(configs) -> None:
    from getfast.sampling.sampler import resolve_device
    for cfg in configs:
        dev = getattr(cfg, "device", None)
        if isinstance(dev, str) and dev.startswith("cuda"):
            try:
                resolve_device(dev)
            except ValueError as e:
                raise UsageError(f"--device {dev}: {str(e).split(': ', 1)[-1]}") from None


def _check_out(path, kind: str) -> None:
    from getfast.io import check_writable
    try:
        check_writable(path, kind)
    except OSError as e:
        raise UsageError(f"out (--out) {path}: cannot write there: {e.strerror}") from None


# --- commands: prepare(ns) builds and checks everything, then returns the job ---------------------

def _prep_train_teacher(ns):
    from getfast.teacher import TeacherConfig, TeacherMethod
    from getfast.train import LoopConfig
    from getfast.train.loop import fit
    tcfg = take_config(TeacherConfig, ns)
    loop = take_config(LoopConfig, ns)
    evaluator = _evaluator(ns)
    _check_devices([loop])
    _check_out(loop.out, "folder")

    def job():
        path = fit(TeacherMethod(tcfg, seed=loop.seed, fused=loop.compile), loop, evaluator=evaluator)
        if path is not None:
            print(f"teacher weights: {path}")
    return job, loop


def _prep_distill(ns):
    import torch

    from getfast.methods import METHODS
    from getfast.train import LoopConfig
    from getfast.train.loop import fit
    cfg_cls, method_cls = METHODS[ns.method]
    preset = _preset_of(ns)
    cfg = take_config(cfg_cls, ns)
    loop = take_config(LoopConfig, ns)
    evaluator = _evaluator(ns)
    if evaluator is not None and hasattr(method_cls, "run_stages"):
        raise UsageError(f"--fid-every/--tensorboard: not available for the multi-stage {ns.method} method "
                         f"(measure each stage's student with getfast fid)")
    _check_devices([loop])
    _check_out(loop.out, "folder")

    def job():
        torch.manual_seed(loop.seed)  # students' initial weights (fresh networks, heads) follow --seed
        if hasattr(method_cls, "run_stages"):  # multi-stage methods (guided) train and export each stage themselves
            method_cls.run_stages(cfg, loop)
            return
        method = method_cls(cfg, fused=loop.compile)  # --compile: fused Adam too
        if preset is not None and tuple(method.shape[-2:]) != (preset.resolution,) * 2:
            raise ValueError(f"--preset {preset.name} is the recipe for {preset.resolution}×{preset.resolution} images "
                             f"({preset.teacher}); this run's images are {method.shape[-2]}×{method.shape[-1]}")
        path = fit(method, loop, evaluator=evaluator)
        if path is not None:
            print(f"student weights: {path}")
    return job, loop


def _evaluator(ns):
    """The evaluation during training that ``--fid-every``/``--tensorboard`` ask for (None: none)."""
    from getfast.metrics.train_eval import EvalConfig, Evaluator
    cfg = take_config(EvalConfig, ns)
    return Evaluator(cfg, device=getattr(ns, "device", None) if getattr(ns, "device", "auto") != "auto" else None) \
        if cfg.active else None


def _prep_sample(ns):
    from getfast.sampling import SampleConfig, sample_grid
    cfg = take_config(SampleConfig, ns)
    _check_devices([cfg])
    _check_out(cfg.out, "file")
    return (lambda: sample_grid(cfg)), cfg


def _prep_make_pairs(ns):
    from getfast.sampling import PairsConfig, make_pairs
    cfg = take_config(PairsConfig, ns)
    _check_devices([cfg])
    _check_out(cfg.out, "folder")
    return (lambda: make_pairs(cfg)), cfg


def _prep_demo(ns):
    from getfast.demo import DemoConfig, preflight, run_demo
    cfg = take_config(DemoConfig, ns)
    _check_out(cfg.out, "folder")
    preflight(cfg)
    return (lambda: run_demo(cfg)), cfg


def _prep_bench(ns):
    from getfast.bench import BenchConfig, run
    cfg = take_config(BenchConfig, ns)
    _check_devices([cfg])
    if cfg.out:
        _check_out(cfg.out, "folder")
    return (lambda: run(cfg)), cfg


def _prep_convert(ns):
    from getfast.importers import ConvertConfig, convert
    cfg = take_config(ConvertConfig, ns)
    if not cfg.src or not cfg.out:
        raise ValueError("convert needs --from (an EDM .pkl or a diffusers folder) and --out (a .safetensors file)")
    if not Path(cfg.src).expanduser().exists():
        raise ValueError(f"from (--from) {cfg.src!r}: no such file or folder")
    _check_out(cfg.out, "file")
    return (lambda: convert(cfg)), cfg


def _prep_fid(ns):
    cfg = take_config(FIDConfig, ns)
    _check_devices([cfg])
    if cfg.out:
        _check_out(cfg.out, "file")
    return (lambda: fid_command(cfg)), cfg


def fid_command(cfg: FIDConfig, log=print) -> dict:
    """FID of ``cfg.gen`` through :func:`getfast.metrics.fid.evaluate` (a checkpoint is sampled first)."""
    import json

    import torch

    from getfast.metrics.fid import evaluate
    from getfast.sampling import load, resolve_device
    device = resolve_device(cfg.device)
    nfe = None
    if cfg.gen_kind() == "checkpoint":
        s = load(cfg.gen, sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg_scale, device=device,
                 compile=cfg.compile, bf16=cfg.bf16)
        nfe = s.evaluations
        g = torch.Generator().manual_seed(cfg.seed)

        def gen(b):
            z = torch.randn(b, *s.shape, generator=g)
            return s(z, torch.randint(0, s.num_classes, (b,), generator=g) if s.num_classes else None)
    else:
        gen = cfg.gen
    rec = evaluate(gen, cfg.ref, n=cfg.n, split=cfg.split, batch_size=cfg.batch, ref_n=cfg.ref_n,
                   online=cfg.online, device=device, allow_fewer=cfg.allow_fewer)
    rec.update({"gen": cfg.gen, "nfe": nfe, "online_inception": cfg.online, "seed": cfg.seed,
                "sampler": None if nfe is None else s.description})
    log(json.dumps(rec))
    if cfg.out:
        from getfast.io import atomic_write_json
        atomic_write_json(cfg.out, rec)
    return rec


# --- presets: the official runs' recipes (getfast.presets) -------------------------------------------

def _add_preset_option(p, method: str) -> None:
    from getfast.presets import presets_for
    known = presets_for(method)
    if not known:
        return
    runs = "; ".join(f"{x.name}: {x.summary} ({x.source})" for x in known)
    p.add_argument("--preset", default="", metavar="NAME",
                   help=f"an official run's recipe (getfast presets prints each one's values); options given on the "
                        f"command line override it. {runs}")
    p.set_defaults(_subparser=p)


def _apply_preset(parser, ns, argv):
    """Parse ``argv`` again with the preset's values as the subcommand's defaults, so explicit options win; the
    files a preset cannot know (teacher, data, pairs) must then be given."""
    name = getattr(ns, "preset", "")
    if not name:
        return ns
    from getfast.presets import get_preset
    preset = get_preset(name, ns.method)
    ns._subparser.set_defaults(**preset.values(), **{k: "" for k in preset.needs})
    ns = parser.parse_args(argv)
    what = {"teacher": f"the teacher, {preset.teacher} (an NVlabs/edm pickle or its getfast conversion)",
            "data": f"the real {preset.summary.split(', ', 1)[1]} images at {preset.resolution}×{preset.resolution}",
            "pairs": f"the pairs folder made by getfast make-pairs from {preset.teacher}"}
    for k in preset.needs:
        if getattr(ns, k) == "":
            raise UsageError(f"--preset {name} needs --{k}: {what[k]}")
    return ns


def _preset_of(ns):
    from getfast.presets import get_preset
    return get_preset(ns.preset, ns.method) if getattr(ns, "preset", "") else None


def _prep_presets(ns):
    from getfast.presets import PRESETS, PresetsConfig, describe
    cfg = take_config(PresetsConfig, ns)
    text = "\n".join(describe(p) for p in PRESETS.values() if not cfg.for_method or p.method == cfg.for_method)
    return (lambda: print(text)), cfg


# --- the parser ----------------------------------------------------------------------------------------

def _add(sub, name, prep, configs, help, **defaults):
    p = sub.add_parser(name, help=help, formatter_class=_fmt(), description=help)
    fields = []
    for cls in configs:
        fields += add_config(p, cls, skip=fields)
    if "tf32" not in fields:
        add_config(p, RuntimeConfig)
    p.set_defaults(prepare=prep, **defaults)
    return p


def build_parser() -> argparse.ArgumentParser:
    from getfast.bench import BenchConfig
    from getfast.demo import DemoConfig
    from getfast.importers import ConvertConfig
    from getfast.methods import METHODS
    from getfast.sampling import PairsConfig, SampleConfig
    from getfast.teacher import TeacherConfig
    from getfast.train import LoopConfig
    from getfast.presets import PresetsConfig
    from getfast.metrics.train_eval import EvalConfig
    p = _Parser(prog="getfast", description=__doc__, formatter_class=_fmt())
    sub = p.add_subparsers(dest="command", required=True)
    _add(sub, "train-teacher", _prep_train_teacher, [TeacherConfig, LoopConfig, EvalConfig],
         "train an EDM teacher denoiser", out="runs/teacher")
    d = sub.add_parser("distill", help="distil a one-step student (get | sim | gdd | guided)", formatter_class=_fmt())
    dsub = d.add_subparsers(dest="method", required=True)
    for name, (cfg_cls, _) in METHODS.items():
        mp_ = _add(dsub, name, _prep_distill, [cfg_cls, LoopConfig, EvalConfig],
                   (cfg_cls.__doc__ or name).strip().splitlines()[0], out=f"runs/{name}")
        _add_preset_option(mp_, name)
    _add(sub, "presets", _prep_presets, [PresetsConfig], "list the official runs' recipes that distill --preset "
         "NAME applies, with their sources (official file:lines) and deviations")
    _add(sub, "fid", _prep_fid, [FIDConfig],
         "FID of a teacher/student checkpoint or an image folder (clean-fid, offline Inception)")
    _add(sub, "bench", _prep_bench, [BenchConfig], "run the benchmarks and regenerate their RESULTS.md sections")
    _add(sub, "demo", _prep_demo, [DemoConfig], "distil, sample, measure and write runs/demo/report.html")
    _add(sub, "sample", _prep_sample, [SampleConfig], "draw a sample grid from a teacher or student")
    _add(sub, "convert", _prep_convert, [ConvertConfig],
         "convert an NVlabs/edm pickle or a diffusers UNet folder into a getfast teacher file with a model card")
    mp = _add(sub, "make-pairs", _prep_make_pairs, [PairsConfig],
              "sample noise/image pairs from a teacher (resumable, shards by rank)")
    mp.epilog = ("Under torchrun put -- before the subcommand (torchrun -m getfast.cli -- make-pairs --n ...): "
                 "torchrun's own parser would read --n.")
    return p


# --- running -------------------------------------------------------------------------------------------

def _command_name(ns) -> str:
    return f"{ns.command} {ns.method}" if getattr(ns, "method", None) else ns.command


def _drop_flags(argv, names) -> list[str]:
    """``argv`` without the boolean options ``names`` (``--x``, ``--x VALUE``, ``--x=VALUE``, ``--no-x``)."""
    from getfast.options import BOOL_WORDS
    out, skip = [], False
    for i, a in enumerate(argv):
        if skip:
            skip = False
            continue
        name = a[2:].split("=", 1)[0]
        if a.startswith("--") and (name in names or (name.startswith("no-") and name[3:] in names)):
            if "=" not in a and not name.startswith("no-") and i + 1 < len(argv) \
                    and argv[i + 1].lower() in BOOL_WORDS:
                skip = True
            continue
        out.append(a)
    return out


def _interrupted_hint(ns, cfg, argv) -> str:
    if cfg is None:
        return "interrupted"
    if ns.command in ("train-teacher", "distill"):
        args = _drop_flags(argv, ("resume", "overwrite")) + ["--resume"]
        if "--out" not in args and not any(a.startswith("--out=") for a in args):
            args += ["--out", str(cfg.out)]
        return (f"interrupted; the run in {cfg.out} continues from its last checkpoint with: "
                f"getfast {shlex.join(args)}")
    if ns.command == "make-pairs":
        return (f"interrupted; complete shards in {cfg.out} are kept: run the same command again to continue: "
                f"getfast {shlex.join(argv)}")
    return "interrupted"


def _os_error_line(e: OSError) -> str:
    what = e.strerror or str(e)
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        what += " (the disk is full)"
    return f"{e.filename}: {what}" if e.filename else what


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop) raised where the program is, so it unwinds as Ctrl-C does: the
    run keeps its last checkpoint and the user is told how to continue."""


@contextlib.contextmanager
def _sigterm_raises():
    """While the command runs, SIGTERM raises :class:`Terminated` (a second one ends the process at once)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()
    old = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _one_line(text: str) -> str:
    """A message from a library may span lines; the report is one line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    with _sigterm_raises():
        return _main(argv)


def _main(argv) -> int:
    ns, cmd, cfg = None, "", None
    try:
        parser = build_parser()
        ns = parser.parse_args(argv)
        cmd = _command_name(ns)
        from getfast.train.checkpoint import CheckpointError
        try:
            try:
                ns = _apply_preset(parser, ns, argv)
                job, cfg = ns.prepare(ns)
            except TypeError as e:  # a config refused an option's type
                raise UsageError(str(e)) from None
            from getfast.train.distributed import resolve_device, tf32
            with tf32(resolve_device(getattr(ns, "device", "auto")), getattr(ns, "tf32", True)):
                rc = job()
        except (ValueError, CheckpointError) as e:
            print(f"getfast {cmd}: error: {_one_line(e)}", file=sys.stderr)
            return EXIT_USAGE
        except OSError as e:  # no such file, permission, read-only or full disk: the environment, not a bug
            if e.errno is None and not isinstance(e, FileNotFoundError):
                raise
            print(f"getfast {cmd}: error: {_one_line(_os_error_line(e) if e.errno is not None else e)}",
                  file=sys.stderr)
            return EXIT_USAGE
    except KeyboardInterrupt as e:
        hint = _interrupted_hint(ns, cfg, argv) if ns is not None else "interrupted"
        name = f"getfast {cmd}" if cmd else "getfast"
        if isinstance(e, Terminated):
            print(f"\n{name}: terminated (SIGTERM){hint[len('interrupted'):]}", file=sys.stderr)
            return EXIT_TERMINATED
        print(f"\n{name}: {hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    return int(rc) if isinstance(rc, int) and not isinstance(rc, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
