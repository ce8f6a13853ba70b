"""Triton kernels for the SIM score-divergence surrogate (math: getfast/ops/sim/__init__.py).

Forward: one program per sample, looping over the sample's elements in blocks of ``BLOCK`` and
accumulating ``dd = Σ(a−f)²`` and ``dw = Σ(a−f)(f−g)`` in fp32 (fp64 for float64 inputs; the
accumulator type is that of ``sigma``, which the wrapper passes in the accumulation dtype).
Backward: a 2-D grid (sample, block) — elementwise once the per-sample stats (r, P) are known.

Under ``TRITON_INTERPRET=1`` (set before this module is imported) the kernels run on CPU
tensors; a single configuration is used on purpose (no autotune: it needs a driver).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import f64_bits, scalar

FWD_BLOCK = 1024
BWD_BLOCK = 1024


@triton.jit(do_not_specialize=["c_bits"])
def _sim_loss_fwd_kernel(a_ptr, f_ptr, g_ptr, sigma_ptr, c_bits, loss_ptr, stats_ptr, N,
                         BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    base = b * N
    acc_ty = sigma_ptr.dtype.element_ty
    offs = tl.arange(0, BLOCK)
    dd = tl.zeros([BLOCK], dtype=acc_ty)
    dw = tl.zeros([BLOCK], dtype=acc_ty)
    for start in range(0, N, BLOCK):
        idx = start + offs
        m = idx < N
        a = tl.load(a_ptr + base + idx, mask=m, other=0.0).to(acc_ty)
        f = tl.load(f_ptr + base + idx, mask=m, other=0.0).to(acc_ty)
        g = tl.load(g_ptr + base + idx, mask=m, other=0.0).to(acc_ty)
        d = a - f
        w = f - g
        dd += d * d
        dw += d * w
    dd_s = tl.sum(dd, axis=0)
    dw_s = tl.sum(dw, axis=0)
    sg = tl.load(sigma_ptr + b)
    c = scalar(c_bits, acc_ty)
    s = sg * sg
    r = tl.sqrt(dd_s / (s * s) + c * c)
    P = dw_s / s
    tl.store(loss_ptr + b, P / (r * s))
    tl.store(stats_ptr + 2 * b, r)
    tl.store(stats_ptr + 2 * b + 1, P)


@triton.jit
def _sim_loss_bwd_kernel(grad_ptr, a_ptr, f_ptr, g_ptr, sigma_ptr, stats_ptr, ga_ptr, gf_ptr, gg_ptr,
                         N, BLOCK: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1).to(tl.int64)
    acc_ty = sigma_ptr.dtype.element_ty
    out_ty = ga_ptr.dtype.element_ty
    sg = tl.load(sigma_ptr + b)
    s = sg * sg
    r = tl.load(stats_ptr + 2 * b)
    P = tl.load(stats_ptr + 2 * b + 1)
    G = tl.load(grad_ptr + b)
    alpha = G / (r * s * s)
    beta = alpha * P / (r * r * s)
    idx = blk * BLOCK + tl.arange(0, BLOCK)
    m = idx < N
    base = b * N
    a = tl.load(a_ptr + base + idx, mask=m, other=0.0).to(acc_ty)
    f = tl.load(f_ptr + base + idx, mask=m, other=0.0).to(acc_ty)
    g = tl.load(g_ptr + base + idx, mask=m, other=0.0).to(acc_ty)
    d = a - f
    w = f - g
    x = alpha * w - beta * d
    z = -alpha * d
    tl.store(ga_ptr + base + idx, x.to(out_ty), mask=m)
    tl.store(gg_ptr + base + idx, z.to(out_ty), mask=m)
    tl.store(gf_ptr + base + idx, (-x - z).to(out_ty), mask=m)


def sim_loss_fwd(a: torch.Tensor, f: torch.Tensor, g: torch.Tensor, sigma: torch.Tensor,
                 c: float, loss: torch.Tensor, stats: torch.Tensor) -> None:
    """Launch the forward. ``a, f, g``: contiguous (B, ...) inputs; ``sigma``, ``loss`` (B,) and
    ``stats`` (B, 2) in the accumulation dtype. Writes ``loss`` and ``stats``."""
    B = a.shape[0]
    N = a.numel() // B
    block = min(FWD_BLOCK, triton.next_power_of_2(N))
    _sim_loss_fwd_kernel[(B,)](a, f, g, sigma, f64_bits(c), loss, stats, N, BLOCK=block)


def sim_loss_bwd(grad: torch.Tensor, a: torch.Tensor, f: torch.Tensor, g: torch.Tensor,
                 sigma: torch.Tensor, stats: torch.Tensor, ga: torch.Tensor, gf: torch.Tensor,
                 gg: torch.Tensor) -> None:
    """Launch the backward; writes ``ga, gf, gg`` (input dtype) from ``grad`` (B,) and ``stats``."""
    B = a.shape[0]
    N = a.numel() // B
    block = min(BWD_BLOCK, triton.next_power_of_2(N))
    _sim_loss_bwd_kernel[(B, triton.cdiv(N, block))](grad, a, f, g, sigma, stats, ga, gf, gg, N, BLOCK=block)
