"""ViT baseline one-step generator: noise → image in one pass.

The baseline of Geng et al. 2023 (arXiv 2401.08639, Sec. 4): a DiT-style pre-LN transformer
(Peebles & Xie 2023) without timestep conditioning — patch embedding plus frozen 2-D sin-cos
position embedding, ``depth`` blocks, a zero-initialised decoder and unpatchify. Class
conditioning, when used, adds a class embedding to every block's ``qkv`` (as GET does).

``CONFIGS`` maps names to :class:`ViTConfig`; :func:`build` makes a model.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from getfast.models.layers import (
    Block,
    FinalLayer,
    init_transformer_,
    setup_patch_io,
    unpatchify,
)

__all__ = ["ViTConfig", "ViT", "CONFIGS", "build"]


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """ViT generator hyper-parameters (unknown fields passed to :func:`build` raise ``TypeError``)."""

    width: int
    depth: int
    heads: int
    patch_size: int = 2
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    null_class: bool = False  # extra "no class" embedding for classifier-free guidance
    grad_checkpoint: bool = False  # recompute each block in backward


def _family(prefix: str, width: int, depth: int, heads: int, patches=(2, 4, 8)) -> dict[str, ViTConfig]:
    return {f"{prefix}/{p}": ViTConfig(width=width, depth=depth, heads=heads, patch_size=p) for p in patches}


CONFIGS: dict[str, ViTConfig] = {
    **_family("ViT-S", 384, 12, 6),
    **_family("ViT-B", 768, 12, 12),
    **_family("ViT-L", 1024, 24, 16),
    **_family("ViT-XL", 1152, 28, 16),
    # small configs for two CPU cores (28×28 or 32×32 inputs)
    **_family("ViT-N", 128, 8, 4, patches=(2, 4)),
    # GET's claim (arXiv 2401.08639, Sec. 5) at 28×28×1, 10 classes, patch 2, against GET-N/2 (1.17M params):
    "ViT-N6/2": ViTConfig(width=128, depth=6, heads=4, patch_size=2),   # 1.22M: GET-N/2's size (1.04×)
    "ViT-N5x/2": ViTConfig(width=256, depth=7, heads=4, patch_size=2),  # 5.59M: ≈ 5× GET-N/2 (4.78×)
    # the capacity regime at 16×16×1 (issue 26) against GET-P/2 (0.29M params at 16×16×1, unconditional):
    "ViT-P6/2": ViTConfig(width=64, depth=6, heads=4, patch_size=2),    # 0.30M: GET-P/2's size (1.05×)
    "ViT-P5x/2": ViTConfig(width=144, depth=6, heads=4, patch_size=2),  # 1.52M: ≈ 5× GET-P/2 (5.2×)
}


class ViT(nn.Module):
    """One-pass transformer generator. ``forward(x_noise, class_labels=None) -> (B, C, H, W)``."""

    def __init__(self, img_resolution: int, in_channels: int, num_classes: int = 0, config: ViTConfig = CONFIGS["ViT-S/2"]):
        super().__init__()
        cfg = config
        D = setup_patch_io(self, img_resolution, in_channels, num_classes, cfg)
        self.blocks = nn.ModuleList(Block(D, cfg.heads, cfg.mlp_ratio, cfg.qkv_bias) for _ in range(cfg.depth))
        self.final_layer = FinalLayer(D, cfg.patch_size, self.out_channels)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_transformer_(self)

    def _class_offset(self, class_labels, batch: int):
        if self.class_embed is None:
            if class_labels is not None and class_labels.numel() > 0:
                raise ValueError("class_labels: given to an unconditional model (num_classes=0)")
            return None
        return self.class_embed(class_labels, batch)

    def forward(self, x_noise: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        """Map noise ``(B, C, H, W)`` (and optional labels: ``(B,)`` ints or ``(B, K)`` one-hot) to an image."""
        if x_noise.dim() != 4 or x_noise.shape[1] != self.in_channels or tuple(x_noise.shape[2:]) != self.img_resolution:
            raise ValueError(
                f"x_noise: expected (B, {self.in_channels}, {self.img_resolution[0]}, {self.img_resolution[1]}), "
                f"got {tuple(x_noise.shape)}"
            )
        B = x_noise.shape[0]
        x = self.patch_embed(x_noise) + self.pos_embed
        c = self._class_offset(class_labels, B)
        for blk in self.blocks:
            if self.config.grad_checkpoint and torch.is_grad_enabled():
                x = checkpoint(blk, x, c, use_reentrant=False)
            else:
                x = blk(x, c)
        x = self.final_layer(x)
        return unpatchify(x, self.patch_size, self.out_channels, *self.grid)


def build(name: str, img_resolution: int = 32, in_channels: int = 3, num_classes: int = 0, **kw) -> ViT:
    """Build the named ViT generator; ``kw`` overrides :class:`ViTConfig` fields (unknown → ``TypeError``)."""
    if name not in CONFIGS:
        raise ValueError(f"unknown ViT model {name!r}; known: {', '.join(CONFIGS)}")
    cfg = dataclasses.replace(CONFIGS[name], **kw)
    return ViT(img_resolution, in_channels, num_classes=num_classes, config=cfg)
