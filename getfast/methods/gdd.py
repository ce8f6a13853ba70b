"""GDD / GDD-I: GAN distillation of a diffusion model into a one-step generator (Zheng & Yang 2024,
"Diffusion Models Are Innate One-Step Generators", arXiv 2405.20750).

The generator G starts as a copy of the teacher and is evaluated once at a fixed noise level,
x = D(σ_init·z; σ_init) (σ_init = 80). It is trained with the non-saturating GAN loss against real
images only — no instance-level (pairwise) loss to the teacher's outputs:
    L_G = E softplus(−D(A(G(z))))
    L_D = E softplus(−D(A(x_real))) + E softplus(D(A(G(z))))
    lazy R1: a separate discriminator step (γ/2)·k·E‖∇_x D(x_real)‖² every k steps after the first
(Goodfellow et al. 2014; R1: Mescheder et al. 2018, Eq. 9; lazy regularisation: Karras et al. 2020, Sec. 3.1),
where A is optional ADA-style differentiable augmentation at a fixed probability ``aug_p`` (Karras et al. 2020,
"Training Generative Adversarial Networks with Limited Data", Sec. 2-3) on real and fake images alike; it is off by
default, as in every official run (Zyriix/GDD train.sh: ``--augment=0`` for GDD, ``--augment-p`` left at 0 for
GDD-I). As in the official training, the generator steps before the discriminator; Adam betas (0, 0.99), and the
discriminator's Adam carries the lazy-R1 correction (:func:`discriminator_adam`). Learning rates: CIFAR-10 1e-4
for both; 64×64 runs use a larger discriminator rate (``getfast presets``).

The discriminator is where getfast deviates from the paper, which uses frozen ImageNet networks (VGG16-BN +
EfficientNet-lite0, DeiT at 64×64) that cannot be downloaded at run time here. The default
``teacher-encoder`` discriminator uses the frozen encoder of the teacher's own UNet, run at a small noise
level on the noised image, for feature maps at every resolution, with a small trainable head on each
(DMD2/LADD's idea with the teacher as the feature network). Any frozen feature network the user has weights
for can take its place: ``--disc torchscript --disc-network net.pt`` (a TorchScript file), or in Python
:class:`FeatureNetwork` + :class:`FeatureDiscriminator` (e.g. a torchvision VGG16-BN's feature maps) registered
with :func:`register_discriminator`.

GDD-I (official ``--freeze=1``) freezes the UNet blocks' 3×3 convolutions ``conv0``/``conv1`` and the attention
output projections ``proj``; the attention ``qkv``, the 1×1 skips, norms, modulations, embeddings, the stem and
the head stay trainable: 85.4 % of EDM's CIFAR-10 DDPM++ UNet is frozen by the default pattern.
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import asdict, dataclass
from typing import Callable, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from getfast.data import load_dataset
from getfast.methods.students import student_meta
from getfast.models.dropout import set_dropout
from getfast.models.onestep import OneStepGenerator
from getfast.teacher import load as load_teacher
from getfast.options import check_betas, check_bool, check_number, check_text
from getfast.train.step import adam

# Relative to the UNet (getfast.models.unet): the blocks' 3×3 convolutions conv0/conv1 and attention output
# projections proj (the official GDD-I set; qkv stays trainable).
INNATE_REGEX = r"^(enc|dec)\.[^.]+\.(conv0|conv1|proj)\."

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


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
    """Freeze the innate parameters (Zheng & Yang 2024, Sec. 4, GDD-I); returns the frozen fraction of
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


# --- Augmentation ------------------------------------------------------------------------------------

def _reflect(i: torch.Tensor, n: int) -> torch.Tensor:
    """Indices reflected into [0, n) without repeating the edge (as reflect padding)."""
    if n == 1:
        return torch.zeros_like(i)
    period = 2 * (n - 1)
    i = i.remainder(period)
    return torch.where(i >= n, period - i, i)


