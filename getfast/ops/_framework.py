"""One mechanism for every fused op: a declarative :class:`OpSpec` and :func:`define_op`.

An op ``getfast::<name>`` is declared once — its schema, its tensor arguments, its reference,
its launchers per backend — and :func:`define_op` generates the rest:

* validation: shapes, dtypes, devices and contiguity from the ``args`` declarations (plus the
  spec's ``check`` for scalars), a ``ValueError`` naming the argument, before any pointer
  reaches C++; tensor values are never read;
* dispatch: :data:`DEFAULTS` (the measured rule, the only place it lives), the
  ``GETFAST_BACKEND`` override and the availability of each backend here, cached;
* the ``torch.library`` op with its fake and, where the spec has a backward, its autograd
  registration, used under ``torch.compile``;
* an eager path that skips the dispatcher: the launcher directly, inside a plain
  ``torch.autograd.Function`` when gradients are needed.

Backends: ``reference`` (plain PyTorch; for every op also the PyTorch built-in it replaces),
``triton`` (``getfast.kernels``; CPU tensors only under ``TRITON_INTERPRET=1``), ``cuda``
(``csrc/cuda`` through ``getfast._C``, or CuPy/NVRTC where the spec has a CuPy launcher) and
``cpp`` (``csrc/cpu`` through ``getfast._C``).
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
import sys
import warnings
from typing import Callable

import torch

from getfast.options import check_number

BACKENDS = ("reference", "triton", "cuda", "cpp")
ENV_BACKEND = "GETFAST_BACKEND"
FLOAT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}  # csrc/ops.h

# The default backend per (op, device type), and why. A fused backend is the default only where a
# benchmark measured it faster than the PyTorch built-in it replaces (the `reference` backend:
# SDPA, the eager composition, the reference solver step); anything absent here runs the
# built-in. GPU figures: benchmarks/RESULTS.md's GPU sections (one H100 SXM, 2026-12-05, torch 2.11,
# triton 3.6, quick run) and its quoted H200 figures of 2026-11-22 (attention: not yet measured on the
# H100). CPU figures: this project's 2-core machine, the benchmarks `sim_loss`, `deq` and `overhead`
# (python -m benchmarks), side by side in one process.
DEFAULTS: dict[tuple[str, str], tuple[str, str]] = {
    ("attention_fwd", "cuda"): ("reference", "SDPA: the Triton kernel measured 0.30-0.77x SDPA on H200"),
    ("attention_fwd", "cpu"): ("reference", "SDPA: no CPU kernel"),
    ("sim_loss", "cuda"): ("cuda", "fused CUDA fwd+bwd measured 1.33-1.38x eager autograd on H100 at 256x3x64x64, "
                                   "64x3x32x32 and 7x3x33x31, fp32 only (triton 1.41x/1.39x, but 0.95x at 7x3x33x31); "
                                   "on H200 (older code) both measured 1.0x"),
    ("sim_loss", "cpu"): ("cpp", "fused C++ measured 3.4-6.0x less CPU time than eager at 64x3x32x32 and "
                                 "64x4x64x64 (bench sim_loss), 0.43x eager's host time at 2x1x4x4 (bench overhead)"),
    ("anderson_step", "cuda"): ("triton", "measured 0.23x torchdeq per iteration on H100 at B=128, D=196608, m=6, "
                                          "fp32 (cuda backend 0.36x, reference step 0.83x; bf16: triton 0.48 ms, cuda "
                                          "1.08 ms, reference 3.90 ms; fixed point 0.31x); H200: 0.21x"),
    ("anderson_step", "cpu"): ("cpp", "fused C++ step measured 11.7x faster than the reference step at B=32, "
                                      "D=65536, m=6 (bench deq), 0.02x its time at B=2, D=64 (bench overhead)"),
    ("broyden_step", "cuda"): ("triton", "measured 0.25x torchdeq per iteration on H100 at B=128, D=196608, fp32 "
                                         "(cuda backend 0.36x, reference step 0.62x; bf16: 0.23x, 0.24x, 1.08x); time "
                                         "to tolerance measured with the reference step only"),
    ("broyden_step", "cpu"): ("cpp", "fused C++ step measured 0.02x the reference step's time at B=2, D=64 (bench "
                                     "overhead); 0.39x torchdeq's time to tolerance at B=32, D=65536 (bench deq)"),
}
_BUILTIN = "the PyTorch built-in: no measurement shows a fused backend faster here"


def _env_backend() -> str:
    """``GETFAST_BACKEND``, read on every call: tests and benchmarks change it."""
    return os.environ.get(ENV_BACKEND, "")


# --------------------------------------------------------------------------------------
# the native extension and Triton
# --------------------------------------------------------------------------------------
_C_state: list = []  # [module or None, import error or None] once loaded


def load_C(required: bool = True):
    """``getfast._C`` (torch is imported first, so one libgomp is loaded); ``None`` or a
    ``RuntimeError`` saying how to build it when it is missing."""
    if not _C_state:
        try:
            _C_state.extend([importlib.import_module("getfast._C"), None])
        except ImportError as exc:
            _C_state.extend([None, exc])
    if _C_state[0] is None and required:
        raise RuntimeError(f"getfast._C (the C++/CUDA extension) is not available: {_C_state[1]}. Build it with "
                           "`make install` from the repository root, or set GETFAST_BACKEND=reference.")
    return _C_state[0]


def build_info() -> dict:
    """How ``getfast._C`` was built (a copy), or a dict saying it is missing."""
    C = load_C(required=False)
    if C is None:
        return {"available": False, "cuda_compiled": False, "cuda_archs": [], "openmp": False, "families": []}
    return {**C.build_info(), "available": True}


def triton_interpreting() -> bool:
    """Whether Triton kernels run interpreted: fixed when ``getfast.kernels`` was imported."""
    common = sys.modules.get("getfast.kernels.common")
    if common is not None:
        return common.INTERPRET
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 for float64 data, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def stream_ptr(device: torch.device) -> int:
    """The caller's current CUDA stream as an int (``cudaStream_t``)."""
    return torch.cuda.current_stream(device).cuda_stream


