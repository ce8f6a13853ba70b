"""``getfast sample``: a PNG grid of samples from any checkpoint."""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch

from getfast.io import check_writable, save_grid
from getfast.limits import MAX_SEED, check_fits
from getfast.options import check_choice, check_device, check_number, check_path, flag
from getfast.sampling.sampler import SAMPLERS, load

__all__ = ["SampleConfig", "sample_grid"]

SAMPLE_BATCH = 256  # samples per network call


@dataclass
class SampleConfig:
    """Draw a sample grid from a teacher or a student."""

    ckpt: str = "fashion-mnist"      # embedded teacher name, teacher/student .safetensors, or a run folder
    sampler: str | None = None       # teacher sampler: heun | euler | ddim (None: heun; guided students: ddim)
    steps: int | None = None         # sampler steps (None: the model's own; 18 for a teacher)
    cfg_scale: float | None = None   # guidance weight w (conditional teachers, guided students)
    n: int = 64                      # number of samples
    nrow: int = 0                    # grid columns (0: square)
    label: int | None = None         # class of every sample (None: cycle through the classes)
    seed: int = 0                    # seed of the noise
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    compile: bool = False            # CUDA: capture the sampler in a CUDA graph and replay it; CPU: torch.compile
    bf16: bool | None = None         # bf16 autocast (None: on for CUDA, off for CPU)
    out: str = "samples.png"         # PNG file to write

    def __post_init__(self):
        if self.sampler is not None:
            check_choice("sampler", self.sampler, SAMPLERS)
        for name, lo in (("steps", 1), ("n", 1), ("nrow", 0), ("label", 0), ("seed", 0)):
            if getattr(self, name) is not None or name not in ("steps", "label"):
                check_number(name, getattr(self, name), lo=lo, integer=True)
        if self.seed > MAX_SEED:
            raise ValueError(f"{flag('seed')} must be an integer <= {MAX_SEED}, got {self.seed}")
        if self.cfg_scale is not None:
            check_number("cfg_scale", self.cfg_scale)
        check_device("device", self.device)
        if Path(check_path("out", self.out)).suffix.lower() != ".png":
            raise ValueError(f"{flag('out')} must be a .png file, got {self.out!r}")


def sample_grid(cfg: SampleConfig, log=print) -> Path:
    """Sample ``cfg.n`` images (noise from ``torch.manual_seed(cfg.seed)``) and write them as one PNG grid."""
    out = check_writable(cfg.out, "file")
    s = load(cfg.ckpt, sampler=cfg.sampler, steps=cfg.steps, cfg_scale=cfg.cfg_scale, device=cfg.device,
             compile=cfg.compile, bf16=cfg.bf16)
    labels = None
    if cfg.label is not None:
        if not s.num_classes:
            raise ValueError(f"{flag('label')} = {cfg.label} does not apply to {cfg.ckpt}: it is unconditional")
        if cfg.label >= s.num_classes:
            raise ValueError(f"{flag('label')} must be in [0, {s.num_classes}) for {cfg.ckpt}, got {cfg.label}")
    # Before anything is drawn: the noise, the images and the grid of n samples must fit in memory.
    pixels = cfg.n * math.prod(s.shape)
    check_fits(pixels * 9, f"{flag('n')} = {cfg.n}: {cfg.n} samples of {'x'.join(map(str, s.shape))} (noise, "
               f"images and the grid)", hint="lower --n")
    if s.device.type == "cuda":
        check_fits(pixels * 8, f"{flag('n')} = {cfg.n}: {cfg.n} samples (noise and images)", s.device,
                   hint="lower --n")
    torch.manual_seed(cfg.seed)
    z = torch.randn(cfg.n, *s.shape, device=s.device)
    if s.num_classes:
        labels = torch.full((cfg.n,), cfg.label) if cfg.label is not None else torch.arange(cfg.n) % s.num_classes
    # The network sees SAMPLE_BATCH samples at a time: its activations, not n, bound the memory it needs.
    x = torch.cat([s(z[i:i + SAMPLE_BATCH], None if labels is None else labels[i:i + SAMPLE_BATCH]).cpu()
                   for i in range(0, cfg.n, SAMPLE_BATCH)])
    save_grid(x, out, nrow=cfg.nrow or None)
    log(f"wrote {out} ({cfg.n} samples, {s.description})")
    return out
