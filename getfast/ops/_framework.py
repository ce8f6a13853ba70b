"""The op contract shared by every fused op in getfast (DESIGN.md, "Kernels").

Each op ``getfast::<name>`` has up to four backends:

``reference``  plain PyTorch, any device; the ground truth in tests.
``triton``     ``kernels/<family>.py`` (importable as ``getfast.kernels``); CUDA tensors, or CPU
               tensors when ``TRITON_INTERPRET=1`` was set before the kernels were imported.
``cuda``       ``csrc/cuda/<family>.cu`` through ``getfast._C`` (built with nvcc), or — when
               ``_C`` has no CUDA — the same source JIT-compiled by CuPy/NVRTC
               (``getfast.ops._cupy``).
``cpp``        ``csrc/cpu/<family>.cpp`` through ``getfast._C``; CPU tensors.

An op declares its backends once with :func:`register_op`; at call time
:func:`select_backend` picks one: ``GETFAST_BACKEND=reference|triton|cuda|cpp`` forces a
backend (unavailable → ``RuntimeError`` saying why; never a silent fallback), otherwise CPU
tensors use ``cpp`` and CUDA tensors the op's preferred GPU backend (``triton`` or ``cuda``),
then the other, then ``reference``.

Validation helpers (:func:`check_tensor`, :func:`check_same_device`, :func:`check_scalar`)
raise ``ValueError`` naming the argument *before* any pointer reaches C++.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import shutil
import threading
import warnings
from typing import Iterable, Sequence

import torch

__all__ = [
    "BACKENDS",
    "DTYPE_CODES",
    "ENV_BACKEND",
    "OpSpec",
    "register_op",
    "get_op_spec",
    "load_C",
    "has_C",
    "cuda_compiled",
    "build_info",
    "triton_available",
    "triton_interpreting",
    "backend_unavailable_reason",
    "available_backends",
    "select_backend",
    "check_tensor",
    "check_same_device",
    "check_same_shape",
    "check_scalar",
    "current_stream_ptr",
    "dtype_code",
    "acc_dtype",
    "as_device",
]

BACKENDS: tuple[str, ...] = ("reference", "triton", "cuda", "cpp")
ENV_BACKEND = "GETFAST_BACKEND"

# dtype codes understood by every csrc/ function that takes a `dtype` argument.
DTYPE_CODES: dict[torch.dtype, int] = {
    torch.float32: 0,
    torch.float64: 1,
    torch.float16: 2,
    torch.bfloat16: 3,
}


# --------------------------------------------------------------------------------------
# op registry
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpSpec:
    """What an op implements: its backends and which GPU backend it prefers."""

    name: str
    backends: tuple[str, ...] = BACKENDS
    cuda_preference: tuple[str, ...] = ("triton", "cuda")  # first available wins on CUDA
    cpu_preference: tuple[str, ...] = ("cpp",)
    cpp_dtypes: tuple[torch.dtype, ...] | None = None  # None: anything the op accepts
    cuda_symbol: str | None = None  # a _C attribute that exists iff the CUDA backend was built
    cpp_symbol: str | None = None  # a _C attribute that exists iff the cpp backend was built
    triton_module: str | None = None  # e.g. "getfast.kernels.sim_loss"


_OPS: dict[str, OpSpec] = {}


def register_op(
    name: str,
    *,
    backends: Sequence[str] = BACKENDS,
    cuda_preference: Sequence[str] = ("triton", "cuda"),
    cpu_preference: Sequence[str] = ("cpp",),
    cuda_symbol: str | None = None,
    cpp_symbol: str | None = None,
    triton_module: str | None = None,
) -> OpSpec:
    """Declare op ``name`` (without the ``getfast::`` prefix) and the backends it implements.

    ``cuda_symbol``/``cpp_symbol`` name a ``getfast._C`` function whose presence proves the
    backend was compiled; ``triton_module`` is the module holding the Triton kernels.
    """
    bad = [b for b in backends if b not in BACKENDS]
    if bad:
        raise ValueError(f"register_op({name!r}): unknown backend(s) {bad}; known: {BACKENDS}")
    spec = OpSpec(
        name=name,
        backends=tuple(backends),
        cuda_preference=tuple(cuda_preference),
        cpu_preference=tuple(cpu_preference),
        cuda_symbol=cuda_symbol,
        cpp_symbol=cpp_symbol,
        triton_module=triton_module,
    )
    _OPS[name] = spec
    return spec


def get_op_spec(name: str) -> OpSpec:
    """The registered :class:`OpSpec` for ``name``; an unregistered op gets the defaults."""
    return _OPS.get(name) or OpSpec(name=name)


# --------------------------------------------------------------------------------------
# the native extension
# --------------------------------------------------------------------------------------
_C_lock = threading.Lock()
_C_module = None
_C_error: BaseException | None = None


def load_C(required: bool = True):
    """Import and return ``getfast._C`` (torch is imported first so one libgomp is loaded).

    With ``required=False`` returns ``None`` when the extension is missing; otherwise raises
    ``RuntimeError`` telling how to build it.
    """
    global _C_module, _C_error
    if _C_module is None and _C_error is None:
        with _C_lock:
            if _C_module is None and _C_error is None:
                try:
                    _C_module = importlib.import_module("getfast._C")
                except ImportError as exc:  # not built / wrong interpreter
                    _C_error = exc
    if _C_module is not None:
        return _C_module
    if not required:
        return None
    raise RuntimeError(
        "getfast._C (the C++/CUDA extension) is not available: "
        f"{_C_error}. Build it with `pip install --no-build-isolation -e .` (or `make test`) "
        "from the repository root, or choose GETFAST_BACKEND=reference."
    ) from _C_error


def has_C() -> bool:
    """True when ``getfast._C`` imports."""
    return load_C(required=False) is not None


_build_info_cache: dict | None = None


def build_info() -> dict:
    """``getfast._C.build_info()`` (cached; a copy), or a dict saying the extension is missing."""
    global _build_info_cache
    if _build_info_cache is None:
        C = load_C(required=False)
        if C is None:
            return {"available": False, "cuda_compiled": False, "cuda_archs": [], "openmp": False}
        _build_info_cache = dict(C.build_info())
        _build_info_cache["available"] = True
    return dict(_build_info_cache)


def cuda_compiled() -> bool:
    """True when ``_C`` contains the CUDA kernels (built with nvcc)."""
    return bool(build_info().get("cuda_compiled", False))


# --------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------
def triton_interpreting() -> bool:
    """True when ``TRITON_INTERPRET=1`` (Triton kernels then run on CPU tensors)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def triton_available() -> bool:
    """True when the ``triton`` package imports."""
    return importlib.util.find_spec("triton") is not None


