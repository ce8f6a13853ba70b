"""EDM training loss (Karras et al. 2022, Eq. 2 and Table 1)."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EDMLoss:
    P_mean: float = -1.2     # mean of ln(σ) in training (EDM Table 1)
    P_std: float = 1.2       # std of ln(σ) in training
    sigma_data: float = 0.5  # std of the data

    def sample_sigma(self, n, device, generator=None):
        rnd = torch.randn(n, device=device, generator=generator)
        return (rnd * self.P_std + self.P_mean).exp()

    def weight(self, sigma):
        """λ(σ) = (σ² + σ_d²) / (σ·σ_d)², which makes the effective target unit-variance."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def __call__(self, D, y, class_labels=None, sigma=None, noise=None):
        """Per-sample loss λ(σ)·‖D(y + σn; σ) − y‖² averaged over pixels, shape (B,)."""
        if sigma is None:
            sigma = self.sample_sigma(y.shape[0], y.device)
        if noise is None:
            noise = torch.randn_like(y)
        s = sigma.reshape(-1, 1, 1, 1)
        D_yn = D(y + s * noise, sigma, class_labels)
        return (self.weight(s) * (D_yn - y) ** 2).flatten(1).mean(1)
