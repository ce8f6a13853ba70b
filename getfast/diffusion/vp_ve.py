"""VP and VE preconditioning (Karras et al. 2022, Table 1, columns "VP" and "VE"), for teachers trained
with those formulations (EDM's ``VPPrecond``/``VEPrecond`` checkpoints).

Both reuse ``EDMPrecond``'s forward (labels, classifier-free guidance, dtype handling) and change only the
four coefficients of D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise):

* VP (Song et al. 2021): c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1), c_noise = (M−1)·t(σ), where t(σ) inverts
  σ(t) = √(exp(½β_d t² + β_min t) − 1).
* VE (Song et al. 2021): c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2).
* iDDPM (Nichol & Dhariwal 2021): as VP but c_noise is the index of the nearest level of a discrete table.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from getfast.diffusion.precond import EDMPrecond


class VPPrecond(EDMPrecond):
    """Variance-preserving preconditioning over any getfast backbone."""

    def __init__(self, backbone: nn.Module, beta_d: float = 19.9, beta_min: float = 0.1, M: int = 1000,
                 epsilon_t: float = 1e-5):
        super().__init__(backbone)
        self.beta_d, self.beta_min, self.M, self.epsilon_t = float(beta_d), float(beta_min), int(M), float(epsilon_t)
        self.sigma_min = float(self.sigma(epsilon_t))   # the training range σ(ε_t) … σ(1)
        self.sigma_max = float(self.sigma(1))

    def sigma(self, t):
        """σ(t) of the VP SDE (Song et al. 2021, Eq. 33 integrated; Karras et al. 2022, Table 1)."""
        t = torch.as_tensor(t)
        return ((0.5 * self.beta_d * (t ** 2) + self.beta_min * t).exp() - 1).sqrt()

    def sigma_inv(self, sigma):
        """t(σ), the positive root of ½β_d t² + β_min t = ln(1 + σ²)."""
        sigma = torch.as_tensor(sigma)
        return ((self.beta_min ** 2 + 2 * self.beta_d * (1 + sigma ** 2).log()).sqrt() - self.beta_min) / self.beta_d

    def coefficients(self, sigma: torch.Tensor):
        c_skip = torch.ones_like(sigma)
        c_out = -sigma
        c_in = 1 / (sigma ** 2 + 1).sqrt()
        c_noise = (self.M - 1) * self.sigma_inv(sigma)
        return c_skip, c_out, c_in, c_noise


class VEPrecond(EDMPrecond):
    """Variance-exploding preconditioning over any getfast backbone."""

    def __init__(self, backbone: nn.Module, sigma_min: float = 0.02, sigma_max: float = 100):
        super().__init__(backbone)
        self.sigma_min, self.sigma_max = float(sigma_min), float(sigma_max)

    def coefficients(self, sigma: torch.Tensor):
        return torch.ones_like(sigma), sigma, torch.ones_like(sigma), (0.5 * sigma).log()


class IDDPMPrecond(EDMPrecond):
    """Improved-DDPM preconditioning (Karras et al. 2022, Table 1, "iDDPM"; Nichol & Dhariwal 2021) for a
    backbone with 2·C output channels (the second half, the learned variance, is unused here):
    c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1), c_noise = M − 1 − j(σ), where j(σ) is the index of the level
    nearest to σ in the discrete table ``u`` built from the cosine ᾱ schedule (Table 1, "Time steps")."""

    def __init__(self, backbone: nn.Module, C_1: float = 0.001, C_2: float = 0.008, M: int = 1000):
        super().__init__(backbone)
        self.C_1, self.C_2, self.M = float(C_1), float(C_2), int(M)
        u = torch.zeros(M + 1)
        for j in range(M, 0, -1):  # u_{j−1} = √((u_j² + 1) / max(ᾱ_{j−1}/ᾱ_j, C_1) − 1), u_M = 0
            u[j - 1] = ((u[j] ** 2 + 1) / (self.alpha_bar(j - 1) / self.alpha_bar(j)).clip(min=C_1) - 1).sqrt()
        self.register_buffer("u", u)
        self.sigma_min, self.sigma_max = float(u[M - 1]), float(u[0])

    def alpha_bar(self, j):
        """ᾱ_j = sin²(½π·j / (M·(C_2 + 1))): the cosine schedule, indexed from pure noise (j = 0)
        (Nichol & Dhariwal 2021, cosine schedule; Karras et al. 2022, Table 1)."""
        j = torch.as_tensor(j)
        return (0.5 * math.pi * j / self.M / (self.C_2 + 1)).sin() ** 2

    def round_index(self, sigma: torch.Tensor) -> torch.Tensor:
        """Index of the table level nearest to each σ."""
        d = torch.cdist(sigma.to(self.u.device, torch.float32).reshape(1, -1, 1), self.u.reshape(1, -1, 1))
        return d.argmin(2).reshape(sigma.shape)

    def coefficients(self, sigma: torch.Tensor):
        c_noise = self.M - 1 - self.round_index(sigma).to(torch.float32)
        return torch.ones_like(sigma), -sigma, 1 / (sigma ** 2 + 1).sqrt(), c_noise

    def _denoise(self, x, sigma, labels, w):
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(sigma))
        F_x = self.backbone((c_in * x).to(x.dtype), c_noise.flatten(), class_labels=labels, w=w)
        return c_skip * x + c_out * F_x[:, : self.img_channels].to(torch.float32)


PRECONDITIONERS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond,
                   "iDDPMPrecond": IDDPMPrecond}

__all__ = ["IDDPMPrecond", "PRECONDITIONERS", "VEPrecond", "VPPrecond"]
