"""A one-step generator made from a denoiser (SiD/SIM, GDD)."""
from __future__ import annotations

import torch
from torch import nn


class OneStepGenerator(nn.Module):
    """x = D(σ_init·z; σ_init): a denoiser evaluated once at a fixed noise level.

    Used by SIM (σ_init ≈ 2.5, as SiD, Zhou et al. 2024) and GDD (σ_init = 80, Zheng & Yang 2024). It is a
    deterministic function of (noise, label): the wrapped denoiser never drops labels.
    """

    def __init__(self, denoiser: nn.Module, sigma_init: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = float(sigma_init)

    def forward(self, z, class_labels=None):
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device)
        return self.denoiser(self.sigma_init * z, sigma, class_labels)
