"""The product of a run: the EMA weights of its newest good checkpoint, saved as safetensors with the
method's metadata; and the way back in, a run started from an exported product (``--warm-start``)."""
from __future__ import annotations

from pathlib import Path

import torch.distributed as dist
from torch import nn

from getfast.io import atomic_write_bytes
from getfast.train.checkpoint import load_ema
from getfast.train.distributed import dist_info, unwrap
from getfast.train.run_dir import run_lock


def save_weights(module_or_state, path, metadata: dict[str, str]) -> Path:
    """Write a module's weights (or a state dict) as safetensors with ``metadata``, atomically, mode 0644:
    exported weights are meant to be shared, like any other file the user makes. The file carries a sha256 of
    its weights that every loader checks (:mod:`getfast.weights`)."""
    from getfast.weights import weights_bytes
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    return atomic_write_bytes(path, weights_bytes(state, metadata), mode=0o644)


def export_product(method, cfg) -> Path | None:
    """Load the EMA of the newest good checkpoint in ``cfg.out`` into the method's product module and save it as
    ``cfg.out/<method.product>`` with ``method.product_metadata()``. Rank 0 writes; returns the path there,
    None on the other ranks."""
    rank, world = dist_info()
    path = Path(cfg.out) / method.product
    if rank == 0:
        with run_lock(Path(cfg.out)):
            state, _ = load_ema(cfg.out)
            product = unwrap(method.modules[method.ema_module])
            product.load_state_dict(state)
            save_weights(product, path, method.product_metadata())
    if world > 1:
        dist.barrier()
    return path if rank == 0 else None


def warm_start(method, path) -> dict:
    """The weights of an exported student at ``path`` (checksummed), checked to fit the method's product module
    tensor by tensor: ``ValueError`` naming the file and what differs, before any work. Returns the state."""
    from getfast.weights import check_fits, read_weights
    if not Path(path).is_file():
        raise ValueError(f"warm_start (--warm-start): {path} is not a file (an exported student .safetensors)")
    state, _ = read_weights(path)
    check_fits(unwrap(method.modules[method.ema_module]), state, path, what="the student this run trains")
    return state
