"""diffusers ``UNet2DModel`` teachers (DDPM/DDIM pipelines) as EDM-style denoisers D(x; σ).

A discrete VP model is trained on z_t = √ᾱ_t·x₀ + √(1−ᾱ_t)·ε at integer t. In EDM's variables
(Karras et al. 2022, Sec. 2 and Table 1, "VP") the same state is x = z_t/√ᾱ_t with noise level
σ_t = √((1−ᾱ_t)/ᾱ_t), so a network F(z_t, t) becomes a denoiser

    D(x; σ) = c_skip·x + c_out·F(c_in·x; t(σ)),  c_in = 1/√(1+σ²),
    ε-prediction: c_skip = 1,          c_out = −σ                (x₀ = x − σ·ε̂)
    v-prediction: c_skip = 1/(1+σ²),   c_out = −σ/√(1+σ²)        (x₀ = √ᾱ·z_t − √(1−ᾱ)·v̂;
                                                                   Salimans & Ho 2022)
    sample:       c_skip = 0,          c_out = 1

and t(σ) is the fractional timestep found by linear interpolation in log σ between the two neighbouring
discrete levels of the scheduler's ᾱ table (the convention of k-diffusion's discrete-schedule wrappers);
it is exact at every trained timestep and is clamped to [0, T−1] outside the trained range
[σ_0, σ_{T−1}]. DDIM with η = 0 is then Euler's method on this D over the scheduler's σ_t (Song et al.
2021, Eq. 14; Karras et al. 2022, Sec. 3), which the tests check against diffusers' own DDIM scheduler.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from getfast.diffusion.precond import EDMPrecond

FORMAT = "diffusers"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def _require_diffusers():
    try:
        import diffusers
    except ImportError as e:
        raise ImportError("diffusers teachers need the optional extra: pip install 'getfast[diffusers]'") from e
    return diffusers


def _layout(path: Path):
    """(unet folder, scheduler config file) of a pipeline folder (unet/, scheduler/) or a flat UNet folder."""
    unet = path / "unet" if (path / "unet" / "config.json").is_file() else path
    for cand in (path / "scheduler" / "scheduler_config.json", path / "scheduler_config.json"):
        if cand.is_file():
            return unet, cand
    return unet, None


def is_diffusers_dir(path) -> bool:
    """A folder holding a diffusers UNet config (``unet/config.json`` or ``config.json`` naming UNet2DModel)."""
    p = Path(path)
    if not p.is_dir():
        return False
    unet, _ = _layout(p)
    cfg = unet / "config.json"
    if not cfg.is_file():
        return False
    try:
        return json.loads(cfg.read_text()).get("_class_name") == "UNet2DModel"
    except (OSError, ValueError):
        return False


class _UNetAdapter(nn.Module):
    """Backbone F(z, t, class_labels) around a ``UNet2DModel`` in the form ``EDMPrecond`` calls."""

    def __init__(self, unet: nn.Module, num_classes: int):
        super().__init__()
        self.unet = unet
        size = unet.config.sample_size
        if not isinstance(size, int) and len(set(size)) != 1:
            raise ValueError(f"sample_size: getfast teachers are square, this UNet is {tuple(size)}")
        self.img_resolution = int(size if isinstance(size, int) else size[0])
        self.in_channels = int(unet.config.in_channels)
        self.num_classes = int(num_classes)

    def forward(self, x, t, class_labels=None, w=None):
        if w is not None:
            raise ValueError("w: a diffusers UNet has no guidance-weight input")
        return self.unet(x, t, class_labels=class_labels if self.num_classes else None, return_dict=False)[0]


class DiffusersDenoiser(EDMPrecond):
    """EDM-style denoiser D(x; σ, labels) over a diffusers ``UNet2DModel`` and its scheduler's ᾱ table."""

    def __init__(self, unet: nn.Module, alphas_cumprod, prediction_type: str = "epsilon"):
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type: expected one of {PREDICTION_TYPES}, got {prediction_type!r}")
        num_classes = int(getattr(unet.config, "num_class_embeds", None) or 0)
        super().__init__(_UNetAdapter(unet, num_classes))
        self.prediction_type = prediction_type
        abar = torch.as_tensor(alphas_cumprod, dtype=torch.float64).flatten()
        if abar.numel() < 2 or not bool(((abar > 0) & (abar < 1)).all()) or not bool((abar[1:] < abar[:-1]).all()):
            raise ValueError("alphas_cumprod: expected a strictly decreasing table in (0, 1)")
        sigmas = ((1 - abar) / abar).sqrt()
        # Not saved with the weights: the table travels in the teacher's metadata.
        self.register_buffer("log_sigmas", sigmas.log().float(), persistent=False)
        self.sigma_min, self.sigma_max = float(sigmas[0]), float(sigmas[-1])

    def one_hot(self, class_labels, batch, device):
        """Integer class indices for the UNet's embedding table (one-hot rows are reduced by argmax)."""
        if not self.num_classes:
            return None
        if class_labels is None:
            raise ValueError("class_labels: this diffusers UNet is class-conditional and has no unconditional class")
        return class_labels.argmax(dim=1) if class_labels.is_floating_point() else class_labels.to(device)

    def forward(self, x, sigma, class_labels=None, cfg_scale=None, w=None):
        if cfg_scale is not None and self.num_classes:
            raise ValueError("cfg_scale: a diffusers UNet2DModel has no unconditional class to guide against")
        return super().forward(x, sigma, class_labels, cfg_scale=cfg_scale, w=w)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        """Fractional timestep of σ: linear in log σ between neighbouring trained levels, clamped to [0, T−1]."""
        ls = self.log_sigmas.to(sigma.device)
        log_s = sigma.float().log()
        hi = torch.searchsorted(ls, log_s.contiguous()).clamp(1, ls.numel() - 1)
        lo = hi - 1
        frac = ((log_s - ls[lo]) / (ls[hi] - ls[lo])).clamp(0, 1)
        return lo.float() + frac

    def coefficients(self, sigma: torch.Tensor):
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        if self.prediction_type == "epsilon":
            c_skip, c_out = torch.ones_like(sigma), -sigma
        elif self.prediction_type == "v_prediction":
            c_skip, c_out = 1 / (sigma ** 2 + 1), -sigma * c_in
        else:
            c_skip, c_out = torch.zeros_like(sigma), torch.ones_like(sigma)
        return c_skip, c_out, c_in, self.sigma_to_t(sigma)


