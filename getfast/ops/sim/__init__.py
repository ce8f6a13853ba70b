"""Fused SIM score-divergence surrogate ``getfast::sim_loss`` (Luo et al. 2024, *Score Implicit
Matching*, arXiv 2410.16794, §3: the generator loss with the pseudo-Huber distance).

Per sample ``b`` (flattened to N elements, ``s = σ_b²``, ``a = d_teacher``, ``f = d_fake``,
``g = x_g``, ``d = a − f``, ``w = f − g``): ``y = d/s``, ``r = √(‖y‖² + c²)``, ``P = y·w`` and
``loss = P/(r s)`` — ``u = y/r`` is ``d′(y)`` for ``d(y) = √(‖y‖²+c²) − c``, not detached.
Differentiating (``∂r/∂y = y/r``) with upstream ``G``: ``α = G/(r s²)``, ``β = α P/(r² s)``,

    grad_a = α w − β d,    grad_g = −α d,    grad_f = −grad_a − grad_g.

So the forward is one pass with two reductions (Σd², Σd·w) saving ``stats = (r, P)``, and the
backward one elementwise pass. σ and c are constants (SIM samples σ). Inputs float32/float64/
float16/bfloat16; the loss and stats are float32 (float64 for float64 inputs). Kernels:
``kernels/sim_loss.py`` (Triton), ``csrc/cpu/sim_loss.cpp``, ``csrc/cuda/sim_loss.cu``.
"""
import numpy as np
import torch

from .._framework import DTYPE_CODES, OpSpec, acc_dtype, check_real, define_op, load_C, stream_ptr
from . import naive

_HALF = (torch.float16, torch.bfloat16)
_CU_TYPES = {torch.float32: "float, float", torch.float64: "double, double", torch.float16: "__half, float",
             torch.bfloat16: "__nv_bfloat16, float"}


