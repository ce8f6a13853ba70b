"""Model registry: ``create(name, img_resolution, in_channels, num_classes)``.

UNet-* (and the NVlabs/edm architectures of imported checkpoints) are EDM backbones: wrap them with
``getfast.diffusion.EDMPrecond``. GET-* and ViT-* are one-step students that map noise to images directly.
"""
from __future__ import annotations

import dataclasses

from torch import nn

from getfast.diffusion.precond import EDMPrecond
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


def teacher_models() -> list[str]:
    """Registered models that can be a teacher: EDM backbones F(x; c_noise, labels), not one-step students."""
    return [m for m in known_models() if m not in get.CONFIGS and m not in vit.CONFIGS]


def check_teacher_model(model) -> str:
    """``model`` if it names an EDM backbone, else ``ValueError`` saying which models can be teachers."""
    if model not in teacher_models():
        student = model in get.CONFIGS or model in vit.CONFIGS
        why = (f"{model!r} is a one-step student (distil it with `getfast distill get --model {model}`)"
               if student else f"unknown model {model!r}")
        raise ValueError(f"model (--model): {why}; a teacher is an EDM denoiser backbone, one of: "
                         f"{', '.join(teacher_models())}")
    return model


def build_denoiser(model: str, resolution: int, channels: int, num_classes: int, **overrides) -> EDMPrecond:
    """An EDM denoiser (Karras et al. 2022, Eq. 7) over the named backbone. It never drops class labels (a teacher's
    label dropout belongs to its training step), so every copy of it is a deterministic function of its inputs."""
    check_teacher_model(model)
    backbone = create(model, img_resolution=resolution, in_channels=channels, num_classes=num_classes, **overrides)
    return EDMPrecond(backbone)


__all__ = ["FAMILIES", "UNet", "UNetConfig", "UNET_CONFIGS", "build_denoiser", "check_teacher_model", "create",
           "known_models", "teacher_models"]
