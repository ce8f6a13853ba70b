"""Broyden low-rank inverse-Jacobian products in Triton (Broyden 1965; Bai et al. 2019).

Contract and reference: ``getfast/ops/broyden.py``. One kernel pair serves both products,
``out_b = −x_b + Σⱼ<n Bmⱼ,b ⟨Aⱼ,b, x_b⟩`` (``(A, Bm) = (V, U)`` for ``(−I + U Vᵀ) x``, ``(U, V)`` for
``xᵀ (−I + U Vᵀ)``):

``_dots_kernel``    grid ``(nblk, B)``: partial ``⟨Aⱼ, x⟩`` over the program's chunk → ``part[b, blk, j]``
``_expand_kernel``  grid ``(nblk, B)``: sums its sample's partials (fixed order, deterministic)
                    into a ``[NP]`` vector, then ``out = −x + Σⱼ cⱼ Bmⱼ`` over its chunk.

No ``tl.dot``, no block pointers, no autotuning: runs under ``TRITON_INTERPRET=1`` on CPU tensors.
Accumulation is float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

__all__ = ["lowrank"]

BLOCK = 1024
CHUNK_TARGET = 4096
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@triton.jit
def _round_to(x, DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
    """Cast fp32/fp64 ``x`` to ``DTYPE`` rounding to nearest even. The interpreter truncates on
    fp32 -> bf16 casts, so there (``MANUAL_BF16``) the rounding is done on the bits."""
    if MANUAL_BF16:
        xf = x.to(tl.float32)
        u = xf.to(tl.uint32, bitcast=True)
        u = u + 0x7FFF + ((u >> 16) & 1)
        r = (u >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
        return tl.where(xf != xf, xf.to(tl.bfloat16), r)
    else:
        return x.to(DTYPE)


@triton.jit(do_not_specialize=["n", "B", "D", "CHUNK"])
def _dots_kernel(Am, X, PART, n, B, D, CHUNK, NP: tl.constexpr, BLOCK: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    nblk = tl.num_programs(0)
    ACC = PART.dtype.element_ty
    offs_j = tl.arange(0, NP)
    base = tl.arange(0, BLOCK)
    start = blk * CHUNK
    end = tl.minimum(start + CHUNK, D)
    x_row = X + b.to(tl.int64) * D
    dots = tl.zeros([NP], dtype=ACC)
    for i0 in range(start, end, BLOCK):
        offs = i0 + base
        mask = offs < end
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
        for j in range(0, n):
            a = tl.load(Am + (j * B + b).to(tl.int64) * D + offs, mask=mask, other=0.0).to(ACC)
            dots += tl.where(offs_j == j, tl.sum(a * x, axis=0), 0.0)
    tl.store(PART + (b * nblk + blk).to(tl.int64) * n + offs_j, dots, mask=offs_j < n)


@triton.jit(do_not_specialize=["n", "B", "D", "CHUNK"])
def _expand_kernel(Bm, X, OUT, PART, n, B, D, CHUNK, NP: tl.constexpr, BLOCK: tl.constexpr,
                   MANUAL_BF16: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    nblk = tl.num_programs(0)
    ACC = PART.dtype.element_ty
    offs_j = tl.arange(0, NP)
    c = tl.zeros([NP], dtype=ACC)
    for q in range(0, nblk):
        c += tl.load(PART + (b * nblk + q).to(tl.int64) * n + offs_j, mask=offs_j < n, other=0.0)
    base = tl.arange(0, BLOCK)
    start = blk * CHUNK
    end = tl.minimum(start + CHUNK, D)
    for i0 in range(start, end, BLOCK):
        offs = i0 + base
        mask = offs < end
        acc = -tl.load(X + b.to(tl.int64) * D + offs, mask=mask, other=0.0).to(ACC)
        for j in range(0, n):
            cj = tl.sum(tl.where(offs_j == j, c, 0.0), axis=0)
            v = tl.load(Bm + (j * B + b).to(tl.int64) * D + offs, mask=mask, other=0.0).to(ACC)
            acc += cj * v
        tl.store(OUT + b.to(tl.int64) * D + offs, _round_to(acc, OUT.dtype.element_ty, MANUAL_BF16), mask=mask)


def lowrank(A: torch.Tensor, Bm: torch.Tensor, x: torch.Tensor, n: int, out: torch.Tensor) -> None:
    """``out = −x + Σⱼ<n Bmⱼ ⟨Aⱼ, x⟩`` per sample (inputs validated by the caller)."""
    _, B, D = A.shape
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    nblk = min(256, max(1, triton.cdiv(D, CHUNK_TARGET)))
    chunk = triton.cdiv(triton.cdiv(D, nblk), BLOCK) * BLOCK
    nblk = triton.cdiv(D, chunk)
    npow = max(2, triton.next_power_of_2(max(n, 1)))
    part = torch.empty(B, nblk, max(n, 1), dtype=acc, device=x.device)
    if n > 0:
        _dots_kernel[(nblk, B)](A, x, part, n, B, D, chunk, NP=npow, BLOCK=BLOCK)
    _expand_kernel[(nblk, B)](Bm, x, out, part, n, B, D, chunk, NP=npow, BLOCK=BLOCK,
                              MANUAL_BF16=INTERPRET and x.dtype == torch.bfloat16)
