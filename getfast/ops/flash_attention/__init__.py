"""Non-causal attention ``softmax(q kᵀ·scale) v`` (Vaswani et al. 2017, Eq. 1) by a tiled
online-softmax kernel that never materialises the N×N matrix (Dao et al. 2022, *FlashAttention*,
Alg. 1; backward as *FlashAttention-2*, Dao 2023, Alg. 2, from the saved log-sum-exp).

``getfast::attention_fwd`` returns the output and the base-2 log-sum-exp; its backward is
``getfast::attention_bwd``. Backends: ``reference`` (``naive.py``; the public function's
built-in is ``F.scaled_dot_product_attention``) and ``triton`` (``kernels/attention.py``:
float16/bfloat16/float32, head dimension ≤ 256).
"""
import torch
import torch.nn.functional as F

from .._framework import OpSpec, acc_dtype, check_real, define_op
from . import naive


def _triton_fwd(q, k, v, scale):
    from getfast.kernels import attention as K

    return K.attention_fwd(q, k, v, scale)


def _triton_bwd(do, q, k, v, out, lse, scale):
    from getfast.kernels import attention as K

    return K.attention_bwd(do, q, k, v, out, lse, scale)


def _check(dims, *args):
    check_real("scale", args[-1], positive=True)


def _setup(ctx, inputs, output):
    q, k, v, scale = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.scale = scale
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    if grad_out is None:  # only the (non-differentiable) log-sum-exp was used
        return None, None, None, None
    q, k, v, out, lse = ctx.saved_tensors
    grads = ATTENTION_BWD.from_backward(ctx, grad_out, q, k, v, out, lse, ctx.scale)
    return (*grads, None)


_HALF_AND_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
ATTENTION_BWD = define_op(OpSpec(
    schema="attention_bwd(Tensor do, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, float scale) "
           "-> (Tensor, Tensor, Tensor)",
    args={"do": "B H N d state strided", "q": "B H N d state strided", "k": "B H M d state strided",
          "v": "B H M d state strided", "out": "B H N d state strided", "lse": "B H N acc"},
    launchers={"reference": naive.backward, "triton": _triton_bwd},
    fake=lambda do, q, k, v, *rest: tuple(t.new_empty(t.shape) for t in (q, k, v)),
    check=_check, dtypes={"triton": _HALF_AND_FLOAT}, family="attention_fwd", grid_y=("B", "H"),
))
ATTENTION = define_op(OpSpec(
    schema="attention_fwd(Tensor q, Tensor k, Tensor v, float scale) -> (Tensor, Tensor)",
    args={"q": "B H N d state strided", "k": "B H M d state strided", "v": "B H M d state strided"},
    launchers={"reference": naive.forward, "triton": _triton_fwd},
    fake=lambda q, k, v, scale: (q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=acc_dtype(q.dtype))),
    check=_check, backward=(_setup, _backward), dtypes={"triton": _HALF_AND_FLOAT}, grid_y=("B", "H"),
    # the built-in the kernel must beat to become a default (no log-sum-exp: nothing downstream reads it)
    builtin=lambda q, k, v, scale: (F.scaled_dot_product_attention(q, k, v, scale=scale), None),
))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Non-causal attention ``softmax(q kᵀ · scale) v`` (Vaswani et al. 2017, Eq. 1).

    ``q``: ``(B, H, Nq, d)``; ``k``, ``v``: ``(B, H, Nk, d)``; one dtype and device; any strides;
    ``scale`` defaults to ``1/√d``. Runs SDPA unless a fused kernel was measured faster for this
    device (``getfast.ops.describe()``) or ``GETFAST_BACKEND`` forces one; differentiable.
    """
    if scale is None and isinstance(q, torch.Tensor) and q.dim():
        scale = q.shape[-1] ** -0.5
    return ATTENTION(q, k, v, scale)[0]
