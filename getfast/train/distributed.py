"""Processes and devices: the torchrun process group, the device a command uses (the one rule for
``--device``, sampling's and training's), TF32 on CUDA, rank-0 decisions every rank shares, and the module under
its DDP / ``torch.compile`` wrappers."""
from __future__ import annotations

import contextlib
import os

import torch
import torch.distributed as dist
from torch import nn

from getfast.options import flag


def dist_info() -> tuple[int, int]:
    """(rank, world size); (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``auto`` | ``cpu`` | ``cuda`` | ``cuda:N`` → a device that exists here (ValueError naming it otherwise)."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{flag('device')} must be auto, cpu, cuda or cuda:N, got {name!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{flag('device')} must be auto, cpu, cuda or cuda:N, got {name!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            # The callers' valid choices differ (sampling takes auto, the benchmarks do not): name none.
            raise ValueError(f"{flag('device')} {name!r}: no CUDA device is visible on this machine "
                             f"(torch.cuda.is_available() is False)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{flag('device')} {name!r}: this machine has {torch.cuda.device_count()} "
                             f"CUDA device(s)")
        if dev.index is None:
            dev = torch.device("cuda", torch.cuda.current_device())
    return dev


def agree(fn, rank: int, world: int):
    """Run ``fn`` on rank 0 and raise its ``ValueError``/``OSError`` on every rank (so no rank waits forever)."""
    msg = None
    if rank == 0:
        try:
            fn()
        except (ValueError, OSError) as e:
            if world == 1:
                raise
            msg = (type(e), str(e))
    if world > 1:
        box = [msg]
        dist.broadcast_object_list(box, src=0)
        msg = box[0]
    if msg is not None:
        raise msg[0](msg[1])


def unwrap(m: nn.Module) -> nn.Module:
    """The module inside its DDP and ``torch.compile`` wrappers (what is checkpointed and exported)."""
    m = getattr(m, "module", m)  # DDP
    return getattr(m, "_orig_mod", m)  # torch.compile


@contextlib.contextmanager
def tf32(device: torch.device, on: bool):
    """TF32 tensor cores for float32 matmuls/convolutions on CUDA (about 8x the float32 rate on A100/H100, with
    a 10-bit mantissa in the products); the previous settings come back afterwards."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(on)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old
