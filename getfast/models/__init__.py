"""Model registry: ``create(name, img_resolution, in_channels, num_classes)``.

UNet-* are EDM backbones (wrap them with ``getfast.diffusion.EDMPrecond``); GET-* and ViT-* are
one-step students that map noise to images directly.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from getfast.models.unet import UNET_CONFIGS, UNet, UNetConfig


def _families():
    fams = {"UNet": (UNET_CONFIGS, None)}
    try:
        from getfast.models import get as _get
        fams["GET"] = (_get.CONFIGS, _get.build)
    except ImportError:  # pragma: no cover - module always ships; guard keeps the UNet usable mid-refactor
        pass
    try:
        from getfast.models import vit as _vit
        fams["ViT"] = (_vit.CONFIGS, _vit.build)
    except ImportError:  # pragma: no cover
        pass
    from getfast.models import edm_unets as _edm  # NVlabs/edm architectures (imported checkpoints)
    fams["EDM"] = (_edm.CONFIGS, _edm.build)
    return fams


def known_models() -> list[str]:
    return sorted(name for configs, _ in _families().values() for name in configs)


def create(name: str, img_resolution: int = 32, in_channels: int = 3, num_classes: int = 0, **overrides) -> nn.Module:
    """Build a named model. ``overrides`` replace fields of its config (unknown fields raise TypeError)."""
    for family, (configs, build) in _families().items():
        if name in configs:
            if build is not None:
                return build(name, img_resolution=img_resolution, in_channels=in_channels,
                             num_classes=num_classes, **overrides)
            cfg = dataclasses.replace(configs[name], **overrides)
            return UNet(img_resolution, in_channels, num_classes=num_classes, config=cfg)
    raise ValueError(f"unknown model {name!r}; known models: {', '.join(known_models())}")


__all__ = ["UNet", "UNetConfig", "UNET_CONFIGS", "create", "known_models"]
