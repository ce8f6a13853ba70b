"""Broyden low-rank inverse-Jacobian products: ``getfast::broyden_matvec`` / ``broyden_rmatvec``.

Broyden's "good" method (Broyden 1965, "A class of methods for solving nonlinear simultaneous
equations"), as used for DEQs by Bai et al. 2019 ("Deep Equilibrium Models", §3.1.3), keeps the
inverse-Jacobian estimate of ``g(z) = f(z) − z`` as ``B = −I + U Vᵀ`` with ``U, V`` holding the
``n`` live rank-one pairs of a ring buffer. The two products, per sample ``b``:

``broyden_matvec(U, V, x, n)  = (−I + U Vᵀ) x  = −x + Σⱼ<n Uⱼ ⟨Vⱼ, x⟩``
``broyden_rmatvec(U, V, x, n) = xᵀ (−I + U Vᵀ) = −x + Σⱼ<n Vⱼ ⟨Uⱼ, x⟩``

Shapes: ``U, V`` ``(mem, B, D)`` and ``x`` ``(B, D)`` of one state dtype (float32/float64/
float16/bfloat16); ``0 <= n <= mem``. The dot products accumulate in float32 (float64 for float64
inputs); the output has the state dtype. Each is one read of the ``2n`` live history vectors:
the fused backends compute the ``n`` dots in one pass and the expansion in a second, without the
``(B, n)`` intermediates of the unfused einsum pair.

The whole Broyden iteration is also one fused op, ``getfast::broyden_step`` (mutating, no
autograd), so the solver issues a handful of ATen ops per iteration. After the caller evaluated
``fx = f(x)``, with ``g = fx − x`` (stored rounded to the state dtype), ``Δg = g − g_prev``,
``Δx`` the previous update, ring slot ``s = (k−1) % mem`` and ``n = min(k−1, mem)`` live pairs:

* bookkeeping as ``getfast::anderson_step`` (residual trace, running minima, step, status; the
  lowest-residual *iterate* ``x`` is kept in ``best``, torchdeq's Broyden convention);
* for ``k > 0`` the rank-one update of the inverse Jacobian ``B = −I + U Vᵀ``:
  ``aⱼ = ⟨Uⱼ, Δx⟩``, ``bⱼ = ⟨Vⱼ, Δg⟩``, ``cⱼ = ⟨Vⱼ, g⟩`` (one pass over the history),
  ``v = −Δx + Σ aⱼ Vⱼ`` (= ``Δxᵀ B``), ``BΔg = −Δg + Σ bⱼ Uⱼ``, ``vᵀΔg = −⟨Δx, Δg⟩ + Σ aⱼ bⱼ``,
  ``u = (Δx − BΔg) / vᵀΔg``; the pair is zeroed for a sample whose ``vᵀΔg`` is 0 or any of these
  scalars is not finite; ``(u, v)`` replaces slot ``s``;
* the step with the *new* memory, ``B g = −g + Σⱼ≠s cⱼ Uⱼ + u (vᵀg)`` with
  ``vᵀg = −⟨Δx, g⟩ + Σ aⱼ cⱼ`` (second pass), ``x ← x − B g`` for running samples (frozen ones
  keep ``x``), ``Δx ← x_new − x``, ``g_prev ← g``.

Backends: ``reference`` (this file), ``triton`` (``kernels/broyden.py``), ``cuda``
(``csrc/cuda/broyden.cu``), ``cpp`` (``csrc/cpu/broyden.cpp``). Solvers call them under
``torch.no_grad()``; an autograd formula is registered anyway (the products are linear in
``x``, and ``U``/``V`` are treated as constants), so ``opcheck`` passes.
"""
from __future__ import annotations

import os

import torch

from . import _framework as fw

__all__ = [
    "broyden_matvec",
    "broyden_rmatvec",
    "broyden_step",
    "broyden_matvec_reference",
    "broyden_rmatvec_reference",
    "broyden_step_reference",
]

_STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

