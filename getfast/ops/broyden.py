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

Backends: ``reference`` (this file), ``triton`` (``kernels/broyden.py``), ``cuda``
(``csrc/cuda/broyden.cu``), ``cpp`` (``csrc/cpu/broyden.cpp``). Solvers call them under
``torch.no_grad()``; an autograd formula is registered anyway (the products are linear in
``x``, and ``U``/``V`` are treated as constants), so ``opcheck`` passes.
"""
from __future__ import annotations

import torch

from . import _framework as fw

__all__ = ["broyden_matvec", "broyden_rmatvec", "broyden_matvec_reference", "broyden_rmatvec_reference"]

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


def _resolve(op: str, backend: str, device: torch.device) -> str:
    if backend:
        why = fw.backend_unavailable_reason(op, backend, device)
        if why is not None:
            raise RuntimeError(f"getfast::{op}: backend {backend!r} unavailable on {device}: {why}")
        return backend
    return fw.select_backend(op, device)


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
