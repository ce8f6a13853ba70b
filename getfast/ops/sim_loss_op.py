"""Fused SIM score-divergence surrogate (Luo et al. 2024, *Score Implicit Matching*, arXiv
2410.16794, generator loss with the pseudo-Huber distance; DESIGN.md "SIM").

For each sample ``b`` (flattened to N elements, ``s = σ_b²``)::

    y      = (d_teacher − d_fake) / s
    u      = y / √(‖y‖² + c²)                     # pseudo-Huber direction d′(y), NOT detached
    loss_b = Σ_i u_i · (d_fake_i − x_g_i) / s

Backward (derived by hand; the kernels implement exactly this). Write a = d_teacher,
f = d_fake, g = x_g, d = a − f, w = f − g, so y = d/s, r = √(‖y‖² + c²), P = y·w and
loss = P/(r·s). Then

    ∂loss/∂y = w/(r s) − P/(r s) · ∂r/∂y / r = w/(r s) − (P/(r³ s)) · y      (∂r/∂y = y/r)
    ∂loss/∂w = y/(r s)

and with ∂y/∂a = 1/s, ∂y/∂f = −1/s, ∂w/∂f = 1, ∂w/∂g = −1 and upstream gradient G_b:

    grad_a = G/(r s²) · w − G·P/(r³ s³) · d  =  α·w − β·d,    α = G/(r s²),  β = α·P/(r² s)
    grad_g = −G · y/(r s)                     = −α·d
    grad_f = −grad_a + G·y/(r s)              = −grad_a − grad_g

So the forward needs one pass (two reductions: Σd² and Σd·w) and saves the per-sample
``stats = (r, P)``; the backward is one elementwise pass. σ and c are treated as constants
(no gradient), as in SIM where σ is sampled.

Dtypes: inputs float32/float64/float16/bfloat16 (all three the same), ``sigma`` any float dtype
of shape (B,). Output (B,) float32 — float64 when the inputs are float64, so tests can compare
in float64. Accumulation in fp32 (fp64 for float64; the cpp backend always accumulates in
double). On the cpp backend float16/bfloat16 inputs are upcast to float32 (one copy) and the
gradients cast back: CPU half precision is not a performance path, only a correctness one.
"""
from __future__ import annotations

import numpy as np
import torch

from ._framework import (
    BACKENDS,
    acc_dtype,
    check_same_device,
    check_same_shape,
    check_scalar,
    check_tensor,
    current_stream_ptr,
    dtype_code,
    load_C,
    register_op,
    select_backend,
)

__all__ = ["sim_loss", "sim_loss_reference", "forward", "backward", "OP_NAME"]

OP_NAME = "sim_loss"
register_op(
    OP_NAME,
    backends=BACKENDS,
    cuda_preference=("triton", "cuda"),
    cpu_preference=("cpp",),
    cuda_symbol="sim_loss_fwd_cuda",
    cpp_symbol="sim_loss_fwd_cpu",
    triton_module="getfast.kernels.sim_loss",
)

_IN_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CUDA_THREADS = 256  # SIM_LOSS_THREADS in csrc/cuda/sim_loss.cu
_CUDA_ITEMS = 4  # SIM_LOSS_ITEMS
_SUFFIX = {torch.float32: "f32", torch.float64: "f64", torch.float16: "f16", torch.bfloat16: "bf16"}


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
def _validate(d_teacher, d_fake, x_g, sigma, c) -> tuple[int, int, float]:
    """Check the arguments; returns (B, N, c). Raises ValueError naming the bad argument."""
    check_tensor("d_teacher", d_teacher, dtypes=_IN_DTYPES, ndim_min=1)
    check_tensor("d_fake", d_fake, dtypes=(d_teacher.dtype,), ndim_min=1)
    check_tensor("x_g", x_g, dtypes=(d_teacher.dtype,), ndim_min=1)
    check_same_device(d_teacher=d_teacher, d_fake=d_fake, x_g=x_g, sigma=sigma)
    check_same_shape(d_teacher=d_teacher, d_fake=d_fake, x_g=x_g)
    B = d_teacher.shape[0]
    check_tensor("sigma", sigma, dtypes=_IN_DTYPES, shape=(B,), contiguous=False)
    c = check_scalar("c", c, positive=True)
    return B, d_teacher.numel() // B, c