# --------------------------------------------------------------------------------------
# backend selection
# --------------------------------------------------------------------------------------
def as_device(device) -> torch.device:
    """``torch.device`` from a device, a string or a tensor."""
    if isinstance(device, torch.Tensor):
        return device.device
    return torch.device(device)


def backend_unavailable_reason(op_name: str, backend: str, device) -> str | None:
    """``None`` when ``backend`` can run ``op_name`` on ``device``, else a sentence saying why."""
    dev = as_device(device)
    spec = get_op_spec(op_name)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"
    if backend not in spec.backends:
        return f"op getfast::{op_name} has no {backend!r} backend (it has: {', '.join(spec.backends)})"
    if backend == "reference":
        return None
    if backend == "cpp":
        if dev.type != "cpu":
            return f"the cpp backend runs on CPU tensors only, got device {dev}"
        C = load_C(required=False)
        if C is None:
            return f"getfast._C is not built ({_C_error})"
        if spec.cpp_symbol and not hasattr(C, spec.cpp_symbol):
            return f"getfast._C has no {spec.cpp_symbol} (rebuild the extension)"
        return None
    if backend == "triton":
        if not triton_available():
            return "the triton package is not installed"
        if dev.type == "cpu":
            if not triton_interpreting():
                return (
                    "Triton kernels run on CPU tensors only under the interpreter: set "
                    "TRITON_INTERPRET=1 before getfast.kernels is imported"
                )
            return None
        if dev.type != "cuda":
            return f"the triton backend needs CUDA tensors, got device {dev}"
        return None
    if backend == "cuda":
        if dev.type != "cuda":
            return f"the cuda backend runs on CUDA tensors only, got device {dev}"
        C = load_C(required=False)
        if C is not None and cuda_compiled() and (
            spec.cuda_symbol is None or hasattr(C, spec.cuda_symbol)
        ):
            if C.cuda_device_count() > 0:
                return None
            return "getfast._C was built with CUDA but its runtime sees no device (driver/ABI mismatch?)"
        from . import _cupy  # local import: cupy is optional

        why = _cupy.unavailable_reason()
        if why is None:
            return None
        return f"getfast._C was built without CUDA and the CuPy JIT path is unavailable: {why}"
    raise AssertionError(backend)


