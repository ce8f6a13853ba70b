"""Low-dimensional problems with known answers, for showing that a method *works*.

A data distribution N(μ, diag(s²)) has the exact EDM denoiser
    D(x; σ) = μ + s² / (s² + σ²) · (x − μ)            (Tweedie's formula for a Gaussian),
so a teacher, a learnable "fake" denoiser and an affine one-step generator can be written down
exactly, and a distilled student can be compared with the target by mean and covariance.
Tensors are image-shaped (B, C, H, W) so the same method code runs on them as on images.
"""
from __future__ import annotations

import torch
from torch import nn


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
