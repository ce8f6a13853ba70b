"""CuPy/NVRTC runtime path for the CUDA backend.

When ``getfast._C`` was built without CUDA (e.g. a wheel built on a CPU-only machine) and a GPU
is present, the ``cuda`` backend compiles the same ``csrc/cuda/<family>.cu`` source at first use
with ``cupy.RawModule`` (NVRTC) and caches the module per (family, device, options). The device
code of every ``.cu`` file is therefore NVRTC-clean: host code sits under
``#ifndef __CUDACC_RTC__`` and kernels are ``extern "C"`` so their names are unmangled.

Every CuPy use is guarded: on a machine without a driver ``import cupy`` succeeds but each
array op raises, so :func:`unavailable_reason` probes the runtime and every failure becomes a
``RuntimeError`` that says what is missing.
"""
from __future__ import annotations

import importlib
import os
import threading
from pathlib import Path

import torch

__all__ = ["unavailable_reason", "is_available", "source_path", "get_kernel", "launch"]

_HERE = Path(__file__).resolve().parent
_lock = threading.Lock()
_modules: dict = {}


def _import_cupy():
    try:
        return importlib.import_module("cupy"), None
    except Exception as exc:  # ImportError, or a broken install raising anything
        return None, f"cupy is not importable ({type(exc).__name__}: {exc}); install the extra: pip install 'getfast[cuda]'"


def unavailable_reason() -> str | None:
    """``None`` when the CuPy JIT path can run, else why not (never raises)."""
    if os.environ.get("GETFAST_DISABLE_CUPY", "0") not in ("", "0"):
        return "disabled by GETFAST_DISABLE_CUPY"
    cp, why = _import_cupy()
    if cp is None:
        return why
    try:
        n = int(cp.cuda.runtime.getDeviceCount())
    except Exception as exc:  # CUDARuntimeError without a driver
        return f"cupy sees no CUDA driver/device ({type(exc).__name__}: {exc})"
    if n == 0:
        return "cupy sees no CUDA device"
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return None


def is_available() -> bool:
    return unavailable_reason() is None


def source_path(family: str) -> Path:
    """Locate ``<family>.cu``: $GETFAST_CUDA_SRC, the wheel's ``getfast/_cuda_src``, the repo's csrc/cuda."""
    candidates = []
    env = os.environ.get("GETFAST_CUDA_SRC")
    if env:
        candidates.append(Path(env))
    candidates.append(_HERE.parent / "_cuda_src")  # installed wheel (CMake install(FILES ...))
    candidates.append(_HERE.parent.parent / "csrc" / "cuda")  # development checkout
    try:  # editable installs keep CMake-installed files in site-packages
        import getfast._C as _C_mod  # noqa: F401

        candidates.append(Path(_C_mod.__file__).resolve().parent / "_cuda_src")
    except Exception:
        pass
    for d in candidates:
        p = d / f"{family}.cu"
        if p.is_file():
            return p
    raise RuntimeError(
        f"CUDA source for kernel family {family!r} not found (looked in: "
        + ", ".join(str(c) for c in candidates)
        + "); set GETFAST_CUDA_SRC to the folder holding csrc/cuda/*.cu"
    )


def _compile(cp, family: str, device_index: int, options: tuple[str, ...]):
    src_file = source_path(family)
    code = src_file.read_text()
    opts = ("--std=c++17", f"-I{src_file.parent}", *options)
    with cp.cuda.Device(device_index):
        mod = cp.RawModule(code=code, options=opts, backend="nvrtc")
        mod.compile()
    return mod


def get_kernel(family: str, name: str, device_index: int = 0, options: tuple[str, ...] = ()):
    """The ``extern "C"`` kernel ``name`` from ``csrc/cuda/<family>.cu``, compiled once per device.

    Raises ``RuntimeError`` with the reason when CuPy or a GPU is missing or NVRTC fails.
    """
    why = unavailable_reason()
    if why is not None:
        raise RuntimeError(f"CuPy JIT path for CUDA kernels '{family}' unavailable: {why}")
    cp, _ = _import_cupy()
    key = (family, device_index, tuple(options))
    with _lock:
        mod = _modules.get(key)
        if mod is None:
            try:
                mod = _compile(cp, family, device_index, tuple(options))
            except Exception as exc:
                raise RuntimeError(f"NVRTC compilation of {family}.cu failed: {exc}") from exc
            _modules[key] = mod
    try:
        return mod.get_function(name)
    except Exception as exc:
        raise RuntimeError(f"kernel {name!r} not found in {family}.cu: {exc}") from exc


def launch(family: str, name: str, grid, block, args, *, device: torch.device, shared_mem: int = 0,
           options: tuple[str, ...] = ()) -> None:
    """Launch ``name`` on torch's current stream of ``device``.

    ``args`` holds tensors (passed as device pointers) and numpy scalars (``numpy.int64``,
    ``numpy.float32``/``float64``) matching the kernel signature exactly.
    """
    import numpy as np

    dev_index = device.index if device.index is not None else torch.cuda.current_device()
    kern = get_kernel(family, name, dev_index, options)
    cp, _ = _import_cupy()
    conv = []
    for a in args:
        if isinstance(a, torch.Tensor):
            conv.append(np.uint64(a.data_ptr()))
        else:
            conv.append(a)
    stream_ptr = int(torch.cuda.current_stream(device).cuda_stream)
    try:
        with cp.cuda.Device(dev_index):
            stream = cp.cuda.ExternalStream(stream_ptr)
            kern(tuple(grid), tuple(block), tuple(conv), stream=stream, shared_mem=shared_mem)
    except Exception as exc:
        raise RuntimeError(f"launching {family}.{name} through CuPy failed: {exc}") from exc