# --------------------------------------------------------------------------------------
# reference (plain PyTorch)
# --------------------------------------------------------------------------------------
def sim_loss_reference(d_teacher, d_fake, x_g, sigma, c) -> torch.Tensor:
    """Plain-PyTorch SIM surrogate, differentiable by autograd (the ground truth in tests and
    the eager baseline in benchmarks). Same signature and output as :func:`sim_loss`."""
    B, _, c = _validate(d_teacher, d_fake, x_g, sigma, c)
    acc = acc_dtype(d_teacher.dtype)
    a, f, g = (t.to(acc) for t in (d_teacher, d_fake, x_g))
    s = sigma.to(acc) ** 2
    y = (a - f) / s.view(B, *([1] * (a.dim() - 1)))
    norm = torch.sqrt(y.reshape(B, -1).pow(2).sum(1) + c * c)
    u = y / norm.view(B, *([1] * (a.dim() - 1)))
    return (u * (f - g)).reshape(B, -1).sum(1) / s


def _fwd_reference(a, f, g, sigma, c, loss, stats):
    B = a.shape[0]
    acc = loss.dtype
    a2, f2, g2 = (t.reshape(B, -1).to(acc) for t in (a, f, g))
    s = sigma.to(acc) ** 2
    d = a2 - f2
    w = f2 - g2
    r = torch.sqrt((d * d).sum(1) / (s * s) + c * c)
    P = (d * w).sum(1) / s
    loss.copy_(P / (r * s))
    stats[:, 0].copy_(r)
    stats[:, 1].copy_(P)


def _bwd_reference(grad, a, f, g, sigma, stats, ga, gf, gg):
    B = a.shape[0]
    acc = stats.dtype
    a2, f2, g2 = (t.reshape(B, -1).to(acc) for t in (a, f, g))
    s = (sigma.to(acc) ** 2)[:, None]
    r, P = stats[:, 0:1], stats[:, 1:2]
    alpha = grad.to(acc)[:, None] / (r * s * s)
    beta = alpha * P / (r * r * s)
    d = a2 - f2
    x = alpha * (f2 - g2) - beta * d
    z = -alpha * d
    ga.copy_(x.view_as(ga))
    gg.copy_(z.view_as(gg))
    gf.copy_((-x - z).view_as(gf))


