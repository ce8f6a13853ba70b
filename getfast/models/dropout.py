"""Dropout switches for the copies of a teacher that distillation trains.

An imported EDM teacher keeps its training dropout (0.13 in EDM's CIFAR-10 DDPM++ networks). The official
distillation codes decide per network and per phase whether that dropout is active:

* SiD (mingyuanzhou/SiD, ``training/sid_training_loop.py``, the loop body): the generator's samples for the
  fake-score update are drawn with ``G_ddp`` in eval mode, and the fake score inside the generator loss runs
  in eval mode (``fake_score_ddp.eval()`` before the generator phase); each network is in train mode only in
  its own update.
* GDD (Zyriix/GDD, ``train.sh``: ``--dropout=0`` in every run) builds the generator with dropout 0.

:func:`eval_mode` and :func:`set_dropout` are the two tools for this.
"""
from __future__ import annotations

import contextlib

from torch import nn

__all__ = ["eval_mode", "set_dropout"]


@contextlib.contextmanager
def eval_mode(*modules: nn.Module):
    """Put ``modules`` in eval mode (dropout off) for the block, then restore each submodule's own mode."""
    saved = [(m, m.training) for module in modules for m in module.modules()]
    for module in modules:
        module.eval()
    try:
        yield
    finally:
        for m, training in saved:
            m.training = training


def set_dropout(module: nn.Module, p: float) -> int:
    """Set every dropout probability inside ``module`` to ``p``: ``nn.Dropout`` layers (diffusers UNets) and the
    float ``dropout`` attribute of getfast's and imported EDM residual blocks (they call ``F.dropout`` with it).
    Returns the number of submodules changed."""
    n = 0
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd):
            m.p = float(p)
            n += 1
        elif isinstance(getattr(m, "dropout", None), float) and not isinstance(getattr(m, "dropout"), bool):
            m.dropout = float(p)
            n += 1
    return n
