"""CuPy/NVRTC runtime path for the CUDA sources of ops whose spec sets ``cupy=True``.

When ``getfast._C`` was built without CUDA (a wheel built on a CPU-only machine) and a GPU is
present, the same ``csrc/cuda/<family>.cu`` is compiled at first use with ``cupy.RawModule``
(device code there is NVRTC-clean: host code under ``#ifndef __CUDACC_RTC__``, ``extern "C"``
kernels). Every CuPy use is guarded: without a driver ``import cupy`` works but each call raises.
"""
from __future__ import annotations

import importlib
import os
from pathlib import Path

import torch

_modules: dict = {}


def unavailable_reason() -> str | None:
    """``None`` when the CuPy path can run, else why not (never raises)."""
    if os.environ.get("GETFAST_DISABLE_CUPY", "0") not in ("", "0"):
        return "disabled by GETFAST_DISABLE_CUPY"
    try:
        cp = importlib.import_module("cupy")
    except Exception as exc:  # ImportError, or a broken install raising anything
        return f"cupy is not importable ({type(exc).__name__}: {exc}); install the extra: pip install 'getfast[cuda]'"
    try:
        n = int(cp.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError without a driver
        return f"cupy sees no CUDA driver/device ({type(exc).__name__}: {exc})"
    return None if n and torch.cuda.is_available() else "no CUDA device is visible"


def source_path(family: str) -> Path:
    """``<family>.cu`` from $GETFAST_CUDA_SRC, the wheel's ``getfast/_cuda_src`` or the checkout."""
    here = Path(__file__).resolve().parent
    dirs = [Path(p) for p in [os.environ.get("GETFAST_CUDA_SRC")] if p]
    dirs += [here.parent / "_cuda_src", here.parent.parent / "csrc" / "cuda"]
    for d in dirs:
        if (d / f"{family}.cu").is_file():
            return d / f"{family}.cu"
    raise RuntimeError(f"CUDA source {family}.cu not found (looked in: {', '.join(map(str, dirs))}); "
                       "set GETFAST_CUDA_SRC to the folder holding csrc/cuda/*.cu")


def launch(family: str, name: str, grid, block, args, *, device: torch.device) -> None:
    """Launch kernel ``name`` of ``<family>.cu`` (a template instantiation such as
    ``getfast::sim_loss_fwd<float, float>``) on torch's current stream of ``device``; ``args``
    holds tensors (passed as pointers) and numpy scalars matching the kernel signature."""
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"CuPy JIT path for CUDA kernels '{family}' unavailable: {why}")
    import cupy as cp
    import numpy as np

    index = device.index if device.index is not None else torch.cuda.current_device()
    mod = _modules.get((family, name, index))
    try:
        if mod is None:
            src = source_path(family)
            with cp.cuda.Device(index):
                mod = cp.RawModule(code=src.read_text(), options=("--std=c++17", f"-I{src.parent}"), backend="nvrtc",
                                   name_expressions=(name,))
                mod.compile()
            _modules[(family, name, index)] = mod
        conv = tuple(np.uint64(a.data_ptr()) if isinstance(a, torch.Tensor) else a for a in args)
        with cp.cuda.Device(index):
            stream = cp.cuda.ExternalStream(torch.cuda.current_stream(device).cuda_stream)
            mod.get_function(name)(tuple(grid), tuple(block), conv, stream=stream)
    except Exception as exc:
        raise RuntimeError(f"{family}.{name} through CuPy/NVRTC failed: {exc}") from exc