def augment(x: torch.Tensor, p: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """ADA-style differentiable augmentation (Karras et al. 2020, Sec. 2.2 and Appendix B), each transform applied
    to each image independently with probability ``p``:

    * x-flip; rotation by a multiple of 90°; integer translation by up to 1/8 of the size (reflected edges);
    * brightness + N(0, 0.2²); contrast × lognormal(0, (0.5·ln 2)²) about the image mean;
      saturation × lognormal(0, ln 2²) about the luma axis (RGB only).

    Non-square images skip the rotation. ADA's fractional geometric transforms (scaling, arbitrary rotation,
    anisotropy, fractional translation) and its luma flip and hue rotation are not included. The result is
    differentiable with respect to ``x`` (so R1 can be taken through it); ``p = 0`` returns ``x``.
    """
    if p <= 0:
        return x
    B, C, H, W = x.shape
    dev = x.device

    def coin():
        return (torch.rand(B, device=dev, generator=generator) < p).reshape(B, 1, 1, 1)

    x = torch.where(coin(), x.flip(3), x)
    if H == W:
        k = torch.randint(1, 4, (B,), device=dev, generator=generator).reshape(B, 1, 1, 1)
        rot = torch.where(k == 1, x.rot90(1, (2, 3)), torch.where(k == 2, x.rot90(2, (2, 3)), x.rot90(3, (2, 3))))
        x = torch.where(coin(), rot, x)
    on = coin().reshape(B)
    mx, my = max(1, round(W / 8)), max(1, round(H / 8))
    dx = torch.randint(-mx, mx + 1, (B,), device=dev, generator=generator) * on
    dy = torch.randint(-my, my + 1, (B,), device=dev, generator=generator) * on
    ix = _reflect(torch.arange(W, device=dev)[None] - dx[:, None], W)  # (B, W)
    iy = _reflect(torch.arange(H, device=dev)[None] - dy[:, None], H)  # (B, H)
    x = x.gather(3, ix[:, None, None, :].expand(B, C, H, W))
    x = x.gather(2, iy[:, None, :, None].expand(B, C, H, W))
    x = x + torch.where(coin(), 0.2 * torch.randn(B, 1, 1, 1, device=dev, generator=generator), 0.0)
    mean = x.mean(dim=(1, 2, 3), keepdim=True)
    c = torch.exp(0.5 * math.log(2) * torch.randn(B, 1, 1, 1, device=dev, generator=generator))
    x = torch.where(coin(), (x - mean) * c + mean, x)
    if C == 3:
        luma = (x * x.new_tensor([0.299, 0.587, 0.114]).reshape(1, 3, 1, 1)).sum(1, keepdim=True)
        s = torch.exp(math.log(2) * torch.randn(B, 1, 1, 1, device=dev, generator=generator))
        x = torch.where(coin(), (x - luma) * s + luma, x)
    return x


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
        if hasattr(bb, "encode"):  # imported EDM networks (their skip/residual encoders have side paths)
            outs = bb.encode(h, emb)
        else:
            outs = []
            for name, layer in bb.enc.items():
                h = layer(h) if name.endswith("_conv") else layer(h, emb)
                outs.append(h)
        return {o.shape[-1]: o for o in outs}  # the last layer at each resolution wins

    def forward(self, x):
        feats = self._all(x)
        return [feats[r] for r in self.levels]


class FeatureNetwork(nn.Module):
    """Frozen feature maps of any image network, for :class:`FeatureDiscriminator`.

    Images in [-1, 1] are resized to ``size`` × ``size`` (bilinear; 0: unchanged), grey images repeated to
    ``channels``, mapped to [0, 1] and normalised with ``mean``/``std`` (ImageNet's by default, the convention of
    torchvision and timm classifiers), then passed to ``net``. ``net`` may return one tensor or a list/tuple:
    (B, C, H, W) maps are used as they are, (B, C) vectors as 1×1 maps. ``net`` is frozen (eval mode, no
    gradients to its parameters); gradients still flow to the input images.
    """

    def __init__(self, net: nn.Module, size: int = 224, channels: int = 3, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        super().__init__()
        self.net = net.eval()
        for p in self.net.parameters():  # (a TorchScript module has no requires_grad_)
            p.requires_grad_(False)
        self.size, self.channels = int(size), int(channels)
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).reshape(1, -1, 1, 1), persistent=False)

    def forward(self, x):
        if self.size and tuple(x.shape[-2:]) != (self.size, self.size):
            x = F.interpolate(x, size=(self.size, self.size), mode="bilinear", align_corners=False)
        if x.shape[1] == 1 and self.channels != 1:
            x = x.expand(-1, self.channels, -1, -1)
        x = ((x + 1) / 2 - self.mean) / self.std
        out = self.net(x)
        out = list(out) if isinstance(out, (list, tuple)) else [out]
        return [f[:, :, None, None] if f.ndim == 2 else f for f in out]

    @torch.no_grad()
    def channels_of(self, shape) -> list[int]:
        """Channels of each returned map for images of ``shape`` (C, H, W) (one probe forward)."""
        dev = next(iter(self.net.parameters()), self.mean).device
        return [f.shape[1] for f in self(torch.zeros(1, *shape, device=dev))]


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
        """``features``: a frozen module x -> list of maps (:class:`TeacherEncoderFeatures`, :class:`FeatureNetwork`
        or any other); ``channels``: the channels of each map."""
        super().__init__()
        features.eval()
        for p in features.parameters():
            p.requires_grad_(False)
        self._features = (features,)
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
    if teacher is None:
        raise ValueError("--disc teacher-encoder needs the teacher's UNet")
    feats = TeacherEncoderFeatures(teacher, cfg.disc_sigma, cfg.disc_levels)
    return FeatureDiscriminator(feats, feats.channels, cfg.disc_hidden, num_classes)