# --------------------------------------------------------------------------------------
# cpp (getfast._C, csrc/cpu/sim_loss.cpp)
# --------------------------------------------------------------------------------------
def _fwd_cpp(a, f, g, sigma, c, loss, stats):
    C = load_C()
    if a.dtype in (torch.float16, torch.bfloat16):  # documented: upcast on CPU
        a, f, g = (t.float() for t in (a, f, g))
    B = a.shape[0]
    C.sim_loss_fwd_cpu(dtype_code(a.dtype), a.data_ptr(), f.data_ptr(), g.data_ptr(), sigma.data_ptr(),
                       c, B, a.numel() // B, loss.data_ptr(), stats.data_ptr())


def _bwd_cpp(grad, a, f, g, sigma, stats, ga, gf, gg):
    C = load_C()
    outs = (ga, gf, gg)
    if a.dtype in (torch.float16, torch.bfloat16):
        a, f, g = (t.float() for t in (a, f, g))
        outs = tuple(torch.empty_like(a) for _ in range(3))
    B = a.shape[0]
    C.sim_loss_bwd_cpu(dtype_code(a.dtype), grad.data_ptr(), a.data_ptr(), f.data_ptr(), g.data_ptr(),
                       sigma.data_ptr(), stats.data_ptr(), B, a.numel() // B,
                       outs[0].data_ptr(), outs[1].data_ptr(), outs[2].data_ptr())
    if outs[0] is not ga:
        for dst, src in zip((ga, gf, gg), outs):
            dst.copy_(src)


# --------------------------------------------------------------------------------------
# triton (kernels/sim_loss.py)
# --------------------------------------------------------------------------------------
def _fwd_triton(a, f, g, sigma, c, loss, stats):
    from getfast.kernels import sim_loss as K

    c_t = torch.full((1,), c, dtype=loss.dtype, device=a.device)
    K.sim_loss_fwd(a, f, g, sigma, c_t, loss, stats)


def _bwd_triton(grad, a, f, g, sigma, stats, ga, gf, gg):
    from getfast.kernels import sim_loss as K

    K.sim_loss_bwd(grad, a, f, g, sigma, stats, ga, gf, gg)


# --------------------------------------------------------------------------------------
# cuda (csrc/cuda/sim_loss.cu via getfast._C, or via CuPy/NVRTC)
# --------------------------------------------------------------------------------------
def _use_C_cuda() -> bool:
    C = load_C(required=False)
    return C is not None and hasattr(C, "sim_loss_fwd_cuda") and C.cuda_device_count() > 0


def _np_acc(x: float, dtype: torch.dtype):
    return np.float64(x) if dtype == torch.float64 else np.float32(x)


def _fwd_cuda(a, f, g, sigma, c, loss, stats):
    B = a.shape[0]
    N = a.numel() // B
    with torch.cuda.device(a.device):
        if _use_C_cuda():
            load_C().sim_loss_fwd_cuda(dtype_code(a.dtype), a.data_ptr(), f.data_ptr(), g.data_ptr(),
                                       sigma.data_ptr(), c, B, N, loss.data_ptr(), stats.data_ptr(),
                                       current_stream_ptr(a.device))
            return
        from . import _cupy

        _cupy.launch("sim_loss", f"sim_loss_fwd_{_SUFFIX[a.dtype]}", (B,), (_CUDA_THREADS,),
                     (a, f, g, sigma, _np_acc(c, loss.dtype), np.int64(N), loss, stats), device=a.device)


def _bwd_cuda(grad, a, f, g, sigma, stats, ga, gf, gg):
    B = a.shape[0]
    N = a.numel() // B
    with torch.cuda.device(a.device):
        if _use_C_cuda():
            load_C().sim_loss_bwd_cuda(dtype_code(a.dtype), grad.data_ptr(), a.data_ptr(), f.data_ptr(),
                                       g.data_ptr(), sigma.data_ptr(), stats.data_ptr(), B, N,
                                       ga.data_ptr(), gf.data_ptr(), gg.data_ptr(), current_stream_ptr(a.device))
            return
        from . import _cupy

        per_block = _CUDA_THREADS * _CUDA_ITEMS
        chunks = max(1, min((N + per_block - 1) // per_block, 1 << 20))
        _cupy.launch("sim_loss", f"sim_loss_bwd_{_SUFFIX[a.dtype]}", (chunks, min(B, 65535)), (_CUDA_THREADS,),
                     (grad, a, f, g, sigma, stats, np.int64(B), np.int64(N), ga, gf, gg), device=a.device)


_FWD = {"reference": _fwd_reference, "cpp": _fwd_cpp, "triton": _fwd_triton, "cuda": _fwd_cuda}
_BWD = {"reference": _bwd_reference, "cpp": _bwd_cpp, "triton": _bwd_triton, "cuda": _bwd_cuda}


def forward(d_teacher, d_fake, x_g, sigma, c, *, backend: str | None = None, out=None):
    """Run the forward on one backend (``None``: :func:`select_backend`). Returns ``(loss, stats)``
    with ``stats[:, 0] = r = √(‖y‖²+c²)`` and ``stats[:, 1] = P = y·(d_fake−x_g)``.
    ``out=(loss, stats)`` writes into given buffers (tests poison them with NaN first)."""
    B, _, c = _validate(d_teacher, d_fake, x_g, sigma, c)
    backend = backend or select_backend(OP_NAME, d_teacher.device)
    acc = acc_dtype(d_teacher.dtype)
    sig = sigma.to(acc).contiguous()
    if out is None:
        loss = torch.empty(B, dtype=acc, device=d_teacher.device)
        stats = torch.empty(B, 2, dtype=acc, device=d_teacher.device)
    else:
        loss, stats = out
        check_tensor("out[0]", loss, dtypes=(acc,), device=d_teacher.device, shape=(B,))
        check_tensor("out[1]", stats, dtypes=(acc,), device=d_teacher.device, shape=(B, 2))
    _FWD[backend](d_teacher, d_fake, x_g, sig, c, loss, stats)
    return loss, stats


def backward(grad, d_teacher, d_fake, x_g, sigma, stats, c, *, backend: str | None = None, out=None):
    """Gradients ``(grad_d_teacher, grad_d_fake, grad_x_g)`` from ``grad`` (B,) and the forward's
    ``stats``, on one backend. ``out`` as in :func:`forward`."""
    B, _, c = _validate(d_teacher, d_fake, x_g, sigma, c)
    acc = acc_dtype(d_teacher.dtype)
    check_tensor("grad", grad, device=d_teacher.device, shape=(B,), contiguous=False)
    check_tensor("stats", stats, dtypes=(acc,), device=d_teacher.device, shape=(B, 2))
    backend = backend or select_backend(OP_NAME, d_teacher.device)
    sig = sigma.to(acc).contiguous()
    grad = grad.to(acc).contiguous()
    if out is None:
        out = tuple(torch.empty_like(d_teacher) for _ in range(3))
    else:
        for i, t in enumerate(out):
            check_tensor(f"out[{i}]", t, dtypes=(d_teacher.dtype,), device=d_teacher.device,
                         shape=tuple(d_teacher.shape))
    _BWD[backend](grad, d_teacher, d_fake, x_g, sig, stats, *out)
    return out


# --------------------------------------------------------------------------------------
# torch.library custom ops
# --------------------------------------------------------------------------------------
@torch.library.custom_op("getfast::sim_loss", mutates_args=())
def _sim_loss_op(d_teacher: torch.Tensor, d_fake: torch.Tensor, x_g: torch.Tensor, sigma: torch.Tensor,
                 c: float) -> tuple[torch.Tensor, torch.Tensor]:
    loss, stats = forward(d_teacher, d_fake, x_g, sigma, c)
    return loss, stats


@_sim_loss_op.register_fake
def _(d_teacher, d_fake, x_g, sigma, c):
    B, _, _ = _validate(d_teacher, d_fake, x_g, sigma, c)
    acc = acc_dtype(d_teacher.dtype)
    return d_teacher.new_empty((B,), dtype=acc), d_teacher.new_empty((B, 2), dtype=acc)


@torch.library.custom_op("getfast::sim_loss_backward", mutates_args=())
def _sim_loss_backward_op(grad: torch.Tensor, d_teacher: torch.Tensor, d_fake: torch.Tensor, x_g: torch.Tensor,
                          sigma: torch.Tensor, stats: torch.Tensor,
                          c: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ga, gf, gg = backward(grad, d_teacher, d_fake, x_g, sigma, stats, c)
    return ga, gf, gg


@_sim_loss_backward_op.register_fake
def _(grad, d_teacher, d_fake, x_g, sigma, stats, c):
    _validate(d_teacher, d_fake, x_g, sigma, c)
    return torch.empty_like(d_teacher), torch.empty_like(d_fake), torch.empty_like(x_g)


def _setup_context(ctx, inputs, output):
    d_teacher, d_fake, x_g, sigma, c = inputs
    _, stats = output
    ctx.save_for_backward(d_teacher, d_fake, x_g, sigma, stats)
    ctx.c = c
    ctx.mark_non_differentiable(stats)


def _backward(ctx, grad_loss, grad_stats):
    d_teacher, d_fake, x_g, sigma, stats = ctx.saved_tensors
    ga, gf, gg = torch.ops.getfast.sim_loss_backward(grad_loss.contiguous(), d_teacher, d_fake, x_g, sigma,
                                                     stats, ctx.c)
    return ga, gf, gg, None, None


_sim_loss_op.register_autograd(_backward, setup_context=_setup_context)


def sim_loss(d_teacher: torch.Tensor, d_fake: torch.Tensor, x_g: torch.Tensor, sigma: torch.Tensor,
             c: float) -> torch.Tensor:
    """Per-sample SIM generator surrogate with the pseudo-Huber distance (Luo et al. 2024,
    arXiv 2410.16794, Eq. for ∇L with d(y)=√(‖y‖²+c²)−c; see the module docstring).

    ``d_teacher``, ``d_fake``, ``x_g``: (B, ...) tensors of one float dtype and device;
    ``sigma``: (B,); ``c`` > 0. Returns (B,) float32 (float64 for float64 inputs),
    differentiable w.r.t. the three tensors. Backend chosen by ``GETFAST_BACKEND`` or the device.
    """
    _, _, c = _validate(d_teacher, d_fake, x_g, sigma, c)
    return torch.ops.getfast.sim_loss(d_teacher, d_fake, x_g, sigma, c)[0]
