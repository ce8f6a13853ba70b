"""Teachers users already have: NVlabs/edm pickles and diffusers ``UNet2DModel`` pipelines, loaded as getfast
denoisers D(x; σ, class_labels) with ``.meta``, and ``convert`` to write them as getfast teacher files."""
from __future__ import annotations

from getfast.importers.convert import ConvertConfig, build_denoiser_from_meta, convert
from getfast.importers.edm import UnsafePickleError, load_edm_pickle


def load_diffusers(path, device="cpu"):
    """A diffusers ``UNet2DModel`` + scheduler folder as an EDM-style denoiser (needs ``getfast[diffusers]``)."""
    from getfast.importers.hf_diffusers import load_diffusers as _load
    return _load(path, device=device)


def is_diffusers_dir(path) -> bool:
    """Whether ``path`` looks like a diffusers pipeline or UNet2DModel folder (no diffusers import needed)."""
    from getfast.importers.hf_diffusers import is_diffusers_dir as _is
    return _is(path)


__all__ = ["ConvertConfig", "UnsafePickleError", "build_denoiser_from_meta", "convert", "is_diffusers_dir",
           "load_diffusers", "load_edm_pickle"]
