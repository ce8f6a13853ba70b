"""EDM preconditioning (Karras et al. 2022, Table 1 / Eq. 7): D(x; σ) = c_skip·x + c_out·F(c_in·x; c_noise)."""
from __future__ import annotations

import torch
from torch import nn


class EDMPrecond(nn.Module):
    """Wraps a backbone ``F(x, c_noise, class_labels, w)`` into the EDM denoiser ``D(x, sigma, ...)``.

    ``D`` is a deterministic function of (x, σ, label) in training mode too: label dropout, which trains
    the unconditional branch used by classifier-free guidance, is applied by the training method to the
    labels it passes (label −1 means "no class"), never inside the network, so a copy of a teacher (a
    distillation student) does not inherit it.
    """

    def __init__(self, backbone: nn.Module, sigma_data: float = 0.5):
        super().__init__()
        self.backbone = backbone
        self.sigma_data = sigma_data        # std of the data; 0.5 for images in [-1, 1] (EDM)
        self.num_classes = getattr(backbone, "num_classes", 0)
        self.img_resolution = backbone.img_resolution
        self.img_channels = backbone.in_channels

    def coefficients(self, sigma: torch.Tensor):
        sd = self.sigma_data
        c_skip = sd**2 / (sigma**2 + sd**2)
        c_out = sigma * sd / (sigma**2 + sd**2).sqrt()
        c_in = 1 / (sd**2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def one_hot(self, class_labels, batch, device):
        """Integer labels (or None) -> one-hot float rows; label -1 or None means "no class" (zeros)."""
        if not self.num_classes:
            return None
        if class_labels is None:
            return torch.zeros(batch, self.num_classes, device=device)
        if class_labels.dtype.is_floating_point:
            return class_labels.to(device)
        valid = (class_labels >= 0).unsqueeze(1)
        oh = torch.nn.functional.one_hot(class_labels.clamp(min=0), self.num_classes).float()
        return oh * valid

    def forward(self, x, sigma, class_labels=None, cfg_scale=None, w=None):
        """D(x; σ, class). With ``cfg_scale`` w: (1+w)·D(x|c) − w·D(x|∅) (Ho & Salimans 2022, Eq. 6)."""
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1:
            sigma = sigma.expand(x.shape[0])
        labels = self.one_hot(class_labels, x.shape[0], x.device)
        if cfg_scale is not None and labels is not None:
            both = self._denoise(torch.cat([x, x]), torch.cat([sigma, sigma]),
                                 torch.cat([labels, torch.zeros_like(labels)]), None if w is None else torch.cat([w, w]))
            d_c, d_u = both.chunk(2)
            return d_c + cfg_scale * (d_c - d_u)
        return self._denoise(x, sigma, labels, w)

    def _denoise(self, x, sigma, labels, w):
        c_skip, c_out, c_in, c_noise = (c.reshape(-1, 1, 1, 1) for c in self.coefficients(sigma))
        F_x = self.backbone((c_in * x).to(x.dtype), c_noise.flatten(), class_labels=labels, w=w)
        return c_skip * x + c_out * F_x.to(torch.float32)
