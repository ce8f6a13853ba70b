"""GDD / GDD-I: GAN distillation of a diffusion model into a one-step generator (Zheng & Yang 2024,
"Diffusion Models Are Innate One-Step Generators", arXiv 2405.20750).

The generator G starts as a copy of the teacher and is evaluated once at a fixed noise level,
x = D(σ_init·z; σ_init) (σ_init = 80). It is trained with the non-saturating GAN loss against real
images only — no instance-level (pairwise) loss to the teacher's outputs:
    L_D = E softplus(−D(x_real)) + E softplus(D(G(z)))  +  lazy R1: (γ/2)·k·E‖∇_x D(x_real)‖² every k steps
    L_G = E softplus(−D(G(z)))
(Goodfellow et al. 2014; R1: Mescheder et al. 2018, Eq. 9; lazy regularisation: Karras et al. 2020, Sec. 3.1).

The discriminator needs no outside weights: the frozen encoder of the teacher's own UNet, run at a
small noise level on the noised image, gives feature maps at every resolution, and a small trainable
head on each gives logits (DMD2/LADD's idea with the teacher as the feature network). Discriminators
are pluggable: ``register_discriminator`` adds a builder (e.g. a projected-GAN backbone wrapped in
:class:`FeatureDiscriminator`).

GDD-I freezes the "innate" parameters — the UNet blocks' 3×3 convolutions and attention projections —
and trains only the rest (norms, modulations, embeddings, skips, stem and head): ≈87.5 % of EDM's
CIFAR-10 DDPM++ UNet is frozen by the default pattern (the paper reports ≈84 %).
"""
from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from getfast.methods.sim import OneStepGenerator
from getfast.train.loop import clip_and_step

# Relative to the UNet (getfast.models.unet): enc.<block>.conv0/conv1 (3×3) and qkv/proj (attention).
INNATE_REGEX = r"^(enc|dec)\.[^.]+\.(conv0|conv1|qkv|proj)\."


# --- GDD-I: freezing the innate parameters ---------------------------------------------------------

def _unet_root(module: nn.Module) -> tuple[str, nn.Module]:
    """(prefix, submodule) of the first submodule with ``enc`` and ``dec`` blocks (the UNet), else ("", module)."""
    for name, m in module.named_modules():
        if isinstance(getattr(m, "enc", None), nn.ModuleDict) and isinstance(getattr(m, "dec", None), nn.ModuleDict):
            return (name + "." if name else ""), m
    return "", module


def innate_parameters(module: nn.Module, regex: str = INNATE_REGEX) -> list[str]:
    """Full names of ``module``'s parameters whose name relative to its UNet matches ``regex`` (GDD-I)."""
    try:
        pat = re.compile(regex)
    except re.error as e:
        raise ValueError(f"freeze_regex {regex!r} is not a valid regular expression: {e}") from e
    prefix, root = _unet_root(module)
    return [prefix + n for n, _ in root.named_parameters() if pat.search(n)]


def freeze_innate(module: nn.Module, regex: str = INNATE_REGEX) -> float:
    """Freeze the innate parameters (Zheng & Yang 2024, Sec. 4 "GDD-I"); returns the frozen fraction of
    ``module``'s parameter count. Raises ``ValueError`` if the pattern matches nothing."""
    names = set(innate_parameters(module, regex))
    if not names:
        raise ValueError(f"freeze_regex {regex!r} matches no parameter of the generator")
    frozen = total = 0
    for n, p in module.named_parameters():
        total += p.numel()
        if n in names:
            p.requires_grad_(False)
            frozen += p.numel()
    return frozen / max(total, 1)


# --- Discriminators --------------------------------------------------------------------------------

