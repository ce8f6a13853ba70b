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

``sampler ddim`` on such a teacher does not step getfast's continuous grid: :meth:`DiffusersDenoiser.scheduler_ddim`
reproduces diffusers' ``DDIMPipeline`` (the folder's scheduler converted to ``DDIMScheduler``, as the pipeline
does): its timesteps (``timestep_spacing`` leading/trailing/linspace, ``steps_offset``), the last step to
``set_alpha_to_one``, ``clip_sample``/``clip_sample_range`` on the predicted x₀, η = 0 (Song et al. 2021, Eq. 12).

A UNet with twice the image channels (a learned variance, Nichol & Dhariwal 2021) is used through its first
half, the ε/v/x₀ prediction, as diffusers' DDPM scheduler splits it; the variance half is unused by these
deterministic samplers. Other diffusers models (``UNet2DConditionModel``: Stable Diffusion's latent,
text-conditioned UNet) are refused with one "unsupported" line.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from getfast.diffusion.precond import EDMPrecond
from getfast.options import check_number

FORMAT = "diffusers"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
SUPPORTED_CLASS = "UNet2DModel"
# The DDIMScheduler settings DDIMPipeline's sampling depends on (with η = 0), recorded in the teacher's metadata.
DDIM_KEYS = ("num_train_timesteps", "timestep_spacing", "steps_offset", "set_alpha_to_one", "clip_sample",
             "clip_sample_range", "thresholding")
_WHY = {"UNet2DConditionModel": "a text-conditioned latent-space UNet, as in Stable Diffusion",
        "UNet2DConditionModel (no unet)": "a pipeline without a UNet"}


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


def _read_json(path: Path):
    try:
        return json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError):
        return None


def diffusers_model_class(path) -> str | None:
    """The ``_class_name`` of the model a diffusers folder holds: its ``unet/config.json`` or ``config.json``, else
    the ``unet`` entry of its ``model_index.json``; None when ``path`` is not a diffusers folder."""
    p = Path(path)
    if not p.is_dir():
        return None
    for cfg in (p / "unet" / "config.json", p / "config.json"):
        d = _read_json(cfg)
        if isinstance(d, dict) and isinstance(d.get("_class_name"), str):
            return d["_class_name"]
    idx = _read_json(p / "model_index.json")
    if isinstance(idx, dict) and isinstance(idx.get("_class_name"), str):
        unet = idx.get("unet")
        if isinstance(unet, list) and len(unet) == 2 and isinstance(unet[1], str):
            return unet[1]
        return f"{idx['_class_name']} (no unet)"
    return None


def is_diffusers_dir(path) -> bool:
    """A diffusers model or pipeline folder (``unet/config.json``, ``config.json`` or ``model_index.json`` naming a
    diffusers class), supported or not: :func:`load_diffusers` refuses the unsupported ones in one line."""
    return diffusers_model_class(path) is not None


def check_supported(path) -> None:
    """``ValueError`` ("unsupported: ...") unless ``path`` holds a diffusers UNet2DModel."""
    cls = diffusers_model_class(path)
    if cls is None:
        raise ValueError(f"{path}: not a diffusers folder (no unet/config.json, config.json or model_index.json "
                         f"naming a diffusers class)")
    if cls != SUPPORTED_CLASS:
        why = _WHY.get(cls, "not a pixel-space UNet2DModel")
        raise ValueError(f"{path}: unsupported: a diffusers {cls} ({why}); getfast teachers from diffusers are "
                         f"UNet2DModel pipelines (DDPM/DDIM)")


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
        out = int(unet.config.out_channels)
        if out not in (self.in_channels, 2 * self.in_channels):
            raise ValueError(f"unsupported: a UNet2DModel with out_channels {out} for in_channels {self.in_channels} "
                             f"(expected {self.in_channels}, or {2 * self.in_channels} with a learned variance)")
        self.learned_variance = out == 2 * self.in_channels
        self.num_classes = int(num_classes)

    def forward(self, x, t, class_labels=None, w=None):
        if w is not None:
            raise ValueError("w: a diffusers UNet has no guidance-weight input")
        out = self.unet(x, t, class_labels=class_labels if self.num_classes else None, return_dict=False)[0]
        # A learned variance's UNet returns (prediction, variance) stacked on channels: the first half is the
        # ε/v/x₀ prediction (diffusers' DDPMScheduler.step splits it the same way).
        return out[:, : self.in_channels] if self.learned_variance else out