def _json_safe(cfg) -> dict:
    return json.loads(json.dumps(dict(cfg), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def build_from_meta(meta: dict) -> DiffusersDenoiser:
    """A fresh (untrained) denoiser of the UNet/schedule recorded in a teacher's metadata."""
    diffusers = _require_diffusers()
    d = meta["diffusers"]
    unet = diffusers.UNet2DModel.from_config(d["unet_config"])
    return DiffusersDenoiser(unet, d["alphas_cumprod"], d["prediction_type"])


def load_diffusers(path, device="cpu") -> DiffusersDenoiser:
    """A diffusers pipeline folder (``unet/`` + ``scheduler/``) or flat UNet folder with a
    ``scheduler_config.json``, loaded from disk only, as an EDM-style teacher with ``.meta``."""
    diffusers = _require_diffusers()
    path = Path(path)
    if not is_diffusers_dir(path):
        raise ValueError(f"{path}: not a diffusers UNet2DModel folder (no unet/config.json or config.json naming it)")
    unet_dir, sched_file = _layout(path)
    if sched_file is None:
        raise ValueError(f"{path}: no scheduler_config.json (the noise schedule is needed to map σ to timesteps)")
    sched_cfg = json.loads(sched_file.read_text())
    cls_name = sched_cfg.get("_class_name", "DDPMScheduler")
    cls = getattr(diffusers, cls_name, None)
    if cls is None:
        raise ValueError(f"{sched_file}: unknown scheduler class {cls_name!r}")
    scheduler = cls.from_config(sched_cfg)
    abar = getattr(scheduler, "alphas_cumprod", None)
    if abar is None:
        raise ValueError(f"{sched_file}: {cls_name} has no discrete ᾱ table (alphas_cumprod)")
    prediction = sched_cfg.get("prediction_type", "epsilon")
    unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False).float()
    net = DiffusersDenoiser(unet, abar, prediction)
    unet_cfg = _json_safe(unet.config)
    res = net.backbone.img_resolution
    net.meta = {"model": "diffusers-UNet2DModel", "resolution": res, "channels": net.backbone.in_channels,
                "num_classes": net.backbone.num_classes, "label_dropout": 0.0, "data": None,
                "diffusers": {"unet_config": unet_cfg, "alphas_cumprod": [float(a) for a in abar],
                              "prediction_type": prediction, "scheduler_class": cls_name},
                "source": {"format": FORMAT, "file": path.name}}
    return net.eval().requires_grad_(False).to(device)