class Discriminator(Protocol):
    """What GDD needs of a discriminator: an ``nn.Module`` whose ``parameters()`` are exactly the trainable
    ones (frozen feature networks must not be registered as submodules, so they are neither optimised nor
    checkpointed) and whose call gives per-sample logits, one column per head."""

    def __call__(self, x: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:  # (B, K)
        ...


# name -> builder(teacher, cfg, num_classes, shape) -> Discriminator
DISCRIMINATORS: dict[str, Callable] = {}


def register_discriminator(name: str):
    """Decorator: make a discriminator builder ``f(teacher, cfg, num_classes, shape)`` available as ``--disc name``."""
    def deco(fn):
        DISCRIMINATORS[name] = fn
        return fn
    return deco


def build_discriminator(name: str, teacher, cfg, num_classes: int, shape) -> nn.Module:
    if name not in DISCRIMINATORS:
        raise ValueError(f"unknown disc {name!r}; known: {sorted(DISCRIMINATORS)}")
    return DISCRIMINATORS[name](teacher, cfg, num_classes, shape)


class TeacherEncoderFeatures(nn.Module):
    """Frozen feature maps of an EDM teacher's UNet encoder at noise level σ (one map per resolution, the
    last layer at each). The image is noised, x + σ·ε, then preconditioned (c_in) as the teacher expects."""

    def __init__(self, denoiser: nn.Module, sigma: float = 0.2, levels=()):
        super().__init__()
        if not hasattr(getattr(denoiser, "backbone", None), "enc"):
            raise ValueError("the teacher-encoder discriminator needs an EDM denoiser with a UNet backbone")
        self.denoiser = denoiser.eval().requires_grad_(False)
        self.sigma = float(sigma)
        with torch.no_grad():
            res = denoiser.img_resolution
            probe = self._all(torch.zeros(1, denoiser.img_channels, res, res,
                                          device=next(denoiser.parameters()).device))
        known = sorted(probe, reverse=True)
        self.levels = tuple(int(v) for v in levels) or tuple(known)
        missing = [v for v in self.levels if v not in probe]
        if missing:
            raise ValueError(f"disc_levels {missing} are not encoder resolutions; available: {known}")
        self.channels = [probe[r].shape[1] for r in self.levels]

    def _all(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        den, bb = self.denoiser, self.denoiser.backbone
        sigma = torch.full((x.shape[0],), self.sigma, device=x.device)
        _, _, c_in, c_noise = den.coefficients(sigma)
        emb = bb.embed(c_noise, None)
        h = c_in.reshape(-1, 1, 1, 1) * (x + self.sigma * torch.randn_like(x))
        feats = {}
        for name, layer in bb.enc.items():
            h = layer(h) if name.endswith("_conv") else layer(h, emb)
            feats[h.shape[-1]] = h  # the last layer at each resolution wins
        return feats

    def forward(self, x):
        feats = self._all(x)
        return [feats[r] for r in self.levels]


class _Head(nn.Module):
    """conv3×3 → GN → LReLU → conv3×3 → GN → LReLU → conv1×1, spatial mean; optional class projection
    (Miyato & Koyama 2018)."""

    def __init__(self, channels: int, hidden: int, num_classes: int):
        super().__init__()
        groups = max(1, min(32, hidden // 8))
        self.body = nn.Sequential(nn.Conv2d(channels, hidden, 3, padding=1), nn.GroupNorm(groups, hidden),
                                  nn.LeakyReLU(0.2), nn.Conv2d(hidden, hidden, 3, padding=1),
                                  nn.GroupNorm(groups, hidden), nn.LeakyReLU(0.2))
        self.out = nn.Conv2d(hidden, 1, 1)
        self.embed = nn.Linear(num_classes, hidden, bias=False) if num_classes else None

    def forward(self, f, onehot=None):
        h = self.body(f)
        logit = self.out(h).mean((2, 3)).squeeze(1)
        if self.embed is not None and onehot is not None:
            logit = logit + (self.embed(onehot) * h.mean((2, 3))).sum(1) / math.sqrt(h.shape[1])
        return logit


class FeatureDiscriminator(nn.Module):
    """Small trainable heads on the maps of a frozen feature network (any module x -> list of (B, C_i, H_i, W_i)).

    The feature network is held outside the module tree: it is moved with the discriminator (``.to``) but is
    not trained, not DDP-synchronised and not checkpointed. Returns logits (B, number of heads).
    """

    def __init__(self, features: nn.Module, channels, hidden: int = 64, num_classes: int = 0):
        super().__init__()
        self._features = (features.eval().requires_grad_(False),)
        self.num_classes = num_classes
        self.heads = nn.ModuleList(_Head(c, hidden, num_classes) for c in channels)

    @property
    def features(self) -> nn.Module:
        return self._features[0]

    def _apply(self, fn, *args, **kwargs):
        super()._apply(fn, *args, **kwargs)
        self._features[0]._apply(fn, *args, **kwargs)
        return self

    def forward(self, x, class_labels=None):
        onehot = None
        if self.num_classes and class_labels is not None:
            lab = class_labels.long()
            onehot = F.one_hot(lab.clamp(min=0), self.num_classes).float() * (lab >= 0).float()[:, None]
        feats = self.features(x)
        return torch.stack([head(f.float(), onehot) for head, f in zip(self.heads, feats)], dim=1)


@register_discriminator("teacher-encoder")
def _teacher_encoder_disc(teacher, cfg, num_classes, shape):
    feats = TeacherEncoderFeatures(teacher, cfg.disc_sigma, cfg.disc_levels)
    return FeatureDiscriminator(feats, feats.channels, cfg.disc_hidden, num_classes)


# --- Losses ------------------------------------------------------------------------------------------

def d_loss(logits_real: torch.Tensor, logits_fake: torch.Tensor) -> torch.Tensor:
    """E softplus(−D(real)) + E softplus(D(fake)) (Goodfellow et al. 2014, Eq. 1), averaged over heads."""
    return F.softplus(-logits_real.float()).mean() + F.softplus(logits_fake.float()).mean()


def g_loss(logits_fake: torch.Tensor) -> torch.Tensor:
    """Non-saturating generator loss E softplus(−D(G(z))) (Goodfellow et al. 2014, Sec. 3), mean over heads."""
    return F.softplus(-logits_fake.float()).mean()


def r1_penalty(logits_real: torch.Tensor, x_real: torch.Tensor) -> torch.Tensor:
    """E‖∇_x Σ_heads D(x)‖² on real data (Mescheder et al. 2018, Eq. 9 without γ/2), differentiable."""
    (grad,) = torch.autograd.grad(logits_real.float().sum(), x_real, create_graph=True)
    return grad.float().square().flatten(1).sum(1).mean()


# --- The method ----------------------------------------------------------------------------------------

@dataclass
class GDDConfig:
    """GDD / GDD-I: one-step GAN distillation from the teacher (Zheng & Yang 2024)."""

    teacher: str = "fashion-mnist"     # embedded teacher name, .safetensors or teacher run folder
    data: str = ""                     # real images for the GAN loss ("" = the teacher's training data)
    sigma_init: float = 80.0           # generator noise level: x = D(σ·z; σ)
    cond: bool = True                  # class-conditional G and D when the teacher has classes
    freeze_innate: bool = False        # GDD-I: freeze the parameters matched by --freeze-regex
    freeze_regex: str = INNATE_REGEX   # names (relative to the UNet) that --freeze-innate freezes
    disc: str = "teacher-encoder"      # discriminator builder (getfast.methods.gdd.DISCRIMINATORS)
    disc_sigma: float = 0.2            # noise level at which the frozen teacher encoder sees images
    disc_hidden: int = 64              # width of each trainable discriminator head
    disc_levels: tuple = ()            # encoder resolutions that get a head (empty: all)
    lr_g: float = 2e-5                 # generator Adam learning rate
    lr_d: float = 2e-4                 # discriminator Adam learning rate
    betas: tuple = (0.0, 0.99)         # Adam betas for both networks
    r1_gamma: float = 1e-4             # R1 weight γ on real data (0: off)
    r1_interval: int = 16              # lazy R1: every this many steps, scaled by it
    grad_clip: float = 0.0             # max gradient norm for both networks (0: off)
    init_seed: int = 0                 # seed of the discriminator heads' random initialisation

    def __post_init__(self):
        self.disc_levels = tuple(int(v) for v in self.disc_levels)
        self.betas = tuple(float(b) for b in self.betas)
        if self.r1_interval < 1:
            raise ValueError(f"r1_interval must be >= 1, got {self.r1_interval}")
        if self.r1_gamma < 0:
            raise ValueError(f"r1_gamma must be >= 0, got {self.r1_gamma}")
        if not self.sigma_init > 0:
            raise ValueError(f"sigma_init must be > 0, got {self.sigma_init}")
        re.compile(self.freeze_regex)


class GDDMethod:
    """GDD/GDD-I on the shared loop. ``teacher``, ``generator``, ``discriminator`` and ``data`` may be given
    (any one-step generator G(z, labels), any :class:`Discriminator`, any ``batch(idx)`` dataset)."""

    ema_module = "generator"

    def __init__(self, cfg: GDDConfig, teacher: nn.Module | None = None, generator: nn.Module | None = None,
                 discriminator: nn.Module | None = None, data=None, shape=None, num_classes=None, log=print):
        from getfast.data import load_dataset
        from getfast.teacher import load
        self.cfg = cfg
        if teacher is None and (generator is None or discriminator is None):
            teacher = load(cfg.teacher)
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        meta = getattr(self.teacher, "meta", {})
        if data is None:
            name = cfg.data or meta.get("data")
            if not name:
                raise ValueError("GDD needs real images: pass --data (the teacher records no training data)")
            data = load_dataset(name, resolution=meta.get("resolution"))
        self.data = data
        self.shape = tuple(shape or (meta["channels"], meta["resolution"], meta["resolution"]))
        x0, _ = data.batch(torch.arange(1))
        if tuple(x0.shape[1:]) != self.shape:
            raise ValueError(f"data images are {tuple(x0.shape[1:])}, the generator makes {self.shape}")
        if num_classes is None:
            num_classes = meta.get("num_classes", 0) if cfg.cond else 0
            if num_classes and not getattr(data, "num_classes", 0):
                num_classes = 0  # unlabelled data: an unconditional GAN (the generator gets "no class")
        self.num_classes = num_classes
        gen = generator if generator is not None else OneStepGenerator(copy.deepcopy(self.teacher), cfg.sigma_init)
        gen.train().requires_grad_(True)
        self.frozen_fraction = 0.0
        if cfg.freeze_innate:
            self.frozen_fraction = freeze_innate(gen, cfg.freeze_regex)
            if log is not None and os.environ.get("RANK", "0") == "0":
                log(f"GDD-I: froze {self.frozen_fraction:.1%} of the generator's parameters ({cfg.freeze_regex})")
        if discriminator is None:
            with torch.random.fork_rng(devices=[]):  # the loop seeds after construction: fix the heads' init here
                torch.manual_seed(cfg.init_seed)
                discriminator = build_discriminator(cfg.disc, self.teacher, cfg, self.num_classes, self.shape)
        disc = discriminator
        disc.train().requires_grad_(True)
        self.modules = {"generator": gen, "discriminator": disc}
        self.optimizers = {
            "generator": torch.optim.Adam([p for p in gen.parameters() if p.requires_grad], lr=cfg.lr_g, betas=cfg.betas),
            "discriminator": torch.optim.Adam(disc.parameters(), lr=cfg.lr_d, betas=cfg.betas),
        }

    def config(self):
        return {"method": "gdd", **asdict(self.cfg)}

    def setup(self, wrap):
        dev = next(self.modules["generator"].parameters()).device
        if self.teacher is not None:
            self.teacher.to(dev)
        self.modules["discriminator"].to(dev)
        self.G, self.D = wrap(self.modules["generator"]), wrap(self.modules["discriminator"])

    def step(self, batch, step):
        x_real, labels = batch
        n, dev = x_real.shape[0], x_real.device
        labels = labels if self.num_classes else None
        clip = self.cfg.grad_clip or None
        # Discriminator: real vs detached fakes in one forward (one DDP pass), lazy R1 on the real half.
        with torch.no_grad():
            x_fake = self.G(torch.randn(n, *self.shape, device=dev), labels)
        do_r1 = self.cfg.r1_gamma > 0 and step % self.cfg.r1_interval == 0
        x_r = x_real.detach().float().requires_grad_(do_r1)
        both_labels = None if labels is None else torch.cat([labels, labels])
        logits = self.D(torch.cat([x_r, x_fake.detach().float()]), both_labels)
        l_real, l_fake = logits[:n], logits[n:]
        loss_d = d_loss(l_real, l_fake)
        out = {"loss_d": loss_d.detach(), "d_real": l_real.detach().float().mean(),
               "d_fake": l_fake.detach().float().mean()}
        if do_r1:
            r1 = r1_penalty(l_real, x_r)
            loss_d = loss_d + 0.5 * self.cfg.r1_gamma * self.cfg.r1_interval * r1
            out["r1"] = r1.detach()
        self.optimizers["discriminator"].zero_grad(set_to_none=True)
        loss_d.backward()
        clip_and_step(self.optimizers["discriminator"], self.modules["discriminator"].parameters(), clip)
        # Generator: non-saturating loss through the (unwrapped, frozen for this step) discriminator.
        disc = self.modules["discriminator"]
        disc.requires_grad_(False)
        try:
            x_g = self.G(torch.randn(n, *self.shape, device=dev), labels)
            loss_g = g_loss(disc(x_g.float(), labels))
            self.optimizers["generator"].zero_grad(set_to_none=True)
            loss_g.backward()
            clip_and_step(self.optimizers["generator"],
                          [p for p in self.modules["generator"].parameters() if p.requires_grad], clip)
        finally:
            disc.requires_grad_(True)
        out["loss_g"] = loss_g.detach()
        if self.cfg.freeze_innate:
            out["frozen_frac"] = torch.tensor(self.frozen_fraction)
        return out

    def sample_grid(self, ema, n):
        device = next(ema.parameters()).device
        z = torch.randn(n, *self.shape, device=device)
        labels = torch.arange(n, device=device) % self.num_classes if self.num_classes else None
        return ema(z, labels)