def available_backends(op_name: str, device, supported: Iterable[str] | None = None) -> list[str]:
    """Backends that can run ``op_name`` on ``device`` right now (in :data:`BACKENDS` order)."""
    spec = get_op_spec(op_name)
    names = tuple(supported) if supported is not None else spec.backends
    return [b for b in BACKENDS if b in names and backend_unavailable_reason(op_name, b, device) is None]


_warned: set[tuple[str, str]] = set()


def select_backend(op_name: str, device, supported: Iterable[str] | None = None) -> str:
    """The backend to run ``op_name`` on ``device``.

    ``GETFAST_BACKEND`` forces one (``RuntimeError`` if it cannot run here or the op lacks it).
    Otherwise: CPU → the op's CPU preference (``cpp``), CUDA → its GPU preference
    (``triton``/``cuda``), then ``reference``.
    """
    spec = get_op_spec(op_name)
    names = tuple(supported) if supported is not None else spec.backends
    dev = as_device(device)
    forced = os.environ.get(ENV_BACKEND, "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise RuntimeError(
                f"{ENV_BACKEND}={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}"
            )
        if forced not in names:
            raise RuntimeError(
                f"{ENV_BACKEND}={forced}: op getfast::{op_name} has no {forced!r} backend "
                f"(it has: {', '.join(names)})"
            )
        why = backend_unavailable_reason(op_name, forced, dev)
        if why is not None:
            raise RuntimeError(f"{ENV_BACKEND}={forced}: cannot run getfast::{op_name} on {dev}: {why}")
        return forced
    if dev.type == "cpu":
        order = spec.cpu_preference
    elif dev.type == "cuda":
        order = spec.cuda_preference
    else:
        order = ()
    for b in (*order, "reference"):
        if b in names and backend_unavailable_reason(op_name, b, dev) is None:
            if b == "reference" and any(o in names for o in order) and (op_name, dev.type) not in _warned:
                _warned.add((op_name, dev.type))
                reasons = "; ".join(
                    f"{o}: {backend_unavailable_reason(op_name, o, dev)}" for o in order if o in names
                )
                warnings.warn(
                    f"getfast::{op_name} on {dev.type}: no fused backend available ({reasons}); "
                    "using the PyTorch reference",
                    RuntimeWarning,
                    stacklevel=2,
                )
            return b
    raise RuntimeError(f"getfast::{op_name}: no backend can run on {dev} (op supports {', '.join(names)})")


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _dtype_names(dtypes: Iterable[torch.dtype]) -> str:
    return ", ".join(str(d).replace("torch.", "") for d in dtypes)