def _fwd_cpp(a, f, g, sigma, c):
    if a.dtype in _HALF:  # CPU half precision is a correctness path only: compute in float32
        a, f, g = a.float(), f.float(), g.float()
    B, acc = a.shape[0], a.dtype
    loss, stats = a.new_empty(B), a.new_empty((B, 2))
    if sigma.dtype != acc or not sigma.is_contiguous():
        sigma = sigma.to(acc).contiguous()  # kept alive until the call returns
    ptrs = [a.data_ptr(), f.data_ptr(), g.data_ptr(), sigma.data_ptr(), loss.data_ptr(), stats.data_ptr()]
    load_C().sim_loss_fwd_cpu(DTYPE_CODES[acc], ptrs, [B, a.numel() // B], [c])
    return loss, stats


def _bwd_cpp(grad, a, f, g, sigma, stats, c):
    half = a.dtype if a.dtype in _HALF else None
    if half:
        a, f, g = a.float(), f.float(), g.float()
    acc = stats.dtype
    ga, gf, gg = torch.empty_like(a), torch.empty_like(a), torch.empty_like(a)
    if grad.dtype != acc or not grad.is_contiguous():
        grad = grad.to(acc).contiguous()  # kept alive until the call returns
    if sigma.dtype != acc or not sigma.is_contiguous():
        sigma = sigma.to(acc).contiguous()
    ptrs = [grad.data_ptr(), a.data_ptr(), f.data_ptr(), g.data_ptr(), sigma.data_ptr(), stats.data_ptr(),
            ga.data_ptr(), gf.data_ptr(), gg.data_ptr()]
    load_C().sim_loss_bwd_cpu(DTYPE_CODES[acc], ptrs, [a.shape[0], a.numel() // a.shape[0]], [])
    return (ga.to(half), gf.to(half), gg.to(half)) if half else (ga, gf, gg)


def _positive(sigma) -> None:
    """σ > 0 checked on the device, no host sync (the C++ kernel raises a ValueError itself)."""
    torch._assert_async(torch.all(sigma > 0), "sim_loss: sigma must be > 0")


def _builtin(a, f, g, sigma, c):
    _positive(sigma)
    return naive.sim_loss(a, f, g, sigma, c), None


def _fwd_triton(a, f, g, sigma, c):
    from getfast.kernels import sim_loss as K

    _positive(sigma)
    acc = acc_dtype(a.dtype)
    loss, stats = a.new_empty(a.shape[0], dtype=acc), a.new_empty((a.shape[0], 2), dtype=acc)
    K.sim_loss_fwd(a, f, g, sigma.to(acc).contiguous(), c, loss, stats)
    return loss, stats


def _bwd_triton(grad, a, f, g, sigma, stats, c):
    from getfast.kernels import sim_loss as K

    out = tuple(torch.empty_like(a) for _ in range(3))
    K.sim_loss_bwd(grad.to(stats.dtype).contiguous(), a, f, g, sigma.to(stats.dtype).contiguous(), stats, *out)
    return out


def _cuda(kind: str, tensors: list, ints: list, reals: list, grid, dtype, device) -> None:
    """``sim_loss_<kind>`` through ``getfast._C``, or the same source JIT-compiled by CuPy; either way
    the kernel takes the tensors' pointers, then the ints, then the reals."""
    C = load_C(required=False)
    with torch.cuda.device(device):
        if C is not None and hasattr(C, f"sim_loss_{kind}_cuda") and C.cuda_device_count():
            getattr(C, f"sim_loss_{kind}_cuda")(DTYPE_CODES[dtype], [t.data_ptr() for t in tensors], ints, reals,
                                                 stream_ptr(device))
            return
        from .. import _cupy

        real = np.float64 if dtype == torch.float64 else np.float32
        args = (*tensors, *(np.int64(i) for i in ints), *(real(r) for r in reals))
        _cupy.launch("sim_loss", f"getfast::sim_loss_{kind}<{_CU_TYPES[dtype]}>", grid, (256,), args, device=device)


def _fwd_cuda(a, f, g, sigma, c):
    _positive(sigma)
    B, acc = a.shape[0], acc_dtype(a.dtype)
    loss, stats = a.new_empty(B, dtype=acc), a.new_empty((B, 2), dtype=acc)
    _cuda("fwd", [a, f, g, sigma.to(acc).contiguous(), loss, stats], [B, a.numel() // B], [c], (B,), a.dtype,
          a.device)
    return loss, stats


def _bwd_cuda(grad, a, f, g, sigma, stats, c):
    B, N, acc = a.shape[0], a.numel() // a.shape[0], stats.dtype
    out = tuple(torch.empty_like(a) for _ in range(3))
    _cuda("bwd", [grad.to(acc).contiguous(), a, f, g, sigma.to(acc).contiguous(), stats, *out], [B, N], [],
          (max(1, min(-(-N // 1024), 1 << 20)), min(B, 65535)), a.dtype, a.device)
    return out


def _check(dims, *args):
    check_real("c", args[-1], positive=True)


def _setup(ctx, inputs, output):
    a, f, g, sigma, c = inputs
    ctx.save_for_backward(a, f, g, sigma)
    ctx.stats, ctx.c = output[1], c  # non-differentiable: no reference back to the graph
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_loss, _grad_stats):
    if grad_loss is None:  # only the (non-differentiable) stats were used
        return None, None, None, None, None
    a, f, g, sigma = ctx.saved_tensors
    grads = SIM_LOSS_BACKWARD.from_backward(ctx, grad_loss, a, f, g, sigma, ctx.stats, ctx.c)
    return (*grads, None, None)


SIM_LOSS_BACKWARD = define_op(OpSpec(
    schema="sim_loss_backward(Tensor grad, Tensor d_teacher, Tensor d_fake, Tensor x_g, Tensor sigma, "
           "Tensor stats, float c) -> (Tensor, Tensor, Tensor)",
    args={"grad": "B float strided", "d_teacher": "B * state", "d_fake": "B * state", "x_g": "B * state",
          "sigma": "B float strided", "stats": "B 2 acc"},
    launchers={"reference": naive.backward, "triton": _bwd_triton, "cuda": _bwd_cuda, "cpp": _bwd_cpp},
    fake=lambda grad, a, f, g, *rest: (torch.empty_like(a), torch.empty_like(f), torch.empty_like(g)),
    check=_check, native={"cpp": "sim_loss_bwd_cpu", "cuda": "sim_loss_bwd_cuda"}, cupy=True, family="sim_loss",
))

SIM_LOSS = define_op(OpSpec(
    schema="sim_loss(Tensor d_teacher, Tensor d_fake, Tensor x_g, Tensor sigma, float c) -> (Tensor, Tensor)",
    args={"d_teacher": "B * state", "d_fake": "B * state", "x_g": "B * state", "sigma": "B float strided"},
    launchers={"reference": naive.forward, "triton": _fwd_triton, "cuda": _fwd_cuda, "cpp": _fwd_cpp},
    fake=lambda a, *rest: (a.new_empty(a.shape[:1], dtype=acc_dtype(a.dtype)),
                           a.new_empty((a.shape[0], 2), dtype=acc_dtype(a.dtype))),
    check=_check, backward=(_setup, _backward), native={"cpp": "sim_loss_fwd_cpu", "cuda": "sim_loss_fwd_cuda"},
    cupy=True,
    builtin=_builtin,  # eager PyTorch under autograd: what the fused kernels must beat to become a default
))


def sim_loss(d_teacher: torch.Tensor, d_fake: torch.Tensor, x_g: torch.Tensor, sigma, c: float) -> torch.Tensor:
    """Per-sample SIM generator surrogate with the pseudo-Huber distance (Luo et al. 2024, §3; the
    module docstring gives the loss and its hand-derived gradient).

    ``d_teacher``, ``d_fake``, ``x_g``: (B, ...) tensors of one float dtype and device; ``sigma``:
    (B,) tensor or a number, > 0; ``c`` > 0. Returns (B,) float32 (float64 for float64 inputs),
    differentiable w.r.t. the three tensors. Runs the fused kernel where it was measured faster
    than the eager composition (``getfast.ops.describe()``), else that composition.
    """
    if not isinstance(sigma, torch.Tensor):
        sigma = check_real("sigma", sigma, positive=True)
        if isinstance(d_teacher, torch.Tensor):
            sigma = torch.full(d_teacher.shape[:1], sigma, dtype=acc_dtype(d_teacher.dtype), device=d_teacher.device)
    return SIM_LOSS(d_teacher, d_fake, x_g, sigma, c)[0]


def sim_loss_reference(d_teacher, d_fake, x_g, sigma, c: float) -> torch.Tensor:
    """The eager composition (plain PyTorch + autograd) that :func:`sim_loss` fuses."""
    return naive.sim_loss(d_teacher, d_fake, x_g, sigma, c)
