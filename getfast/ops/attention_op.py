"""Fused flash attention: ``getfast.ops.attention(q, k, v, scale=None)``.

Non-causal scaled dot-product attention ``softmax(q kᵀ · scale) v`` (Vaswani et al. 2017, Eq. 1)
for ``(B, H, N, d)`` tensors, computed by a tiled online-softmax kernel with fp32 accumulation
that never materialises the ``N×N`` matrix (Dao et al. 2022, *FlashAttention*, Alg. 1; backward
as in *FlashAttention-2*, Alg. 2, from the saved log-sum-exp).

Backends:

* ``reference`` — PyTorch. Through :func:`attention` it is ``F.scaled_dot_product_attention``
  (autograd and ``torch.compile`` native); inside the custom op it is the explicit
  ``softmax(q kᵀ) v`` computed in fp32 (fp64 for fp64 inputs), with the explicit backward.
* ``triton`` — ``getfast.kernels.attention`` (forward + backward). CUDA tensors, or CPU tensors
  when ``TRITON_INTERPRET=1`` was set before the kernels were imported.

Default dispatch: CPU tensors and float64 → ``reference``; CUDA fp16/bf16/fp32 → ``triton``.
``GETFAST_BACKEND`` overrides (``reference`` | ``triton``; ``cuda``/``cpp`` have no attention
kernel and raise).

The Triton path is the custom op ``torch.ops.getfast.attention_fwd`` (returns ``out`` and the
base-2 log-sum-exp) with ``register_fake`` and ``register_autograd``; its backward is the custom
op ``torch.ops.getfast.attention_bwd``. Both validate their inputs and raise ``ValueError``.
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F

from getfast.ops import _framework as _fw

__all__ = ["attention", "attention_reference", "select_backend", "BACKENDS"]

BACKENDS = ("reference", "triton")
_LOG2E = 1.4426950408889634
_LN2 = 0.6931471805599453
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# ----------------------------------------------------------------------------- validation

def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name}: expected a tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name}: expected shape (B, H, N, d), got {tuple(t.shape)}")
        if t.dtype not in _FLOAT_DTYPES:
            raise ValueError(f"{name}: dtype {t.dtype} not supported (float16/bfloat16/float32/float64)")
        if t.numel() == 0:
            raise ValueError(f"{name}: empty tensor {tuple(t.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise ValueError(f"{name}: on {t.device}, q on {q.device}")
        if t.dtype != q.dtype:
            raise ValueError(f"{name}: dtype {t.dtype} differs from q's {q.dtype}")
    B, H, _, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(f"k: shape {tuple(k.shape)} incompatible with q {tuple(q.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: shape {tuple(v.shape)} must equal k's {tuple(k.shape)}")
    if scale is not None and not (isinstance(scale, (int, float)) and scale > 0):
        raise ValueError(f"scale: expected a positive float or None, got {scale!r}")


# ----------------------------------------------------------------------------- backends

_SPEC = _fw.register_op(
    "attention",
    backends=BACKENDS,
    cuda_preference=("triton",),
    cpu_preference=(),  # CPU: the reference (SDPA) is the fast path; no C++ kernel
    triton_module="getfast.kernels.attention",
)


def select_backend(q: torch.Tensor) -> str:
    """The backend :func:`attention` uses for ``q``.

    ``GETFAST_BACKEND`` forces one (``RuntimeError`` when it cannot run here — ``cuda``/``cpp``
    have no attention kernel). Otherwise CPU tensors and float64 → ``reference``,
    CUDA fp16/bf16/fp32 → ``triton``.
    """
    forced = os.environ.get(_fw.ENV_BACKEND, "").strip()
    if not forced and q.dtype == torch.float64:
        return "reference"
    return _fw.select_backend("attention", q.device)


def _kernels():
    try:
        from getfast.kernels import attention as k
    except ImportError:  # development checkout without the getfast.kernels mapping
        import importlib
        import sys
        from pathlib import Path

        root = Path(__file__).resolve().parents[2]
        if str(root) not in sys.path:
            sys.path.append(str(root))
        k = importlib.import_module("kernels.attention")
    return k


def _triton_checks(q: torch.Tensor) -> None:
    if q.dtype == torch.float64:
        raise ValueError("q: the triton attention backend takes float16/bfloat16/float32, got float64")
    if q.shape[-1] > 256:
        raise ValueError(f"q: head dimension {q.shape[-1]} > 256 is not supported by the triton backend")
    if q.device.type == "cpu" and not _kernels().INTERPRET:
        raise RuntimeError(
            "getfast attention: GETFAST_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1 set before "
            "getfast.kernels is imported (or use the reference backend)"
        )
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"q: device {q.device} not supported by the triton backend")


def _ref_compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ref_fwd(q, k, v, scale: float):
    """Explicit attention in fp32 (fp64): returns out (input dtype) and the base-2 scaled LSE."""
    cd = _ref_compute_dtype(q.dtype)
    s = torch.matmul(q.to(cd), k.to(cd).transpose(-1, -2)) * scale
    lse = torch.logsumexp(s, dim=-1)
    out = torch.matmul(torch.exp(s - lse.unsqueeze(-1)), v.to(cd))
    return out.to(q.dtype), (lse * _LOG2E).to(_fw.acc_dtype(q.dtype))


def _ref_bwd(do, q, k, v, out, lse2, scale: float):
    cd = _ref_compute_dtype(q.dtype)
    q_, k_, v_, do_ = q.to(cd), k.to(cd), v.to(cd), do.to(cd)
    s = torch.matmul(q_, k_.transpose(-1, -2)) * scale
    p = torch.exp(s - (lse2.to(cd) * _LN2).unsqueeze(-1))
    dv = torch.matmul(p.transpose(-1, -2), do_)
    dp = torch.matmul(do_, v_.transpose(-1, -2))
    delta = (do_ * out.to(cd)).sum(-1, keepdim=True)
    ds = p * (dp - delta)
    dq = torch.matmul(ds, k_) * scale
    dk = torch.matmul(ds.transpose(-1, -2), q_) * scale
    return dq.to(q.dtype), dk.to(k.dtype), dv.to(v.dtype)


# ----------------------------------------------------------------------------- custom ops

@torch.library.custom_op("getfast::attention_fwd", mutates_args=())
def _attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    _validate(q, k, v, scale)
    backend = select_backend(q)
    if backend == "triton":
        _triton_checks(q)
        return _kernels().attention_fwd(q, k, v, scale)
    return _ref_fwd(q, k, v, scale)


@_attention_fwd.register_fake
def _(q, k, v, scale):
    _validate(q, k, v, scale)
    B, H, N, D = q.shape
    return q.new_empty((B, H, N, D)), q.new_empty((B, H, N), dtype=_fw.acc_dtype(q.dtype))


@torch.library.custom_op("getfast::attention_bwd", mutates_args=())
def _attention_bwd(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    out: torch.Tensor, lse: torch.Tensor, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    _validate(q, k, v, scale)
    if do.shape != q.shape:
        raise ValueError(f"do: shape {tuple(do.shape)} must equal q's {tuple(q.shape)}")
    if out.shape != q.shape:
        raise ValueError(f"out: shape {tuple(out.shape)} must equal q's {tuple(q.shape)}")
    if lse.shape != q.shape[:3] or lse.dtype != _fw.acc_dtype(q.dtype):
        raise ValueError(f"lse: expected {_fw.acc_dtype(q.dtype)} {tuple(q.shape[:3])}, got {lse.dtype} {tuple(lse.shape)}")
    backend = select_backend(q)
    if backend == "triton":
        _triton_checks(q)
        return _kernels().attention_bwd(do, q, k, v, out, lse, scale)
    return _ref_bwd(do, q, k, v, out, lse, scale)


@_attention_bwd.register_fake
def _(do, q, k, v, out, lse, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        torch.empty_like(k, memory_format=torch.contiguous_format), \
        torch.empty_like(v, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    q, k, v, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse)
    ctx.scale = scale
    ctx.mark_non_differentiable(lse)


def _backward(ctx, dout, dlse):
    q, k, v, out, lse = ctx.saved_tensors
    dq, dk, dv = torch.ops.getfast.attention_bwd(dout, q, k, v, out, lse, ctx.scale)
    return dq, dk, dv, None


_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- public API

def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference: ``F.scaled_dot_product_attention(q, k, v, scale=scale)`` (non-causal)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal attention ``softmax(q kᵀ · scale) v`` (Vaswani et al. 2017, Eq. 1) by a flash kernel.

    ``q``: ``(B, H, Nq, d)``; ``k``, ``v``: ``(B, H, Nk, d)``; same dtype and device; any strides.
    ``scale`` defaults to ``1/√d``. Returns ``(B, H, Nq, d)`` in the input dtype. Differentiable in
    ``q``, ``k``, ``v`` (FlashAttention-2 backward from the saved log-sum-exp).
    """
    _validate(q, k, v, scale)
    scale = float(scale) if scale is not None else q.shape[-1] ** -0.5
    if select_backend(q) == "reference":
        return attention_reference(q, k, v, scale)
    _triton_checks(q)
    return torch.ops.getfast.attention_fwd(q, k, v, scale)[0]