@register_discriminator("torchscript")
def _torchscript_disc(teacher, cfg, num_classes, shape):
    """Heads on a frozen TorchScript feature network the user supplies (``--disc-network``), e.g. an ImageNet
    classifier's feature extractor saved with ``torch.jit.save``."""
    path = cfg.disc_network
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--disc-network {path}: no such file")
    try:
        net = torch.jit.load(path, map_location="cpu")
    except Exception as e:  # TorchScript raises its own error types for files it cannot read
        raise ValueError(f"--disc-network {path}: not a TorchScript module ({type(e).__name__}: {e})") from None
    feats = FeatureNetwork(net, size=cfg.disc_input)
    return FeatureDiscriminator(feats, feats.channels_of(shape), cfg.disc_hidden, num_classes)


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


def discriminator_adam(cfg) -> dict:
    """The discriminator's Adam settings of the official code (Zyriix/GDD, training/training_loop.py, "Setup
    optimizer"): with lazy R1 every k steps, lr·k/(k+1) and betas β^(k/(k+1)), eps 1e-8 — StyleGAN2's correction
    for the extra regularisation steps (Karras et al. 2020b, Sec. 3.1 and its ``mb_ratio``). The official code
    applies it whether or not R1 is on."""
    ratio = cfg.r1_interval / (cfg.r1_interval + 1)
    return {"lr": cfg.lr_d * ratio, "betas": tuple(b ** ratio for b in cfg.betas), "eps": 1e-8}


# --- The method --------------------------------------------------------------------------------------