for _name in ("broyden_matvec", "broyden_rmatvec"):
    fw.register_op(
        _name,
        cuda_preference=("cuda", "triton"),
        cpu_preference=("cpp",),
        cpp_symbol="broyden_lowrank_cpu",
        cuda_symbol="broyden_lowrank_cuda",
        triton_module="getfast.kernels.broyden",
    )
fw.register_op(
    "broyden_step",
    cuda_preference=("cuda", "triton"),
    cpu_preference=("cpp",),
    cpp_symbol="broyden_step_cpu",
    cuda_symbol="broyden_step_cuda",
    triton_module="getfast.kernels.broyden",
)


# --------------------------------------------------------------------------------------
# reference
# --------------------------------------------------------------------------------------
def _lowrank_reference(A: torch.Tensor, Bm: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``−x + Σⱼ<n Bmⱼ ⟨Aⱼ, x⟩`` with the dots in the accumulation dtype."""
    acc = fw.acc_dtype(x.dtype)
    xa = x.to(acc)
    if n == 0:
        return (-xa).to(x.dtype)
    c = torch.einsum("nbd,bd->bn", A[:n].to(acc), xa)
    return (torch.einsum("bn,nbd->bd", c, Bm[:n].to(acc)) - xa).to(x.dtype)


def broyden_matvec_reference(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``(−I + U Vᵀ) x`` in plain PyTorch."""
    return _lowrank_reference(V, U, x, n)


def broyden_rmatvec_reference(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor, n: int) -> torch.Tensor:
    """``xᵀ (−I + U Vᵀ)`` in plain PyTorch."""
    return _lowrank_reference(U, V, x, n)


# --------------------------------------------------------------------------------------
# validation and backends
# --------------------------------------------------------------------------------------
def _validate(U, V, x, n) -> None:
    fw.check_tensor("U", U, dtypes=_STATE_DTYPES, ndim=3)
    mem, B, D = U.shape
    fw.check_tensor("V", V, dtypes=(U.dtype,), shape=(mem, B, D), device=U.device)
    fw.check_tensor("x", x, dtypes=(U.dtype,), shape=(B, D), device=U.device)
    if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= mem:
        raise ValueError(f"n must be an int in [0, {mem}], got {n!r}")


def _run(backend: str, A: torch.Tensor, Bm: torch.Tensor, x: torch.Tensor, n: int,
         out: torch.Tensor | None = None) -> torch.Tensor:
    """``−x + Σⱼ<n Bmⱼ ⟨Aⱼ, x⟩`` on ``backend``; ``out`` (optional, validated by the caller) is
    written in full and returned."""
    if backend == "reference":
        res = _lowrank_reference(A, Bm, x, n)
        return res if out is None else out.copy_(res)
    if out is None:
        out = torch.empty_like(x)
    mem, B, D = A.shape
    if backend == "triton":
        from getfast.kernels import broyden as tk  # noqa: PLC0415

        tk.lowrank(A, Bm, x, n, out)
        return out
    if backend == "cpp":
        C = fw.load_C()
        C.broyden_lowrank_cpu(fw.dtype_code(x.dtype), A.data_ptr(), Bm.data_ptr(), x.data_ptr(),
                              out.data_ptr(), n, B, D)
        return out
    if backend == "cuda":
        C = fw.load_C(required=False)
        if C is None or not hasattr(C, "broyden_lowrank_cuda"):
            raise RuntimeError("getfast::broyden_*: the cuda backend needs getfast._C built with nvcc")
        acc = fw.acc_dtype(x.dtype)
        with torch.cuda.device(x.device):
            work = torch.empty(_cuda_workspace_numel(B, D, n), dtype=acc, device=x.device)
            C.broyden_lowrank_cuda(fw.dtype_code(x.dtype), A.data_ptr(), Bm.data_ptr(), x.data_ptr(),
                                   out.data_ptr(), n, B, D, work.data_ptr(),
                                   fw.current_stream_ptr(x.device))
        return out
    raise AssertionError(backend)


def _cuda_workspace_numel(B: int, D: int, n: int) -> int:
    # mirrors csrc/cuda/broyden.h: per-(sample, block) partial dots
    nblk = min(256, max(1, -(-D // 4096)))
    return max(1, B * nblk * n)


_RESOLVED: dict = {}


def _resolve(op: str, backend: str, device: torch.device) -> str:
    """``backend`` if given (checked), else the framework's choice; cached per (op, request,
    device type, GETFAST_BACKEND) so a solver iteration does not pay for the lookup."""
    key = (op, backend, device.type, os.environ.get(fw.ENV_BACKEND, ""))
    name = _RESOLVED.get(key)
    if name is None:
        if backend:
            why = fw.backend_unavailable_reason(op, backend, device)
            if why is not None:
                raise RuntimeError(f"getfast::{op}: backend {backend!r} unavailable on {device}: {why}")
            name = backend
        else:
            name = fw.select_backend(op, device)
        _RESOLVED[key] = name
    return name


@torch.library.custom_op("getfast::broyden_matvec", mutates_args=())
def _matvec_op(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor, n: int, backend: str) -> torch.Tensor:
    _validate(U, V, x, n)
    return _run(_resolve("broyden_matvec", backend, x.device), V, U, x, n)


@torch.library.custom_op("getfast::broyden_rmatvec", mutates_args=())
def _rmatvec_op(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor, n: int, backend: str) -> torch.Tensor:
    _validate(U, V, x, n)
    return _run(_resolve("broyden_rmatvec", backend, x.device), U, V, x, n)


@_matvec_op.register_fake
def _(U, V, x, n, backend):
    return torch.empty_like(x)


@_rmatvec_op.register_fake
def _(U, V, x, n, backend):
    return torch.empty_like(x)


# d/dx of matvec is (−I + U Vᵀ); its transpose applied to the cotangent is the rmatvec, and
# vice versa. U and V get no gradient (solver state).
def _setup(ctx, inputs, output):
    U, V, _x, n, backend = inputs
    ctx.save_for_backward(U, V)
    ctx.n, ctx.backend = n, backend


def _matvec_bwd(ctx, grad):
    U, V = ctx.saved_tensors
    return None, None, torch.ops.getfast.broyden_rmatvec(U, V, grad.contiguous(), ctx.n, ctx.backend), None, None


def _rmatvec_bwd(ctx, grad):
    U, V = ctx.saved_tensors
    return None, None, torch.ops.getfast.broyden_matvec(U, V, grad.contiguous(), ctx.n, ctx.backend), None, None


_matvec_op.register_autograd(_matvec_bwd, setup_context=_setup)
_rmatvec_op.register_autograd(_rmatvec_bwd, setup_context=_setup)


def _check_backend(backend):
    if backend is not None and backend not in fw.BACKENDS:
        raise ValueError(f"backend must be one of {fw.BACKENDS}, got {backend!r}")
    return backend or ""


def broyden_matvec(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor, n: int, *, backend: str | None = None) -> torch.Tensor:
    """``(−I + U Vᵀ) x`` over the first ``n`` pairs (Broyden 1965; Bai et al. 2019 §3.1.3)."""
    return torch.ops.getfast.broyden_matvec(U, V, x, int(n), _check_backend(backend))


def broyden_rmatvec(U: torch.Tensor, V: torch.Tensor, x: torch.Tensor, n: int, *, backend: str | None = None) -> torch.Tensor:
    """``xᵀ (−I + U Vᵀ)`` over the first ``n`` pairs (Broyden 1965; Bai et al. 2019 §3.1.3)."""
    return torch.ops.getfast.broyden_rmatvec(U, V, x, int(n), _check_backend(backend))


# --------------------------------------------------------------------------------------
# the fused Broyden iteration: getfast::broyden_step
# --------------------------------------------------------------------------------------
def broyden_step_reference(
    x: torch.Tensor,
    fx: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    g_prev: torch.Tensor,
    dx: torch.Tensor,
    best: torch.Tensor,
    lowest: torch.Tensor,
    trace: torch.Tensor,
    status: torch.Tensor,
    k: int,
    tol: float,
    stop_rel: bool,
) -> None:
    """Plain-PyTorch ``broyden_step`` (see the module docstring); mutates its buffers."""
    from .anderson import record_reference  # noqa: PLC0415 (shared bookkeeping)

    mem = U.shape[0]
    acc = lowest.dtype
    dt = x.dtype
    xa = x.to(acc)
    f = fx.to(acc)
    g = f - xa
    gs = g.to(dt).to(acc)  # the residual as stored
    still = record_reference(g, f, x, best, lowest, trace, status, k, tol, stop_rel)
    bg = -gs
    if k > 0:
        n, s, full = min(k - 1, mem), (k - 1) % mem, k - 1 >= mem
        dxa = dx.to(acc)
        dg = gs - g_prev.to(acc)
        Un, Vn = U[:n].to(acc), V[:n].to(acc)
        a = torch.einsum("nbd,bd->bn", Un, dxa)
        b = torch.einsum("nbd,bd->bn", Vn, dg)
        c = torch.einsum("nbd,bd->bn", Vn, gs)
        den = (a * b).sum(1) - (dxa * dg).sum(1)
        vg = (a * c).sum(1) - (dxa * gs).sum(1)
        ok = (torch.isfinite(den) & (den != 0) & torch.isfinite(vg) & torch.isfinite(a).all(1)
              & torch.isfinite(b).all(1) & torch.isfinite(c).all(1))
        v = torch.einsum("bn,nbd->bd", a, Vn) - dxa
        bdg = torch.einsum("bn,nbd->bd", b, Un) - dg
        u = (dxa - bdg) / den[:, None]
        u = torch.where(ok[:, None], u, 0.0)
        v = torch.where(ok[:, None], v, 0.0)
        if full:  # slot s leaves the memory
            c = c.clone()
            c[:, s] = 0.0
        bg = bg + torch.einsum("bn,nbd->bd", c, Un) + torch.where(ok, vg, 0.0)[:, None] * u
        U[s] = u
        V[s] = v
    x_new = torch.where(still[:, None], xa - bg, xa).to(dt)
    dx.copy_(x_new.to(acc) - xa)
    g_prev.copy_(gs)
    x.copy_(x_new)


def _validate_step(x, fx, U, V, g_prev, dx, best, lowest, trace, status, k, tol) -> None:
    fw.check_tensor("x", x, dtypes=_STATE_DTYPES, ndim=2)
    B, D = x.shape
    dev = x.device
    acc = fw.acc_dtype(x.dtype)
    fw.check_tensor("fx", fx, dtypes=(x.dtype,), shape=(B, D), device=dev)
    fw.check_tensor("U", U, dtypes=(x.dtype,), ndim=3, device=dev)
    mem = U.shape[0]
    if tuple(U.shape[1:]) != (B, D):
        raise ValueError(f"U must have shape (mem, {B}, {D}), got {tuple(U.shape)}")
    fw.check_tensor("V", V, dtypes=(x.dtype,), shape=(mem, B, D), device=dev)
    for name, t in (("g_prev", g_prev), ("dx", dx), ("best", best)):
        fw.check_tensor(name, t, dtypes=(x.dtype,), shape=(B, D), device=dev)
    fw.check_tensor("lowest", lowest, dtypes=(acc,), shape=(3, B), device=dev)
    fw.check_tensor("trace", trace, dtypes=(acc,), ndim=3, device=dev)
    if trace.shape[0] != 2 or trace.shape[1] != B:
        raise ValueError(f"trace must have shape (2, {B}, T), got {tuple(trace.shape)}")
    fw.check_tensor("status", status, dtypes=(torch.int32,), shape=(B,), device=dev)
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k >= trace.shape[2]:
        raise ValueError(f"k must be an int in [0, {trace.shape[2]}), got {k!r}")
    fw.check_scalar("tol", tol)


def _step_workspace_numel(mem: int, B: int, D: int) -> int:
    # mirrors csrc/cuda/broyden.h: partial sums (3 mem + 4) per (sample, block) + coefficients
    nblk = min(256, max(1, -(-D // 4096)))
    return B * nblk * (3 * mem + 4) + B * (3 * mem + 4)


def _run_step(backend, x, fx, U, V, g_prev, dx, best, lowest, trace, status, k, tol, stop_rel) -> None:
    if backend == "reference":
        broyden_step_reference(x, fx, U, V, g_prev, dx, best, lowest, trace, status, k, tol, stop_rel)
        return
    mem = U.shape[0]
    B, D = x.shape
    if backend == "triton":
        from getfast.kernels import broyden as tk  # noqa: PLC0415

        tk.broyden_step(x, fx, U, V, g_prev, dx, best, lowest, trace, status, k, tol, stop_rel)
        return
    ptrs = (x.data_ptr(), fx.data_ptr(), U.data_ptr(), V.data_ptr(), g_prev.data_ptr(), dx.data_ptr(),
            best.data_ptr(), lowest.data_ptr(), trace.data_ptr(), status.data_ptr())
    if backend == "cpp":
        fw.load_C().broyden_step_cpu(fw.dtype_code(x.dtype), *ptrs, mem, B, D, trace.shape[2], k, float(tol),
                                     bool(stop_rel))
        return
    if backend == "cuda":
        C = fw.load_C(required=False)
        if C is None or not hasattr(C, "broyden_step_cuda"):
            raise RuntimeError("getfast::broyden_step: the cuda backend needs getfast._C built with nvcc")
        with torch.cuda.device(x.device):
            work = torch.empty(_step_workspace_numel(mem, B, D), dtype=lowest.dtype, device=x.device)
            C.broyden_step_cuda(fw.dtype_code(x.dtype), *ptrs, mem, B, D, trace.shape[2], k, float(tol),
                                bool(stop_rel), work.data_ptr(), fw.current_stream_ptr(x.device))
        return
    raise AssertionError(backend)


@torch.library.custom_op(
    "getfast::broyden_step",
    mutates_args=("x", "U", "V", "g_prev", "dx", "best", "lowest", "trace", "status"),
)
def _broyden_step_op(
    x: torch.Tensor,
    fx: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    g_prev: torch.Tensor,
    dx: torch.Tensor,
    best: torch.Tensor,
    lowest: torch.Tensor,
    trace: torch.Tensor,
    status: torch.Tensor,
    k: int,
    tol: float,
    stop_rel: bool,
    backend: str,
) -> None:
    _validate_step(x, fx, U, V, g_prev, dx, best, lowest, trace, status, k, tol)
    name = _resolve("broyden_step", backend, x.device)
    _run_step(name, x, fx, U, V, g_prev, dx, best, lowest, trace, status, k, tol, stop_rel)


@_broyden_step_op.register_fake
def _(x, fx, U, V, g_prev, dx, best, lowest, trace, status, k, tol, stop_rel, backend) -> None:
    return None


def broyden_step(
    x: torch.Tensor,
    fx: torch.Tensor,
    U: torch.Tensor,
    V: torch.Tensor,
    g_prev: torch.Tensor,
    dx: torch.Tensor,
    best: torch.Tensor,
    lowest: torch.Tensor,
    trace: torch.Tensor,
    status: torch.Tensor,
    k: int,
    *,
    tol: float | None = None,
    stop_mode: str = "abs",
    backend: str | None = None,
) -> None:
    """Advance a Broyden solve by one iteration in place (Broyden 1965; Bai et al. 2019 §3.1.3).

    See the module docstring; buffers as in ``getfast::anderson_step`` plus ``x``, ``g_prev``,
    ``dx`` ``(B, D)`` and the ring ``U``, ``V`` ``(mem, B, D)``, all of the state dtype.
    """
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    t = -1.0 if tol is None else float(tol)
    torch.ops.getfast.broyden_step(x, fx, U, V, g_prev, dx, best, lowest, trace, status, int(k), t,
                                   stop_mode == "rel", _check_backend(backend))
