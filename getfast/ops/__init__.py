"""Fused ops: one folder per op (``naive.py``, the plain-PyTorch reference; ``__init__.py``, its
declarative spec, the launchers binding ``getfast.kernels`` (Triton) and ``getfast._C`` (C++/CUDA),
and the public function), all defined through :func:`~getfast.ops._framework.define_op`.

``attention`` (``flash_attention/``), ``sim_loss`` (``sim/``) and the DEQ solver steps
(``anderson/``, ``broyden/``, used through :mod:`getfast.deq`). :func:`describe` prints each op's
default backend per device and why.
"""
from . import anderson, broyden
from ._framework import BACKENDS, DEFAULTS, OPS, acc_dtype, build_info, describe, load_C
from .flash_attention import attention
from .sim import sim_loss, sim_loss_reference

__all__ = ["BACKENDS", "DEFAULTS", "OPS", "acc_dtype", "anderson", "attention", "broyden", "build_info", "describe",
           "load_C", "sim_loss", "sim_loss_reference"]
