"""Low-dimensional problems with known answers, for showing that a method *works*.

A data distribution N(μ, diag(s²)) has the exact EDM denoiser
    D(x; σ) = μ + s² / (s² + σ²) · (x − μ)            (Tweedie's formula for a Gaussian),
so a teacher, a learnable "fake" denoiser and an affine one-step generator can be written down
exactly, and a distilled student can be compared with the target by mean and covariance. For the
probability-flow ODE (Karras et al. 2022, Eq. 4) of Gaussian data the map from the initial noise
x_T = σ_max·z to the sample is affine and known in closed form (:func:`pf_ode_map`).
Tensors are image-shaped (B, C, H, W) so the same method code runs on them as on images.

:class:`GaussianBackbone` makes the exact denoiser of a class-conditional Gaussian data set an EDM backbone,
so ``EDMPrecond(GaussianBackbone(...))`` goes through the same preconditioning, labels and guidance code as a
UNet teacher, and the methods' own copies of it (SIM's generator and fake score, GDD's generator) are the
real ``OneStepGenerator`` over a learnable analytic denoiser.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from getfast.diffusion import EDMPrecond


class GaussianDenoiser(nn.Module):
    """Exact denoiser of N(mean, diag(std²)), optionally class-conditional (one mean per class).

    ``learnable=True`` makes mean and log-std parameters: the ideal fake-score model for a
    Gaussian generator.
    """

    def __init__(self, mean: torch.Tensor, std: torch.Tensor, learnable: bool = False, class_means=None):
        super().__init__()
        p = nn.Parameter if learnable else (lambda t: nn.Parameter(t, requires_grad=False))
        self.mean = p(mean.clone().float())
        self.log_std = p(std.clone().float().log())
        self.class_means = None if class_means is None else nn.Parameter(class_means.clone().float(), requires_grad=False)
        self.num_classes = 0 if class_means is None else class_means.shape[0]
        self.sigma_data = 0.5

    def forward(self, x, sigma, class_labels=None, cfg_scale=None, w=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1, *[1] * (x.ndim - 1))
        var = (2 * self.log_std).exp()
        mean = self.mean
        if self.class_means is not None and class_labels is not None:
            labels = class_labels.long() if not class_labels.dtype.is_floating_point else class_labels.argmax(1)
            cm = self.class_means[labels.clamp(min=0)]
            mean = torch.where((labels >= 0).reshape(-1, *[1] * (x.ndim - 1)), cm, mean.expand_as(cm))
        d = mean + var / (var + sigma**2) * (x - mean)
        if cfg_scale is not None and self.class_means is not None:
            d_u = self.mean + var / (var + sigma**2) * (x - self.mean)
            d = d + cfg_scale * (d - d_u)
        return d


class GaussianBackbone(nn.Module):
    """EDM backbone F(c_in·x; c_noise, labels) whose preconditioned denoiser is exact for class-conditional
    Gaussian data: class k is N(means[k], diag(stds[k]²)), classes equally likely.

    With a one-hot label the denoiser is class k's Tweedie formula; with a zero row (no class, as EDMPrecond
    makes for label −1 or the unconditional half of classifier-free guidance) it is the posterior mean of the
    mixture, Σ_k r_k(x)·D_k(x; σ) with r_k ∝ N(x; μ_k, s_k² + σ²). Means and log-stds are parameters (frozen
    by whoever freezes the teacher; a copy can learn them). ``w`` is accepted and ignored.
    """

    def __init__(self, means: torch.Tensor, stds: torch.Tensor, sigma_data: float = 0.5):
        super().__init__()
        if means.shape != stds.shape or means.ndim != 4:
            raise ValueError(f"means and stds must both be (K, C, H, W), got {tuple(means.shape)}, {tuple(stds.shape)}")
        self.means = nn.Parameter(means.clone().float())
        self.log_stds = nn.Parameter(stds.clone().float().log())
        self.num_classes = means.shape[0]
        self.in_channels, self.img_resolution = means.shape[1], means.shape[-1]
        self.sigma_data = sigma_data

    def denoise(self, x: torch.Tensor, sigma: torch.Tensor, onehot: torch.Tensor | None) -> torch.Tensor:
        """The exact D(x; σ, class) for x (B, C, H, W), σ (B,), one-hot rows (B, K) (zero rows: no class)."""
        s2 = (2 * self.log_stds).exp()                                       # (K, C, H, W)
        v = s2[None] + sigma.reshape(-1, 1, 1, 1, 1) ** 2                     # (B, K, C, H, W)
        d_k = self.means[None] + s2[None] / v * (x[:, None] - self.means[None])
        logp = -0.5 * (((x[:, None] - self.means[None]) ** 2) / v + v.log()).flatten(2).sum(2)  # (B, K)
        r = torch.softmax(logp, dim=1)
        if onehot is not None:
            has = onehot.sum(1, keepdim=True) > 0
            r = torch.where(has, onehot.to(r.dtype), r)
        return (r.reshape(*r.shape, 1, 1, 1) * d_k).sum(1)

    def forward(self, x_in, c_noise, class_labels=None, w=None):
        sigma = (4 * c_noise.float()).exp()
        sd = self.sigma_data
        den = (sigma**2 + sd**2).sqrt().reshape(-1, 1, 1, 1)
        x = x_in.float() * den                                               # undo c_in
        c_skip = sd**2 / den**2
        c_out = sigma.reshape(-1, 1, 1, 1) * sd / den
        return (self.denoise(x, sigma, class_labels) - c_skip * x) / c_out


def gaussian_teacher(means: torch.Tensor, stds: torch.Tensor, label_dropout: float = 0.1, data: str = "analytic"):
    """A frozen ``EDMPrecond(GaussianBackbone)`` with teacher metadata, as ``getfast.teacher.load`` returns it.

    ``label_dropout`` is only recorded (as a trained teacher records it): a distillation student copied from this
    teacher must come out deterministic anyway.
    """
    net = EDMPrecond(GaussianBackbone(means, stds))
    net.meta = {"model": "analytic-gaussian", "resolution": means.shape[-1], "channels": means.shape[1],
                "num_classes": means.shape[0], "label_dropout": label_dropout, "data": data}
    return net.eval().requires_grad_(False)


def pf_ode_map(z: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, sigma_max: float = 80.0) -> torch.Tensor:
    """Where EDM's probability-flow ODE (Karras et al. 2022, Eq. 4) carries x_T = σ_max·z for data
    N(mean, diag(std²)). The ODE keeps ε = (x_t − μ)/√(s² + t²) constant, so
    x₀ = μ + s·(σ_max·z − μ)/√(s² + σ_max²) ≈ μ + s·σ_max·z/√(s² + σ_max²) (the μ term is O(μ·s/σ_max))."""
    return mean + std * (sigma_max * z - mean) / (std**2 + sigma_max**2).sqrt()


class AffineGenerator(nn.Module):
    """x = a ⊙ z + b: a one-step generator whose output law N(b, diag(a²)) is known in closed form."""

    def __init__(self, shape, scale=1.0, shift=0.0):
        super().__init__()
        self.a = nn.Parameter(torch.full(shape, float(scale)))
        self.b = nn.Parameter(torch.full(shape, float(shift)))

    def forward(self, z, class_labels=None):
        return self.a * z + self.b


def moments_distance(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> tuple[float, float]:
    """(max |mean error|, max |std error|) of samples x (B, ...) against per-dimension targets."""
    x = x.flatten(1).double()
    return (float((x.mean(0) - mean.flatten().double()).abs().max()),
            float((x.std(0) - std.flatten().double()).abs().max()))


# --- Pieces for GDD and guided distillation on low-dimensional problems --------------------------

class ToyData:
    """In-memory samples ``x`` (N, C, H, W) and optional labels, with the loop's ``batch(idx)`` interface."""

    def __init__(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        self.x, self.labels = x.float(), labels
        self.num_classes = 0 if labels is None else int(labels.max()) + 1

    def __len__(self):
        return len(self.x)

    def batch(self, idx):
        return self.x[idx], (None if self.labels is None else self.labels[idx])


class ToyPairs:
    """Noise/image pairs (and labels) in memory with the ``batch(idx) -> (noise, image, labels)`` interface of
    ``getfast.data.PairDataset``."""

    def __init__(self, noise: torch.Tensor, images: torch.Tensor, labels: torch.Tensor | None = None,
                 num_classes: int = 0):
        self.noise, self.images, self.labels = noise.float(), images.float(), labels
        self.shape = tuple(noise.shape[1:])
        self.num_classes = num_classes

    def __len__(self):
        return len(self.noise)

    def batch(self, idx):
        return self.noise[idx], self.images[idx], (None if self.labels is None else self.labels[idx])


def gaussian_samples(n: int, mean: torch.Tensor, std: torch.Tensor, class_means=None, seed: int = 0) -> ToyData:
    """n draws of N(mean, diag(std²)) shaped like ``mean``; with ``class_means`` (K, ...) one class per draw."""
    g = torch.Generator().manual_seed(seed)
    eps = torch.randn(n, *mean.shape, generator=g)
    if class_means is None:
        return ToyData(mean + std * eps)
    labels = torch.randint(0, class_means.shape[0], (n,), generator=g)
    return ToyData(class_means[labels] + std * eps, labels)


def mixture_samples(n: int, centers: torch.Tensor, std: float, seed: int = 0) -> ToyData:
    """n draws of an equal-weight mixture of isotropic Gaussians at ``centers`` (K, D), shaped (n, D, 1, 1)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randint(0, centers.shape[0], (n,), generator=g)
    x = centers[k] + std * torch.randn(n, centers.shape[1], generator=g)
    return ToyData(x.reshape(n, -1, 1, 1))


def mmd_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=(0.1, 0.3, 1.0)) -> float:
    """Squared maximum mean discrepancy (biased V-statistic) with a sum of RBF kernels (Gretton et al. 2012)."""
    x, y = x.flatten(1).double(), y.flatten(1).double()
    xy = torch.cat([x, y])
    d2 = torch.cdist(xy, xy).pow(2)
    k = sum(torch.exp(-d2 / (2 * h * h)) for h in bandwidths)
    n = len(x)
    return float(k[:n, :n].mean() + k[n:, n:].mean() - 2 * k[:n, n:].mean())


def _mlp(d_in, d_out, hidden, depth=2, act=nn.SiLU):
    layers, d = [], d_in
    for _ in range(depth):
        layers += [nn.Linear(d, hidden), act()]
        d = hidden
    layers.append(nn.Linear(d, d_out))
    return nn.Sequential(*layers)


class MLPGenerator(nn.Module):
    """x = MLP(z) for image-shaped low-dimensional data: a generic one-step generator for GAN tests."""

    def __init__(self, shape, hidden: int = 64):
        super().__init__()
        self.shape = tuple(shape)
        d = int(torch.tensor(shape).prod())
        self.net = _mlp(d, d, hidden)

    def forward(self, z, class_labels=None):
        return self.net(z.flatten(1)).reshape(z.shape)


class MLPDiscriminator(nn.Module):
    """Logits (B, 1) from an MLP on the flattened input (the discriminator protocol of getfast.methods.gdd); with
    ``num_classes`` a projection term ⟨embed(class), features⟩ makes it class-conditional (Miyato & Koyama 2018)."""

    def __init__(self, shape, hidden: int = 64, num_classes: int = 0):
        super().__init__()
        d = int(torch.tensor(shape).prod())
        self.body = _mlp(d, hidden, hidden, depth=1, act=lambda: nn.LeakyReLU(0.2))
        self.act = nn.LeakyReLU(0.2)
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Embedding(num_classes, hidden) if num_classes else None

    def forward(self, x, class_labels=None):
        h = self.act(self.body(x.flatten(1)))
        logit = self.out(h)
        if self.embed is not None and class_labels is not None:
            logit = logit + (self.embed(class_labels.long().clamp(min=0)) * h).sum(1, keepdim=True) / math.sqrt(h.shape[1])
        return logit


class WGuided(nn.Module):
    """An analytic teacher called the way a w-conditioned student is: D(x, σ, c, w=w) = CFG of ``base`` at w."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.sigma_data = getattr(base, "sigma_data", 0.5)

    def forward(self, x, sigma, class_labels=None, cfg_scale=None, w=None):
        scale = cfg_scale if cfg_scale is not None else w
        if torch.is_tensor(scale) and scale.ndim == 1:
            scale = scale.reshape(-1, *[1] * (x.ndim - 1))
        return self.base(x, sigma, class_labels, cfg_scale=scale)


class ResidualDenoiser(nn.Module):
    """``base`` plus an EDM-preconditioned MLP correction c_out(σ)·F(c_in·x, c_noise, class, w).

    The MLP's last layer starts at zero, so the model starts as ``base`` (as a teacher-initialised
    student does); with ``w_cond`` it takes the guidance weight w like a guided-distillation student:
    F = u + w·v with both heads of one MLP that also sees features of w (a multiplicative path for w, as the
    UNet's w embedding scales its features; classifier-free guidance is linear in w).
    """

    def __init__(self, base: nn.Module, shape, hidden: int = 128, num_classes: int = 0, w_cond: bool = False,
                 sigma_data: float = 0.5):
        super().__init__()
        self.base, self.num_classes, self.w_cond, self.sigma_data = base, num_classes, w_cond, sigma_data
        d = int(torch.tensor(shape).prod())
        self.net = _mlp(d + 1 + num_classes + (5 if w_cond else 0), 2 * d if w_cond else d, hidden, depth=3)
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, x, sigma, class_labels=None, cfg_scale=None, w=None):
        sigma = torch.as_tensor(sigma, dtype=x.dtype, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        out = self.base(x, sigma, class_labels, cfg_scale=cfg_scale, w=w)
        sd = self.sigma_data
        c_in = (1 / (sigma**2 + sd**2).sqrt()).reshape(-1, 1)
        c_out = (sigma * sd / (sigma**2 + sd**2).sqrt()).reshape(-1, *[1] * (x.ndim - 1))
        feats = [c_in * x.flatten(1), (sigma.log() / 4).reshape(-1, 1)]
        if self.num_classes:
            oh = torch.zeros(x.shape[0], self.num_classes, device=x.device)
            if class_labels is not None:
                lab = class_labels.long()
                oh = nn.functional.one_hot(lab.clamp(min=0), self.num_classes).float() * (lab >= 0).float()[:, None]
            feats.append(oh)
        if not self.w_cond:
            return out + c_out * self.net(torch.cat(feats, 1)).reshape(x.shape)
        wv = torch.zeros(x.shape[0], device=x.device) if w is None else torch.as_tensor(w, device=x.device)
        wv = wv.float().reshape(-1).expand(x.shape[0]).reshape(-1, 1)
        feats.append(torch.cat([wv / 4, torch.sin(wv), torch.cos(wv), torch.sin(wv / 2), torch.cos(wv / 2)], 1))
        u, v = self.net(torch.cat(feats, 1)).chunk(2, dim=1)
        return out + c_out * (u + wv * v).reshape(x.shape)
