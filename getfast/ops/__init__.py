"""Fused ops (DESIGN.md, "Kernels: one op, four backends, one contract").

Each op lives in its own module ``<name>_op.py`` (the suffix keeps the module name distinct
from the function it exports) and is exported here lazily: to add one, append a line to
``_EXPORTS`` mapping the public name to ``"module:attribute"``. Importing ``getfast.ops``
itself registers nothing; touching an op (or importing its module) registers its
``torch.ops.getfast.*`` custom op.
"""
from __future__ import annotations

import importlib

from ._framework import (  # noqa: F401  (re-exported contract)
    BACKENDS,
    available_backends,
    build_info,
    check_tensor,
    load_C,
    select_backend,
)

_EXPORTS: dict[str, str] = {
    "sim_loss": "sim_loss_op:sim_loss",
    "sim_loss_reference": "sim_loss_op:sim_loss_reference",
    "attention": "attention_op:attention",
    # The DEQ solver ops (getfast.ops.anderson / getfast.ops.broyden) are used through getfast.deq.
}


def __getattr__(name: str):
    target = _EXPORTS.get(name)
    if target is None:
        raise AttributeError(f"module 'getfast.ops' has no attribute {name!r}")
    mod_name, attr = target.split(":")
    value = getattr(importlib.import_module(f"{__name__}.{mod_name}"), attr)
    globals()[name] = value
    return value


def __dir__():
    return sorted(list(globals()) + list(_EXPORTS))


__all__ = ["BACKENDS", "available_backends", "build_info", "check_tensor", "load_C", "select_backend", *_EXPORTS]

