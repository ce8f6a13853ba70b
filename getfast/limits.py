"""Sizes checked before anything is allocated or computed.

A request that cannot fit (a billion samples, a 100,000-pixel resolution, a batch of 10^8) is one line naming
the option, said at once, and not an allocator's traceback after minutes of work. The bounds on seeds, class
counts and resolutions are what the code below them can represent (seeds are combined with sample indices in
64-bit generators; class counts and resolutions size embedding tables and images).
"""
from __future__ import annotations

import os

__all__ = ["MAX_SEED", "MAX_CLASSES", "MAX_RESOLUTION", "available_memory", "check_fits", "fmt_bytes"]

MAX_SEED = 2**31 - 1        # make-pairs uses seed·2³² + i and the loop seed·1,000,003 + epoch: both stay < 2⁶³
MAX_CLASSES = 100_000       # class labels index a one-hot/embedding table of this many rows
MAX_RESOLUTION = 4096       # pixels per side of a generated or trained image


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if abs(n) < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"


def available_memory(device="cpu") -> int | None:
    """Bytes that can still be allocated on ``device`` (CPU: the kernel's MemAvailable; CUDA: free device
    memory), or None when it cannot be told."""
    dev = str(device)
    if dev.startswith("cuda"):
        import torch
        if not torch.cuda.is_available():
            return None
        try:
            return int(torch.cuda.mem_get_info(torch.device(dev))[0])
        except (RuntimeError, ValueError):
            return None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return None


def check_fits(nbytes: float, what: str, device="cpu", hint: str = "") -> None:
    """``ValueError`` "<what> needs X of memory, Y is available[; hint]" when ``nbytes`` exceeds what ``device``
    has free. ``what`` names the option at fault (``n (--n) = 1000000000``)."""
    avail = available_memory(device)
    if avail is None or nbytes <= avail:
        return
    where = "GPU memory" if str(device).startswith("cuda") else "memory"
    raise ValueError(f"{what} needs {fmt_bytes(nbytes)} of {where} and {fmt_bytes(avail)} is available"
                     + (f"; {hint}" if hint else ""))