@dataclass
class GDDConfig:
    """GDD / GDD-I: one-step GAN distillation from the teacher (Zheng & Yang 2024)."""

    teacher: str = "fashion-mnist"     # embedded teacher name, .safetensors or teacher run folder
    data: str = ""                     # real images for the GAN loss ("" = the teacher's training data)
    sigma_init: float = 80.0           # generator noise level: x = D(σ·z; σ)
    cond: bool = True                  # class-conditional G and D when the teacher has classes
    freeze_innate: bool = False        # GDD-I: freeze the parameters matched by --freeze-regex
    freeze_regex: str = INNATE_REGEX   # names (relative to the UNet) that --freeze-innate freezes (official: conv0, conv1, proj)
    aug_p: float = 0.0                 # probability of each ADA-style augmentation on real and fake images (0: off, as every official run: train.sh --augment=0, or --augment-p 0 for GDD-I)
    disc: str = "teacher-encoder"      # discriminator: teacher-encoder (frozen teacher UNet encoder; the paper uses ImageNet networks) | torchscript
    disc_network: str = ""             # --disc torchscript: a TorchScript feature network file (frozen; ImageNet-normalised input)
    disc_input: int = 224              # --disc torchscript: the network's input size (0: the data's own)
    disc_sigma: float = 0.2            # --disc teacher-encoder: noise level at which the frozen encoder sees images
    disc_hidden: int = 64              # width of each trainable discriminator head
    disc_levels: tuple = ()            # --disc teacher-encoder: encoder resolutions that get a head (empty: all)
    lr_g: float = 1e-4                 # generator Adam learning rate (official CIFAR-10: 1e-4)
    lr_d: float = 1e-4                 # discriminator Adam learning rate (official: equal at 32×32, 2× at 64×64)
    betas: tuple = (0.0, 0.99)         # Adam betas (the discriminator's get the lazy-R1 correction, see discriminator_adam)
    r1_gamma: float = 1e-4             # R1 weight γ on real data (0: off)
    r1_interval: int = 16              # lazy R1: every this many steps, scaled by it
    grad_clip: float = 0.0             # max gradient norm for both networks (0: off)
    init_seed: int = 0                 # seed of the discriminator heads' random initialisation

    def __post_init__(self):
        check_text("teacher", self.teacher, "a teacher (file, folder or import)")
        check_text("data", self.data, "a dataset name or path", empty=True)
        check_number("sigma_init", self.sigma_init, lo=0, lo_open=True)
        check_bool("cond", self.cond)
        check_bool("freeze_innate", self.freeze_innate)
        try:
            re.compile(self.freeze_regex)
        except (re.error, TypeError) as e:
            raise ValueError(f"freeze_regex (--freeze-regex) {self.freeze_regex!r} is not a regular expression: {e}") from None
        check_number("aug_p", self.aug_p, lo=0, hi=1)
        if self.disc not in DISCRIMINATORS:
            raise ValueError(f"disc (--disc) must be one of {sorted(DISCRIMINATORS)}, got {self.disc!r}")
        if self.disc == "torchscript" and not self.disc_network:
            raise ValueError("--disc torchscript needs --disc-network (a TorchScript feature network file)")
        check_number("disc_input", self.disc_input, lo=0, integer=True)
        check_number("disc_sigma", self.disc_sigma, lo=0, lo_open=True)
        check_number("disc_hidden", self.disc_hidden, lo=1, integer=True)
        try:
            self.disc_levels = tuple(int(v) for v in self.disc_levels)
        except (TypeError, ValueError):
            raise ValueError(f"disc_levels (--disc-levels) must be resolutions (integers), got {self.disc_levels!r}") from None
        for v in self.disc_levels:
            check_number("disc_levels", v, lo=1, integer=True)
        check_number("lr_g", self.lr_g, lo=0, lo_open=True)
        check_number("lr_d", self.lr_d, lo=0, lo_open=True)
        self.betas = check_betas("betas", self.betas)
        check_number("r1_gamma", self.r1_gamma, lo=0)
        check_number("r1_interval", self.r1_interval, lo=1, integer=True)
        check_number("grad_clip", self.grad_clip, lo=0)
        check_number("init_seed", self.init_seed, lo=0, integer=True)


