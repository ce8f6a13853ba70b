"""The published recipes of the official codes, one ``--preset NAME`` each (``getfast presets`` lists them).

A preset fills the method's and the loop's options with one official run's values; any option given on the
command line overrides it. Every value is read from the official code at the commit named in ``SOURCES``; each
preset names the file and lines it comes from, and says where getfast cannot follow the run exactly
(``deviations``). A preset does not name files: the teacher (and GDD's real images, GET's pairs) must be given,
and the teacher must have the preset's resolution.

Sources and conversions (units of the official flags → getfast's):

* SiD (mingyuanzhou/SiD): run_sid.sh per data set; sid_train.py:152-153 (Adam: fake score betas (0, 0.999),
  generator (g_beta1, 0.999)); ``--duration`` Mimg → kimg ×1000; ``--ema`` Mimg half-life → kimg ×1000 with
  EDM's ramp-up 0.05 (training/sid_training_loop.py:130-131); ``--tmax 800`` of 1000 → ``t_max 0.8``; no LR
  warm-up and no gradient clipping in its loop. SiD is SIM with ``--loss sid`` (``alpha`` = SiD's α). The SIM paper
  (Luo et al. 2024) releases no code, so there is no separate SIM (pseudo-Huber) preset.
* GDD / GDD-I (Zyriix/GDD): train.sh per data set; Adam betas (0, 0.99) (training/training_loop.py:176; the
  discriminator's lazy-R1 correction is getfast's ``discriminator_adam``); R1 every 16 steps (training_loop.py:71);
  σ_init = 80 (training/loss.py:181); EMA ramp-up 0.05 (train.py ``--ema-warmup`` default); no LR ramp-up
  (training_loop.py:58); ``--augment=0`` (GDD), ``--augment-p`` left at 0 (GDD-I, train.py:78): no augmentation.
* GET (locuslab/get): run.sh (batch 128, ``--grad 6``, ``--eval_f_max_iter 6``, ``--f_max_iter 0``); train.py:105
  (AdamW, weight decay 0), :275 (lr 1e-4), :277 (EMA decay 0.9999 per step → a half-life of
  batch·ln 0.5/ln 0.9999 images, no ramp-up); STAT.md:10-21 (batch and iterations of each released model).
* Guided distillation (Meng et al. 2023) has no official code; its presets are not given.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

__all__ = ["Preset", "PresetsConfig", "PRESETS", "SOURCES", "presets_for", "get_preset", "describe"]

SOURCES = {
    "SiD": "github.com/mingyuanzhou/SiD @ 01fbb13cf184",
    "GDD": "github.com/Zyriix/GDD @ e9267e8afde4",
    "GET": "github.com/locuslab/get @ 53377d3047b8",
}


@dataclass(frozen=True)
class Preset:
    """One official run: the method's options, the loop's options, and where they come from."""

    name: str
    method: str                  # the ``getfast distill`` subcommand
    summary: str                 # data set and variant
    teacher: str                 # the checkpoint the official run starts from (EDM's released pickles)
    resolution: int              # the teacher's (and the data's) resolution
    options: dict                # method config fields
    loop: dict                   # LoopConfig fields
    source: str                  # official file:lines
    deviations: str = ""         # where getfast does not follow the run
    needs: tuple = field(default=("teacher",))  # options the user must give (files)

    def values(self) -> dict:
        return {**self.options, **self.loop}


def _ema_halflife_kimg(decay_per_step: float, batch: int) -> float:
    """The half-life, in kimg, of an EMA with a fixed decay per step at a global batch (EDM's convention)."""
    return round(batch * math.log(0.5) / math.log(decay_per_step) / 1000, 2)


_SID = dict(loss="sid", sigma_init=2.5, t_max=0.8, fake_steps=1, betas=(0.0, 0.999), grad_clip=0.0)
_SID_LOOP = dict(warmup_kimg=0.0, ema_rampup=0.05)
_SID_DEV = ("SiD trains its fake score on ADA-augmented generator samples (p = --augment: 0.12 by default, 0.15 on "
            "FFHQ/AFHQv2, 0 on ImageNet); getfast's fake-score step has no augmentation. fp16 runs use Adam eps 1e-6; "
            "getfast autocasts to bf16 on CUDA and keeps eps 1e-8.")
_GDD = dict(sigma_init=80.0, aug_p=0.0, r1_gamma=1e-4, r1_interval=16, betas=(0.0, 0.99), grad_clip=0.0)
_GDD_LOOP = dict(warmup_kimg=0.0, ema_rampup=0.05)
_GDD_DEV = ("The official discriminator reads frozen ImageNet networks at 224×224 ({nets}); getfast's default "
            "--disc teacher-encoder reads the teacher's own encoder (or pass --disc torchscript with such a network). "
            "The official runs use fp16; getfast autocasts to bf16 on CUDA.")
_GET = dict(loss="l1", lr=1e-4, weight_decay=0.0, grad_clip=0.0, grad_steps=6, eval_iters=6)
_GET_DEV = ("Pairs: the official 1M (2M) pairs come from EDM's CIFAR-10 teacher (data/dataset.sh); make them with "
            "getfast make-pairs.")

_SID_RUNS = [
    # name, summary, teacher, resolution, extra options, batch, duration Mimg, ema Mimg, lines
    ("sid-cifar10-uncond", "SiD, CIFAR-10 unconditional", "edm-cifar10-32x32-uncond-vp.pkl", 32,
     dict(alpha=1.2, lr_g=1e-5, lr_fake=1e-5), 256, 500, 0.5, "run_sid.sh:20-47"),
    ("sid-cifar10-cond", "SiD, CIFAR-10 class-conditional", "edm-cifar10-32x32-cond-vp.pkl", 32,
     dict(alpha=1.2, lr_g=1e-5, lr_fake=1e-5), 256, 800, 0.5, "run_sid.sh:49-71"),
    ("sid-imagenet64-cond", "SiD, ImageNet 64×64 class-conditional", "edm-imagenet-64x64-cond-adm.pkl", 64,
     dict(alpha=1.2, lr_g=4e-6, lr_fake=4e-6), 8192, 1000, 2.0, "run_sid.sh:73-98"),
    ("sid-ffhq64", "SiD, FFHQ 64×64", "edm-ffhq-64x64-uncond-vp.pkl", 64,
     dict(alpha=1.2, lr_g=1e-5, lr_fake=1e-5, betas_g=(0.9, 0.999)), 512, 500, 0.5, "run_sid.sh:100-125"),
    ("sid-afhqv2-64", "SiD, AFHQv2 64×64", "edm-afhqv2-64x64-uncond-vp.pkl", 64,
     dict(alpha=1.0, lr_g=5e-6, lr_fake=5e-6), 512, 500, 0.5, "run_sid.sh:127-151"),
]

_GDD_RUNS = [
    # name, summary, teacher, resolution, cond, lr_g, lr_d, batch, duration Mimg, ema Mimg, nets, GDD lines, GDD-I lines
    ("cifar10-uncond", "CIFAR-10 unconditional", "edm-cifar10-32x32-uncond-ve.pkl", 32, False, 1e-4, 1e-4, 256, 5,
     0.5, "VGG16-BN + EfficientNet-lite0", "train.sh:8-16", "train.sh:61-69"),
    ("cifar10-cond", "CIFAR-10 class-conditional", "edm-cifar10-32x32-cond-ve.pkl", 32, True, 1e-4, 1e-4, 256, 5,
     0.5, "VGG16-BN + EfficientNet-lite0", "train.sh:18-25", "train.sh:71-78"),
    ("afhqv2-64", "AFHQv2 64×64", "edm-afhqv2-64x64-uncond-ve.pkl", 64, False, 2e-5, 4e-5, 256, 10, 0.5,
     "DeiT-B + EfficientNet-lite0", "train.sh:27-35", "train.sh:80-88"),
    ("ffhq64", "FFHQ 64×64", "edm-ffhq-64x64-uncond-ve.pkl", 64, False, 2e-5, 4e-5, 256, 10, 0.5,
     "DeiT-B + EfficientNet-lite0", "train.sh:37-45", "train.sh:90-98"),
    ("imagenet64-cond", "ImageNet 64×64 class-conditional", "edm-imagenet-64x64-cond-adm.pkl", 64, True, 8e-6, 4e-5,
     512, 10, 50.0, "DeiT-B + EfficientNet-lite0", "train.sh:49-57", "train.sh:103-110"),
]

_GET_RUNS = [
    # name, summary, model, cond, batch, iterations, STAT.md line
    ("get-t-cifar10-uncond", "GET-T, CIFAR-10 unconditional, 1M pairs", "GET-T/2", False, 128, 800_000, 10),
    ("get-m-cifar10-uncond", "GET-M, CIFAR-10 unconditional, 1M pairs", "GET-M/2", False, 128, 800_000, 11),
    ("get-s-cifar10-uncond", "GET-S, CIFAR-10 unconditional, 1M pairs", "GET-S/2", False, 128, 800_000, 12),
    ("get-b-cifar10-uncond", "GET-B, CIFAR-10 unconditional, 1M pairs", "GET-B/2", False, 128, 800_000, 13),
    ("get-b+-cifar10-uncond", "GET-B+, CIFAR-10 unconditional, 1M pairs", "GET-B/2+", False, 128, 800_000, 14),
    ("get-b-cifar10-cond", "GET-B, CIFAR-10 class-conditional, 1M pairs", "GET-B/2", True, 256, 800_000, 20),
    ("get-b-cifar10-cond-2m", "GET-B, CIFAR-10 class-conditional, 2M pairs", "GET-B/2", True, 256, 1_200_000, 21),
]


def _build() -> dict[str, Preset]:
    out = {}
    for name, summary, teacher, res, extra, batch, mimg, ema, lines in _SID_RUNS:
        out[name] = Preset(name, "sim", summary, teacher, res, {**_SID, **extra},
                           {**_SID_LOOP, "batch": batch, "kimg": mimg * 1000.0, "ema_halflife_kimg": ema * 1000.0},
                           f"SiD {lines}; sid_train.py:152-153 (Adam)", _SID_DEV)
    for key, summary, teacher, res, cond, lr_g, lr_d, batch, mimg, ema, nets, gdd_lines, gddi_lines in _GDD_RUNS:
        for variant, freeze, lines in (("gdd", False, gdd_lines), ("gddi", True, gddi_lines)):
            name = f"{variant}-{key}"
            label = "GDD-I" if freeze else "GDD"
            out[name] = Preset(name, "gdd", f"{label}, {summary}", teacher, res,
                               {**_GDD, "cond": cond, "freeze_innate": freeze, "lr_g": lr_g, "lr_d": lr_d},
                               {**_GDD_LOOP, "batch": batch, "kimg": mimg * 1000.0, "ema_halflife_kimg": ema * 1000.0},
                               f"GDD {lines}; training/training_loop.py:176,184 (Adam)", _GDD_DEV.format(nets=nets),
                               needs=("teacher", "data"))
    for name, summary, model, cond, batch, iters, line in _GET_RUNS:
        out[name] = Preset(name, "get", summary, "edm-cifar10-32x32-" + ("cond" if cond else "uncond") + "-vp.pkl",
                           32, {**_GET, "model": model, "cond": cond},
                           {"batch": batch, "kimg": iters * batch / 1000.0, "warmup_kimg": 0.0, "ema_rampup": 0.0,
                            "ema_halflife_kimg": _ema_halflife_kimg(0.9999, batch)},
                           f"GET run.sh:1-11; train.py:105,275,277; STAT.md:{line}", _GET_DEV, needs=("pairs",))
    return out


PRESETS: dict[str, Preset] = _build()


@dataclass
class PresetsConfig:
    """List the official runs' recipes (``getfast presets``)."""

    for_method: str = ""   # only this method's presets (sim | gdd | get)

    def __post_init__(self):
        methods = sorted({p.method for p in PRESETS.values()})
        if self.for_method and self.for_method not in methods:
            raise ValueError(f"for_method (--for-method) {self.for_method!r} has no presets; methods with presets: "
                             f"{', '.join(methods)}")


def presets_for(method: str) -> list[Preset]:
    return [p for p in PRESETS.values() if p.method == method]


def get_preset(name: str, method: str | None = None) -> Preset:
    """The preset ``name`` (``ValueError`` naming the known ones, or the right subcommand, otherwise)."""
    p = PRESETS.get(name)
    if p is None:
        known = ", ".join(x.name for x in (presets_for(method) if method else PRESETS.values()))
        raise ValueError(f"preset (--preset) {name!r} is not a preset{f' of {method}' if method else ''}; "
                         f"known: {known or 'none'} (getfast presets lists them)")
    if method is not None and p.method != method:
        raise ValueError(f"preset (--preset) {name!r} is a {p.method} recipe: use getfast distill {p.method} "
                         f"--preset {name}")
    return p


def _fmt(v) -> str:
    if isinstance(v, tuple):
        return " ".join(_fmt(x) for x in v)
    if isinstance(v, float):
        return str(int(v)) if v.is_integer() and abs(v) >= 1e4 else f"{v:g}"
    return str(v).lower() if isinstance(v, bool) else str(v)


def describe(p: Preset, verbose: bool = True) -> str:
    """A preset as ``getfast presets`` prints it: name, what, source, then (verbose) its options and deviations."""
    head = f"{p.name}  (distill {p.method}) {p.summary}; teacher {p.teacher}; source: {SOURCES[p.source.split()[0]]} " \
           f"{p.source.split(' ', 1)[1]}"
    if not verbose:
        return head
    opts = " ".join(f"--{k.replace('_', '-')} {_fmt(v)}" for k, v in p.values().items())
    lines = [head, f"    {opts}", f"    needs: {', '.join('--' + n for n in p.needs)}"]
    if p.deviations:
        lines.append(f"    deviations: {p.deviations}")
    return "\n".join(lines)