def chunking(D: int, max_blocks: int, block: int = 1024, target: int = 4096) -> tuple[int, int]:
    """``(programs, elements each)`` splitting ``D`` elements for the streaming kernels (Triton
    and CUDA): about ``target`` elements per program, at most ``max_blocks`` programs."""
    nblk = min(max_blocks, max(1, -(-D // target)))
    chunk = -(-(-(-D // nblk)) // block) * block
    return -(-D // chunk), chunk


# --------------------------------------------------------------------------------------
# the spec
# --------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class OpSpec:
    """Everything that differs between ops.

    ``schema``    the ``torch.library`` schema without the namespace, e.g.
                  ``"sim_loss(Tensor a, Tensor b, float c) -> (Tensor, Tensor)"``
    ``args``      per tensor argument, ``"<dims...> <dtype>[ strided]"``: dims are names bound on
                  first use (``B``), integers, or ``*`` for any trailing dims; dtype is ``state``
                  (a float dtype, the same for every ``state`` argument), ``acc`` (float64 for
                  float64 states, else float32), ``float`` (any float dtype) or ``int32``;
                  ``strided`` allows non-contiguous tensors
    ``launchers`` backend -> callable with the op's signature, returning its outputs; the
                  ``reference`` launcher is the plain-PyTorch ground truth
    ``fake``      the outputs' metadata for tracing (ops that mutate and return nothing: ``None``)
    ``check``     extra cheap checks ``check(dims, *args)`` (scalars, bounds); raise ValueError
    ``backward``  ``(setup_context, backward)`` as for ``torch.library.register_autograd``
    ``native``    backend -> the ``getfast._C`` symbol that proves it was compiled
    ``dtypes``    backend -> the state dtypes it supports (default: all float dtypes)
    ``cupy``      the CUDA backend also runs through CuPy/NVRTC when ``_C`` lacks CUDA
    ``family``    the op whose :data:`DEFAULTS` entry this one follows (a backward op: its forward)
    ``grid_y``    the dims whose product the GPU kernels (triton, cuda) launch along grid axis y: at most
                  :data:`MAX_GRID_Y`, else a ValueError before any launch
    ``builtin``   what ``op(...)`` runs when the chosen backend is ``reference``: the PyTorch built-in the
                  fused kernels replace (``F.scaled_dot_product_attention``, an eager composition under
                  autograd), with the op's signature, returning its outputs (``None`` for auxiliary outputs
                  it does not compute, e.g. a saved log-sum-exp). Without one, the ``reference`` launcher runs.
    """

    schema: str
    args: dict[str, str]
    launchers: dict[str, Callable]
    fake: Callable | None = None
    check: Callable | None = None
    backward: tuple[Callable, Callable] | None = None
    native: dict[str, str] = dataclasses.field(default_factory=dict)
    dtypes: dict[str, tuple] = dataclasses.field(default_factory=dict)
    cupy: bool = False
    family: str | None = None
    grid_y: tuple[str, ...] = ()
    builtin: Callable | None = None


MAX_GRID_Y = 65535  # CUDA's limit on gridDim.y (and z); gridDim.x allows 2^31 - 1
_LIB = torch.library.Library("getfast", "DEF")
OPS: dict[str, "Op"] = {}
_warned: set = set()


def _parse(decl: str) -> tuple[tuple, str, bool]:
    toks = decl.split()
    strided = toks[-1] == "strided"
    if strided:
        toks = toks[:-1]
    return tuple(int(t) if t.isdigit() else t for t in toks[:-1]), toks[-1], strided


class Op:
    """A defined op: ``op(*args)`` validates, dispatches and runs it (see the module docstring)."""

    def __init__(self, spec: OpSpec):
        self.spec = spec
        self.name = spec.schema.split("(", 1)[0]
        schema = torch._C.parse_schema(f"getfast::{spec.schema}")
        self.arg_names = [a.name for a in schema.arguments]
        decls = [(i, n, *_parse(spec.args[n])) for i, n in enumerate(self.arg_names) if n in spec.args]
        decls = sorted(decls, key=lambda d: d[3] != "state")  # the data binds the dims first
        # an argument declared exactly like an earlier one only has to match that one's shape
        self._decls = [(*d, next((e[0] for e in decls[:j] if spec.args[e[1]] == spec.args[d[1]]), None))
                       for j, d in enumerate(decls)]
        # the dtype that selects kernels is the first `state` argument's; a trailing `str backend`
        # argument carries a per-call backend through torch.compile
        self._fast = _fast_validator(self._decls)
        self._si = next(d[0] for d in self._decls if d[3] == "state")
        self._ti = tuple(sorted(d[0] for d in self._decls))  # the tensor arguments
        self._backend_arg = self.arg_names[-1] == "backend"
        self._cache: dict = {}
        _LIB.define(spec.schema)
        _LIB.impl(self.name, self._dispatched, "CompositeExplicitAutograd")
        qualname = f"getfast::{self.name}"
        torch.library.register_fake(qualname, self._fake, lib=_LIB)
        self._functions = None  # backend -> its autograd function, for ops with a backward
        if spec.backward is not None:
            setup, backward = spec.backward
            torch.library.register_autograd(qualname, backward, setup_context=setup, lib=_LIB)
            self._functions = {b: _autograd_function(self.name, fn, b, setup, backward)
                               for b, fn in spec.launchers.items()}
        self.torch_op = getattr(torch.ops.getfast, self.name).default

    # ---- validation ----------------------------------------------------------------------
    def validate(self, *args) -> dict:
        """Check the arguments (shapes, dtypes, devices, contiguity; never values) and return the
        bound dims; ``ValueError`` names the offending argument."""
        dims = self._fast(args)
        if dims is None:  # something is wrong: the general loop below finds it and says what
            dims = self._explain(args)
        if self.spec.check is not None:
            self.spec.check(dims, *args)
        return dims

    def _explain(self, args) -> dict:
        dims: dict = {}
        state = device = first = None
        for i, name, shape, kind, strided, like in self._decls:
            t = args[i]
            if not isinstance(t, torch.Tensor):
                raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
            dt = t.dtype
            if kind == "state":
                if state is None and dt not in FLOAT_DTYPES:
                    raise ValueError(f"{name} must be float32/float64/float16/bfloat16, got {dt}")
                if state is not None and dt != state:
                    raise ValueError(f"{name} must have dtype {state} (like {first}), got {dt}")
                state = dt
            elif kind == "acc" and dt != acc_dtype(state):
                raise ValueError(f"{name} must have dtype {acc_dtype(state)}, got {dt}")
            elif kind == "float" and dt not in FLOAT_DTYPES:
                raise ValueError(f"{name} must have a floating-point dtype, got {dt}")
            elif kind == "int32" and dt != torch.int32:
                raise ValueError(f"{name} must have dtype torch.int32, got {dt}")
            if device is None:
                device, first = t.device, name
            elif t.device != device:
                raise ValueError(f"{name} is on {t.device} but {first} is on {device}")
            if like is None or t.shape != args[like].shape:
                _check_shape(name, shape, t.shape, dims)
            if not strided and not t.is_contiguous():
                raise ValueError(f"{name} must be contiguous (call .contiguous() first), got strides {t.stride()}")
        return dims

    # ---- dispatch ------------------------------------------------------------------------
    @torch.compiler.assume_constant_result
    def choose(self, device: torch.device, dtype: torch.dtype, backend: str | None = None) -> str:
        """The backend to run on ``device`` for ``dtype`` states: ``backend`` if given, else
        ``GETFAST_BACKEND``, else :data:`DEFAULTS`; an unavailable request is a RuntimeError.
        Under ``torch.compile`` the choice is made once, at trace time."""
        forced = backend or _env_backend()
        key = (forced, device.type, dtype)
        name = self._cache.get(key)
        if name is None:
            name = self._resolve(forced.strip().lower(), device, dtype)
            self._cache[key] = name
        return name

    def _resolve(self, forced: str, device: torch.device, dtype: torch.dtype) -> str:
        if forced:
            if forced not in BACKENDS:
                raise RuntimeError(f"{ENV_BACKEND}={forced!r} is not a backend; choose one of {', '.join(BACKENDS)}")
            why = self.unavailable(forced, device, dtype)
            if why is not None:
                raise RuntimeError(f"backend {forced!r} cannot run getfast::{self.name} on {device.type}: {why}")
            return forced
        name, _ = DEFAULTS.get((self.spec.family or self.name, device.type), ("reference", _BUILTIN))
        why = self.unavailable(name, device, dtype)
        if why is not None:
            if (self.name, device.type) not in _warned:
                _warned.add((self.name, device.type))
                warnings.warn(f"getfast::{self.name} on {device.type}: the default backend {name!r} is unavailable "
                              f"({why}); using the PyTorch reference", RuntimeWarning, stacklevel=3)
            name = "reference"
        return name

    def unavailable(self, backend: str, device: torch.device, dtype: torch.dtype | None = None) -> str | None:
        """``None`` when ``backend`` can run this op on ``device`` here, else why not."""
        spec = self.spec
        if backend not in spec.launchers:
            return f"getfast::{self.name} has no {backend!r} backend (it has: {', '.join(spec.launchers)})"
        if dtype is not None and dtype not in spec.dtypes.get(backend, FLOAT_DTYPES):
            return f"the {backend} backend does not support {dtype}"
        if backend == "reference":
            return None
        if backend == "triton":
            if importlib.util.find_spec("triton") is None:
                return "the triton package is not installed"
            if device.type == "cpu" and not triton_interpreting():
                return "Triton runs on CPU tensors only with TRITON_INTERPRET=1 set before getfast.kernels is imported"
            return None if device.type in ("cpu", "cuda") else f"the triton backend needs CUDA tensors, got {device}"
        want = "cpu" if backend == "cpp" else "cuda"
        if device.type != want:
            return f"the {backend} backend runs on {want.upper()} tensors only, got {device.type}"
        C = load_C(required=False)
        if C is not None and hasattr(C, spec.native.get(backend, "")) and (backend == "cpp" or C.cuda_device_count()):
            return None
        if backend == "cpp":
            return f"getfast._C lacks {spec.native.get('cpp')} ({_C_state[1] or 'rebuild it'})"
        if not spec.cupy:
            return "getfast._C was built without CUDA (or sees no device) and this op has no CuPy path"
        from . import _cupy

        why = _cupy.unavailable_reason()
        return None if why is None else f"getfast._C was built without CUDA and the CuPy path is unavailable: {why}"

    # ---- running -------------------------------------------------------------------------
    def _split(self, args: tuple, kwargs: dict) -> tuple[tuple, str | None]:
        args = args + tuple(kwargs[n] for n in self.arg_names[len(args):])  # compiled code may pass keywords
        return (args[:-1], args[-1] or None) if self._backend_arg else (args, None)

    def check_grid(self, backend: str, dims: dict) -> None:
        """A ValueError when ``backend``'s kernels would launch more than :data:`MAX_GRID_Y` blocks along
        grid axis y for these dims (a CUDA launch error, or wrong results, otherwise)."""
        if self.spec.grid_y and backend in ("triton", "cuda"):
            n = 1
            for d in self.spec.grid_y:  # a plain loop: torch.compile traces no generator here
                n *= dims[d]
            if n > MAX_GRID_Y:
                raise ValueError(f"getfast::{self.name}: the {backend} kernels launch {'·'.join(self.spec.grid_y)} = {n} "
                                 f"blocks along grid axis y, above CUDA's limit of {MAX_GRID_Y}; split the batch or "
                                 f"use backend 'reference' (GETFAST_BACKEND=reference)")

    def _dispatched(self, *args, **kwargs):
        """The ``torch.library`` kernel: validation, then the chosen launcher."""
        args, backend = self._split(args, kwargs)
        dims = self.validate(*args)
        t = args[self._si]
        backend = self.choose(t.device, t.dtype, backend)
        self.check_grid(backend, dims)
        return self.spec.launchers[backend](*args)

    def _fake(self, *args, **kwargs):
        args, _ = self._split(args, kwargs)
        self.validate(*args)
        return None if self.spec.fake is None else self.spec.fake(*args)

    def __call__(self, *args, backend: str | None = None, validate: bool = True):
        """Run the op. On the ``reference`` backend of an op with a :attr:`OpSpec.builtin`, that built-in
        (traced as itself by ``torch.compile``); else, under ``torch.compile``, the ``torch.library`` op,
        and eagerly the launcher itself, inside an autograd function when an input requires grad."""
        builtin, compiling = self.spec.builtin, torch.compiler.is_compiling()
        if builtin is not None or not compiling:  # compiled ops without a built-in choose inside the library op
            dims = self.validate(*args) if validate else None
            t = args[self._si]
            chosen = self.choose(t.device, t.dtype, backend)  # a constant under torch.compile
            if builtin is not None and chosen == "reference":
                return builtin(*args)
        if compiling:
            return self.torch_op(*args, backend or "") if self._backend_arg else self.torch_op(*args)
        if dims is not None and self.spec.grid_y:
            self.check_grid(chosen, dims)
        return self.launch(chosen, *args)

    def launch(self, backend: str, *args):
        """The eager path on a backend :meth:`choose` returned, for validated arguments."""
        if self._functions is not None and torch.is_grad_enabled():
            for i in self._ti:
                if args[i].requires_grad:
                    return self._functions[backend].apply(*args)
        return self.spec.launchers[backend](*args)

    def from_backward(self, ctx, *args):
        """Call from a backward formula: the launcher of the forward's backend in the eager autograd
        function, the ``torch.library`` op when autograd runs through it (traceable)."""
        backend = getattr(ctx, "backend", None)
        if backend is None or torch.compiler.is_compiling():
            return self.torch_op(*args)
        return self.spec.launchers[backend](*args)

    def run(self, backend: str, *args):
        """Validate and run on one named backend (tests compare backends with this)."""
        dims = self.validate(*args)
        t = args[self._si]
        why = self.unavailable(backend, t.device, t.dtype)
        if why is not None:
            raise RuntimeError(f"getfast::{self.name}: {why}")
        self.check_grid(backend, dims)
        return self.spec.launchers[backend](*args)


def _fast_validator(decls: list) -> Callable:
    """Straight-line code for the declarations: ``f(args)`` returns the bound dims, or ``None`` when
    any check fails (then :meth:`Op._explain` says which). Per-call host cost is what a fused op
    exists to cut, and a loop interpreting the declarations costs several times this."""
    code, seen, state = ["def fast(args):"], {}, False
    for i, _name, shape, kind, strided, like in decls:
        code += [f" t = args[{i}]", " if not isinstance(t, T): return None"]
        if kind == "state":
            code.append(" if t.dtype is not st: return None" if state else
                        " st = t.dtype\n if st not in FL: return None\n acc = F64 if st is F64 else F32")
            state = True
        else:
            code.append({"acc": " if t.dtype is not acc: return None", "int32": " if t.dtype is not I32: return None",
                         "float": " if t.dtype not in FL: return None"}[kind])
        code.append(" if t.device != dev: return None" if i != decls[0][0] else " dev = t.device")
        if like is not None:
            code.append(f" if t.shape != args[{like}].shape: return None")
        else:
            star = shape[-1] == "*"
            n = len(shape) - star
            code += [" sh = t.shape", f" if len(sh) {'<' if star else '!='} {n} or 0 in sh: return None"]
            if star:
                code.append(" if sh[%d:] != rest: return None" % n if "*" in seen else " rest = sh[%d:]" % n)
                seen["*"] = "rest"
            for j, d in enumerate(shape[:n]):
                if isinstance(d, int) or d in seen:
                    code.append(f" if sh[{j}] != {d if isinstance(d, int) else seen[d]}: return None")
                else:
                    seen[d] = f"d_{len(seen)}"
                    code.append(f" {seen[d]} = sh[{j}]")
        if not strided:
            code.append(" if not t.is_contiguous(): return None")
    code.append(" return {" + ", ".join(f"{d!r}: {v}" for d, v in seen.items()) + "}")
    scope = {"T": torch.Tensor, "FL": FLOAT_DTYPES, "F32": torch.float32, "F64": torch.float64, "I32": torch.int32}
    exec("\n".join(code), scope)
    return scope["fast"]


def _check_shape(name: str, shape: tuple, got: torch.Size, dims: dict) -> None:
    """``got`` fits the declared ``shape`` (binding named dims and ``*`` in ``dims``) and is
    non-empty, or a ValueError naming ``name``."""
    n = len(shape)
    if shape[n - 1] == "*":  # any trailing dims, the same for every argument that has them
        n -= 1
        ok = len(got) >= n and dims.setdefault("*", got[n:]) == got[n:]
    else:
        ok = len(got) == n
    for j in range(n if ok else 0):
        s, g = shape[j], got[j]
        if s != g and (s.__class__ is int or dims.setdefault(s, g) != g):
            ok = False
            break
    if not ok:
        want = ", ".join("..." if s == "*" else f"{s}={dims[s]}" if s in dims else str(s) for s in shape)
        raise ValueError(f"{name} must have shape ({want}), got {tuple(got)}")
    if 0 in got:
        raise ValueError(f"{name} must not be empty, got shape {tuple(got)}")


def _autograd_function(name: str, launcher: Callable, backend: str, setup: Callable, backward: Callable):
    """A plain ``torch.autograd.Function`` over one backend's launcher (the eager path; the same
    ``setup_context``/``backward`` as the ``torch.library`` registration)."""

    def forward(ctx, *args):
        ctx.set_materialize_grads(False)  # an unused output's gradient stays None, not a zeros tensor
        out = launcher(*args)
        setup(ctx, args, out)
        ctx.backend = backend
        return out

    return type(f"{name}_{backend}", (torch.autograd.Function,),
                {"forward": staticmethod(forward), "backward": staticmethod(backward)})


def define_op(spec: OpSpec) -> Op:
    """Register ``getfast::<name>`` from ``spec`` and return the callable :class:`Op`."""
    op = Op(spec)
    OPS[op.name] = op
    return op


# --------------------------------------------------------------------------------------
# scalars and the overview
# --------------------------------------------------------------------------------------
def check_real(name: str, v, *, positive: bool = False, nonnegative: bool = False) -> float:
    """A finite real Python number (never a tensor: reading one would sync the device)."""
    return float(check_number(name, v, lo=0 if positive or nonnegative else None, lo_open=positive, option=False))


def describe(print_it: bool = True) -> str:
    """Each op's default backend per device type and why, and the backends available here."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    lines = []
    for name, op in OPS.items():
        if op.spec.family is not None:
            continue  # a backward op follows its forward
        for dev in ("cpu", "cuda"):
            default, why = DEFAULTS.get((name, dev), ("reference", _BUILTIN))
            here = [b for b in op.spec.launchers for d in devices if d.type == dev and op.unavailable(b, d) is None]
            lines.append(f"getfast::{name:<18} {dev:<4}  default {default:<9}  ({why}); "
                         f"runnable here: {', '.join(here) or 'n/a (no such device)'}")
    text = "\n".join(lines)
    if print_it:
        print(text)
    return text