class GDDMethod:
    """GDD/GDD-I on the shared loop. ``teacher``, ``generator``, ``discriminator`` and ``data`` may be given
    (any one-step generator G(z, labels), any :class:`Discriminator`, any ``batch(idx)`` dataset)."""

    ema_module = "generator"
    product = "student.safetensors"
    lr_options = {"generator": "lr_g", "discriminator": "lr_d"}

    def __init__(self, cfg: GDDConfig, teacher: nn.Module | None = None, generator: nn.Module | None = None,
                 discriminator: nn.Module | None = None, data=None, shape=None, num_classes=None, log=print,
                 fused: bool = False):
        self.cfg = cfg
        if teacher is None and (generator is None or discriminator is None):
            teacher = load_teacher(cfg.teacher)
        self.teacher = None if teacher is None else teacher.eval().requires_grad_(False)
        meta = getattr(self.teacher, "meta", {})
        what = "data"
        if data is None:
            name = cfg.data or meta.get("data")
            if not name:
                raise ValueError("GDD needs real images: pass --data (the teacher records no training data)")
            # The teacher's own training data is read as the teacher read it (padded to its resolution); other
            # data must already have the teacher's image shape: padding or resizing it here would train the
            # discriminator on images unlike the teacher's.
            own = not cfg.data or cfg.data == meta.get("data")
            data = load_dataset(name, resolution=meta.get("resolution") if own else None)
            what = f"data (--data) {name}"
        self.data = data
        self.shape = tuple(shape or (meta["channels"], meta["resolution"], meta["resolution"]))
        x0, _ = data.batch(torch.arange(1))
        if tuple(x0.shape[1:]) != self.shape:
            raise ValueError(f"{what}: its images are {'x'.join(map(str, x0.shape[1:]))} (channels x height x width), "
                             f"the teacher {cfg.teacher} makes {'x'.join(map(str, self.shape))}: give real images of "
                             f"the teacher's size and channels")
        if num_classes is None:
            num_classes = meta.get("num_classes", 0) if cfg.cond else 0
            have = getattr(data, "num_classes", 0)
            if num_classes and not have:  # the generator would silently lose its conditioning
                raise ValueError(f"{what} has no class labels, but the teacher {cfg.teacher} is class-conditional "
                                 f"({num_classes} classes): give labelled images (class sub-folders, or 'y' in an "
                                 f".npz), or pass --no-cond for an unconditional student")
            if num_classes and have > num_classes:
                raise ValueError(f"{what} has labels up to {have - 1}, the teacher {cfg.teacher} knows "
                                 f"{num_classes} classes (0..{num_classes - 1})")
        self.num_classes = num_classes
        # A deterministic function of (noise, label): the teacher copy carries no label dropout, and no dropout:
        # every official run builds the generator with --dropout=0 (Zyriix/GDD, train.sh), while an imported EDM
        # teacher keeps its training dropout (0.13 on CIFAR-10).
        if generator is None:
            generator = OneStepGenerator(copy.deepcopy(self.teacher), cfg.sigma_init)
            set_dropout(generator, 0.0)
        gen = generator
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
            "generator": adam([p for p in gen.parameters() if p.requires_grad], lr=cfg.lr_g, betas=cfg.betas,
                              fused=fused),
            "discriminator": adam(disc.parameters(), fused=fused, **discriminator_adam(cfg)),
        }
        self.grad_clip = cfg.grad_clip

    def frozen(self):
        """The networks read from a path that a resume must find unchanged (train.checkpoint)."""
        return {"teacher": self.teacher}

    def config(self):
        return {"method": "gdd", **asdict(self.cfg)}

    def product_metadata(self) -> dict[str, str]:
        return {"getfast_student": json.dumps(student_meta(self))}

    def setup(self, wrap):
        dev = next(self.modules["generator"].parameters()).device
        if self.teacher is not None:
            self.teacher.to(dev)
        self.modules["discriminator"].to(dev)
        self.G, self.D = wrap(self.modules["generator"]), wrap(self.modules["discriminator"])

    def losses(self, batch, step):
        """Yields the generator's loss, then (with fakes of the updated generator) the discriminator's."""
        x_real, labels = batch
        n, dev = x_real.shape[0], x_real.device
        labels = labels if self.num_classes else None
        p = self.cfg.aug_p
        # Generator: non-saturating loss through the discriminator, called unwrapped (only G is updated here).
        x_g = self.G(torch.randn(n, *self.shape, device=dev), labels)
        out = {"generator": g_loss(self.modules["discriminator"](augment(x_g.float(), p), labels))}
        if self.cfg.freeze_innate:
            out["frozen_frac"] = torch.tensor(self.frozen_fraction)
        yield out
        # Discriminator: real vs detached fakes in one forward (one DDP pass).
        with torch.no_grad():
            x_fake = self.G(torch.randn(n, *self.shape, device=dev), labels)
        both_labels = None if labels is None else torch.cat([labels, labels])
        logits = self.D(augment(torch.cat([x_real.detach().float(), x_fake.detach().float()]), p), both_labels)
        l_real, l_fake = logits[:n], logits[n:]
        yield {"discriminator": d_loss(l_real, l_fake), "d_real": l_real.detach().float().mean(),
               "d_fake": l_fake.detach().float().mean()}
        # Lazy R1 (Karras et al. 2020b, Sec. 3.1) as the official loop does it (Zyriix/GDD,
        # training/training_loop.py, stage DO_DR1; training/loss.py): a discriminator step of its own every
        # r1_interval steps after the first, on the real images without augmentation, weighted by the interval.
        # (The logged loss_discriminator averages these steps with the main ones.)
        if self.cfg.r1_gamma > 0 and step > 0 and step % self.cfg.r1_interval == 0:
            x_r = x_real.detach().float().requires_grad_(True)
            logits_r = self.D(x_r, labels)
            r1 = r1_penalty(logits_r, x_r)
            # + 0·logits: every parameter (a head's output bias has no R1 gradient) joins the backward, which
            # DDP's reducer expects (StyleGAN2-ADA's loss does the same).
            loss = 0.5 * self.cfg.r1_gamma * self.cfg.r1_interval * r1 + 0 * logits_r.float().mean()
            yield {"discriminator": loss, "r1": r1.detach()}

    def sample_grid(self, ema, n):
        device = next(ema.parameters()).device
        z = torch.randn(n, *self.shape, device=device)
        labels = torch.arange(n, device=device) % self.num_classes if self.num_classes else None
        return ema(z, labels)
