"""VP and VE preconditioning (Karras et al. 2022, Table 1, columns "VP" and "VE"), for teachers trained
with those formulations (EDM's ``VPPrecond``/``VEPrecond`` checkpoints).

Both reuse ``EDMPrecond``'s forward (labels, classifier-free guidance, dtype handling) and change only the
four coefficients of D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise):

* VP (Song et al. 2021): c_skip = 1, c_out = −σ, c_in = 1/√(σ²+1), c_noise = (M−1)·t(σ), where t(σ) inverts
  σ(t) = √(exp(½β_d t² + β_min t) − 1).
* VE (Song et al. 2021): c_skip = 1, c_out = σ, c_in = 1, c_noise = ln(σ/2).
"""
from __future__ import annotations

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


PRECONDITIONERS = {"EDMPrecond": EDMPrecond, "VPPrecond": VPPrecond, "VEPrecond": VEPrecond}

__all__ = ["PRECONDITIONERS", "VEPrecond", "VPPrecond"]
