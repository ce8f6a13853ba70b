"""getfast: distil diffusion models into one-step generators, with fused kernels.

Subpackages are imported lazily (``getfast.ops``, ``getfast.models``, ...), so
``import getfast`` stays cheap and does not import torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_SUBMODULES = ("ops", "deq", "models", "diffusion", "data", "methods", "train", "metrics", "cli", "kernels",
               "teacher", "sampling", "demo", "cards")


def __getattr__(name: str):
    if name in _SUBMODULES:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module 'getfast' has no attribute {name!r}")


def __dir__():
    return sorted(list(globals()) + list(_SUBMODULES))
