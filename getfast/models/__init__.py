"""Model registry: ``create(name, img_resolution, in_channels, num_classes)``.

UNet-* (and the NVlabs/edm architectures of imported checkpoints) are EDM backbones: wrap them with
``getfast.diffusion.EDMPrecond``. GET-* and ViT-* are one-step students that map noise to images directly.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from getfast.models import edm_unets, get, vit
from getfast.models.unet import UNET_CONFIGS, UNet, UNetConfig


def _build_unet(name: str, img_resolution: int, in_channels: int, num_classes: int = 0, **overrides) -> UNet:
    cfg = dataclasses.replace(UNET_CONFIGS[name], **overrides)
    return UNet(img_resolution, in_channels, num_classes=num_classes, config=cfg)


# family -> (named configs, builder(name, img_resolution, in_channels, num_classes, **overrides))
FAMILIES = {"UNet": (UNET_CONFIGS, _build_unet), "GET": (get.CONFIGS, get.build), "ViT": (vit.CONFIGS, vit.build),
            "EDM": (edm_unets.CONFIGS, edm_unets.build)}  # EDM: NVlabs/edm architectures (imported checkpoints)


def known_models() -> list[str]:
    return sorted(name for configs, _ in FAMILIES.values() for name in configs)


def create(name: str, img_resolution: int = 32, in_channels: int = 3, num_classes: int = 0, **overrides) -> nn.Module:
    """Build a named model. ``overrides`` replace fields of its config (unknown fields raise TypeError)."""
    for configs, build in FAMILIES.values():
        if name in configs:
            return build(name, img_resolution=img_resolution, in_channels=in_channels, num_classes=num_classes,
                         **overrides)
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(known_models())}")


__all__ = ["FAMILIES", "UNet", "UNetConfig", "UNET_CONFIGS", "create", "known_models"]