def check_tensor(
    name: str,
    t,
    *,
    dtypes: Iterable[torch.dtype] | None = None,
    device=None,
    shape: Sequence[int | None] | None = None,
    ndim: int | None = None,
    ndim_min: int | None = None,
    contiguous: bool = True,
    nonempty: bool = True,
) -> torch.Tensor:
    """Validate one tensor argument; raise ``ValueError`` naming ``name``. Returns ``t``.

    ``shape`` entries of ``None`` match any size. ``device`` compares type and index
    (``"cuda"`` without an index matches any CUDA device).
    """
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dtypes is not None:
        dtypes = tuple(dtypes)
        if t.dtype not in dtypes:
            raise ValueError(f"{name} must have dtype in ({_dtype_names(dtypes)}), got {t.dtype}")
    if device is not None:
        want = as_device(device)
        got = t.device
        if got.type != want.type or (want.index is not None and got.index != want.index):
            raise ValueError(f"{name} must be on device {want}, got {got}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if ndim_min is not None and t.dim() < ndim_min:
        raise ValueError(f"{name} must have at least {ndim_min} dimension(s), got shape {tuple(t.shape)}")
    if shape is not None:
        shape = tuple(shape)
        ok = t.dim() == len(shape) and all(s is None or int(s) == int(g) for s, g in zip(shape, t.shape))
        if not ok:
            want_s = "(" + ", ".join("*" if s is None else str(s) for s in shape) + ")"
            raise ValueError(f"{name} must have shape {want_s}, got {tuple(t.shape)}")
    if nonempty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    if contiguous and not t.is_contiguous():
        raise ValueError(
            f"{name} must be contiguous (call .contiguous() first), got strides {tuple(t.stride())}"
        )
    return t


def check_same_device(**tensors: torch.Tensor) -> torch.device:
    """All tensors on one device; returns it. ``ValueError`` names the first odd one out."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.device != first.device:
            raise ValueError(f"{name} is on {t.device} but {first_name} is on {first.device}")
    return first.device


def check_same_shape(**tensors: torch.Tensor) -> None:
    """All tensors share one shape; ``ValueError`` names the mismatching argument."""
    items = list(tensors.items())
    first_name, first = items[0]
    for name, t in items[1:]:
        if t.shape != first.shape:
            raise ValueError(
                f"{name} has shape {tuple(t.shape)} but {first_name} has shape {tuple(first.shape)}"
            )


def check_scalar(name: str, value, *, positive: bool = False, nonnegative: bool = False, finite: bool = True) -> float:
    """A real Python/0-d scalar; returns it as float. ``ValueError`` names ``name``."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a real number, got {type(value).__name__}")
    v = float(value)
    if finite and (v != v or v in (float("inf"), float("-inf"))):
        raise ValueError(f"{name} must be finite, got {v}")
    if positive and not v > 0:
        raise ValueError(f"{name} must be > 0, got {v}")
    if nonnegative and not v >= 0:
        raise ValueError(f"{name} must be >= 0, got {v}")
    return v


# --------------------------------------------------------------------------------------
# small helpers for backends
# --------------------------------------------------------------------------------------
def current_stream_ptr(device) -> int:
    """The caller's current CUDA stream as an int (``cudaStream_t``); 0 for non-CUDA devices."""
    dev = as_device(device)
    if dev.type != "cuda":
        return 0
    return int(torch.cuda.current_stream(dev).cuda_stream)


def dtype_code(dtype: torch.dtype) -> int:
    """The integer code csrc/ functions take for ``dtype`` (see :data:`DTYPE_CODES`)."""
    try:
        return DTYPE_CODES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} has no kernel code; supported: {_dtype_names(DTYPE_CODES)}") from None


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation/statistics dtype: float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def nvcc_on_path() -> bool:
    """True when ``nvcc`` is on PATH (then the build must have compiled the CUDA kernels)."""
    return shutil.which("nvcc") is not None