class DiffusersDenoiser(EDMPrecond):
    """EDM-style denoiser D(x; σ, labels) over a diffusers ``UNet2DModel`` and its scheduler's ᾱ table."""

    def __init__(self, unet: nn.Module, alphas_cumprod, prediction_type: str = "epsilon", ddim_config=None):
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
        # Host floats (a sampler must not read device values): the ᾱ table and the DDIM settings, for DDIMPipeline.
        self.alphas_cumprod = [float(a) for a in abar]
        self.ddim_config = None if ddim_config is None else {k: ddim_config[k] for k in DDIM_KEYS}

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

    @torch.no_grad()
    def scheduler_ddim(self, z: torch.Tensor, steps: int, class_labels=None, cfg_scale=None) -> torch.Tensor:
        """Deterministic DDIM (η = 0; Song et al. 2021, Eq. 12) exactly as diffusers' ``DDIMPipeline`` steps this
        UNet: from z_T = ``z`` over :func:`ddim_timesteps`, each step to t − T//steps (ᾱ = 1 past the end when
        ``set_alpha_to_one``, else ᾱ_0), x̂₀ from the ε/v/x₀ prediction, clipped to ±``clip_sample_range`` when
        ``clip_sample``, the ε of the prediction unchanged. Returns x̂ at t = 0 (images in [-1, 1] before the
        pipeline's clamp)."""
        cfg = self.ddim_config
        if cfg is None:
            raise ValueError("sampler ddim: this diffusers teacher records no scheduler settings (it was converted "
                             "before getfast recorded them): convert the diffusers folder again")
        if cfg_scale is not None and self.num_classes:
            raise ValueError("cfg_scale: a diffusers UNet2DModel has no unconditional class to guide against")
        if cfg["thresholding"]:
            raise ValueError("unsupported: the scheduler's dynamic thresholding (thresholding: true) in DDIM")
        T, abar = int(cfg["num_train_timesteps"]), self.alphas_cumprod
        final = 1.0 if cfg["set_alpha_to_one"] else abar[0]
        labels = self.one_hot(class_labels, z.shape[0], z.device)
        x = z.float()
        for t in ddim_timesteps(cfg, steps):
            out = self.backbone(x, torch.full((z.shape[0],), t, dtype=torch.long, device=z.device),
                                class_labels=labels).float()
            prev = t - T // steps
            a_t, a_prev = abar[t], (abar[prev] if prev >= 0 else final)
            b_t = 1 - a_t
            if self.prediction_type == "epsilon":
                x0, eps = (x - b_t ** 0.5 * out) / a_t ** 0.5, out
            elif self.prediction_type == "sample":
                x0 = out
                eps = (x - a_t ** 0.5 * x0) / b_t ** 0.5
            else:  # v_prediction (Salimans & Ho 2022)
                x0, eps = a_t ** 0.5 * x - b_t ** 0.5 * out, a_t ** 0.5 * out + b_t ** 0.5 * x
            if cfg["clip_sample"]:
                r = float(cfg["clip_sample_range"])
                x0 = x0.clamp(-r, r)
            x = a_prev ** 0.5 * x0 + (1 - a_prev) ** 0.5 * eps
        return x

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


def ddim_timesteps(cfg: dict, steps: int) -> list[int]:
    """The timesteps ``DDIMScheduler.set_timesteps(steps)`` makes for the settings ``cfg`` (diffusers
    scheduling_ddim.py; "linspace", "leading", "trailing" are Lin et al. 2024, "Common Diffusion Noise Schedules and
    Sample Steps are Flawed", Table 2)."""
    import numpy as np
    T = int(cfg["num_train_timesteps"])
    check_number("steps", steps, lo=1, hi=T, integer=True)  # hi: the scheduler's num_train_timesteps
    spacing = cfg["timestep_spacing"]
    if spacing == "linspace":
        ts = np.linspace(0, T - 1, steps).round()[::-1].copy().astype(np.int64)
    elif spacing == "leading":
        ts = (np.arange(0, steps) * (T // steps)).round()[::-1].copy().astype(np.int64) + int(cfg["steps_offset"])
    elif spacing == "trailing":
        ts = np.round(np.arange(T, 0, -T / steps)).astype(np.int64) - 1
    else:
        raise ValueError(f"unsupported: the scheduler's timestep_spacing {spacing!r} (DDIM knows linspace, leading, "
                         f"trailing)")
    return [int(t) for t in ts]


def _json_safe(cfg) -> dict:
    return json.loads(json.dumps(dict(cfg), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def build_from_meta(meta: dict) -> DiffusersDenoiser:
    """A fresh (untrained) denoiser of the UNet/schedule recorded in a teacher's metadata."""
    diffusers = _require_diffusers()
    d = meta["diffusers"]
    unet = diffusers.UNet2DModel.from_config(d["unet_config"])
    return DiffusersDenoiser(unet, d["alphas_cumprod"], d["prediction_type"], d.get("ddim_config"))


def load_diffusers(path, device="cpu") -> DiffusersDenoiser:
    """A diffusers pipeline folder (``unet/`` + ``scheduler/``) or flat UNet folder with a
    ``scheduler_config.json``, loaded from disk only, as an EDM-style teacher with ``.meta``."""
    path = Path(path)
    check_supported(path)
    diffusers = _require_diffusers()
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
    # DDIMPipeline's own conversion of the folder's scheduler (diffusers pipeline_ddim.py, __init__).
    ddim = _json_safe(diffusers.DDIMScheduler.from_config(scheduler.config).config)
    ddim_config = {k: ddim[k] for k in DDIM_KEYS}
    raw = _read_json(unet_dir / "config.json") or {}
    out, inp = raw.get("out_channels", 3), raw.get("in_channels", 3)
    if out not in (inp, 2 * inp):  # before reading the weights
        raise ValueError(f"{path}: unsupported: a UNet2DModel with out_channels {out} for in_channels {inp} "
                         f"(expected {inp}, or {2 * inp} with a learned variance)")
    unet = diffusers.UNet2DModel.from_pretrained(str(unet_dir), local_files_only=True, low_cpu_mem_usage=False).float()
    net = DiffusersDenoiser(unet, abar, prediction, ddim_config)
    unet_cfg = _json_safe(unet.config)
    res = net.backbone.img_resolution
    net.meta = {"model": "diffusers-UNet2DModel", "resolution": res, "channels": net.backbone.in_channels,
                "num_classes": net.backbone.num_classes, "label_dropout": 0.0, "data": None,
                "diffusers": {"unet_config": unet_cfg, "alphas_cumprod": [float(a) for a in abar],
                              "prediction_type": prediction, "scheduler_class": cls_name,
                              "ddim_config": ddim_config},
                "source": {"format": FORMAT, "file": path.name}}
    return net.eval().requires_grad_(False).to(device)
