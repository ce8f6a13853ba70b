"""The fused Broyden iteration in Triton (Broyden 1965; Bai et al. 2019, §3.1.3).

Contract, buffers and the plain-PyTorch reference: ``getfast/ops/broyden/``. Three launches,
``P = 3·mem + 4`` values per sample:

``_sdots_kernel``    grid ``(nblk, B)``: partial ``aⱼ = ⟨Uⱼ, Δx⟩``, ``bⱼ = ⟨Vⱼ, Δg⟩``, ``cⱼ = ⟨Vⱼ, g⟩``,
                     ``‖g‖²``, ``‖f‖²``, ``⟨Δx, Δg⟩``, ``⟨Δx, g⟩`` over the program's chunk
``_sscal_kernel``    grid ``(⌈B/BB⌉,)``: sums the partials, bookkeeping, ``vᵀΔg``, ``vᵀg``, validity
``_supdate_kernel``  grid ``(nblk, B)``: the new pair into slot ``s``, ``B g`` with the new memory,
                     ``x ← x − B g``, ``Δx``, ``g_prev``, ``best``

No ``tl.dot``, no block pointers, no autotuning: runs under ``TRITON_INTERPRET=1`` on CPU tensors.
Accumulation is float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (BLOCK, INTERPRET, f64_bits, manual_bf16, residual_bookkeeping, round_to, scalar,
                     store_residuals)

__all__ = ["lowrank", "broyden_step"]

@triton.jit(do_not_specialize=["mem", "B", "D", "n", "CHUNK"])
def _sdots_kernel(X, FX, U, V, GP, DX, PART, mem, B, D, n, CHUNK, NP: tl.constexpr, BLOCK: tl.constexpr,
                  MANUAL_BF16: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    nblk = tl.num_programs(0)
    ACC = PART.dtype.element_ty
    P = 3 * mem + 4
    offs_j = tl.arange(0, NP)
    base = tl.arange(0, BLOCK)
    start = blk * CHUNK
    end = tl.minimum(start + CHUNK, D)
    row = b.to(tl.int64) * D
    va = tl.zeros([NP], dtype=ACC)
    vb = tl.zeros([NP], dtype=ACC)
    vc = tl.zeros([NP], dtype=ACC)
    sg = tl.sum(tl.zeros([BLOCK], dtype=ACC), axis=0)
    sf = sg
    sxg = sg
    sxs = sg
    for i0 in range(start, end, BLOCK):
        offs = i0 + base
        mask = offs < end
        f = tl.load(FX + row + offs, mask=mask, other=0.0).to(ACC)
        g = f - tl.load(X + row + offs, mask=mask, other=0.0).to(ACC)
        gs = round_to(g, X.dtype.element_ty, MANUAL_BF16).to(ACC)
        dg = gs - tl.load(GP + row + offs, mask=mask, other=0.0).to(ACC)
        d = tl.load(DX + row + offs, mask=mask, other=0.0).to(ACC)
        sg += tl.sum(g * g, axis=0)
        sf += tl.sum(f * f, axis=0)
        sxg += tl.sum(d * dg, axis=0)
        sxs += tl.sum(d * gs, axis=0)
        for j in range(0, n):
            hist = (j * B + b).to(tl.int64) * D + offs
            uu = tl.load(U + hist, mask=mask, other=0.0).to(ACC)
            vv = tl.load(V + hist, mask=mask, other=0.0).to(ACC)
            va += tl.where(offs_j == j, tl.sum(uu * d, axis=0), 0.0)
            vb += tl.where(offs_j == j, tl.sum(vv * dg, axis=0), 0.0)
            vc += tl.where(offs_j == j, tl.sum(vv * gs, axis=0), 0.0)
    out = PART + (b * nblk + blk).to(tl.int64) * P
    jm = offs_j < n
    tl.store(out + offs_j, va, mask=jm)
    tl.store(out + mem + offs_j, vb, mask=jm)
    tl.store(out + 2 * mem + offs_j, vc, mask=jm)
    tl.store(out + 3 * mem, sg)
    tl.store(out + 3 * mem + 1, sf)
    tl.store(out + 3 * mem + 2, sxg)
    tl.store(out + 3 * mem + 3, sxs)


@triton.jit(do_not_specialize=["mem", "B", "T", "k", "n", "s", "nblk", "tol_b", "eps_b"])
def _sscal_kernel(LOWEST, TRACE, STATUS, PART, COEF, mem, B, T, k, n, s, nblk, tol_b, eps_b,
                  FULL: tl.constexpr, STOP_REL: tl.constexpr, NP: tl.constexpr, BB: tl.constexpr):
    ACC = LOWEST.dtype.element_ty
    tol = scalar(tol_b, ACC)
    step = (k + 1).to(ACC)
    P = 3 * mem + 4
    bo = tl.program_id(0) * BB + tl.arange(0, BB)
    bmask = bo < B
    bo64 = bo.to(tl.int64)
    o2 = tl.arange(0, NP)[None, :]
    jm = bmask[:, None] & (o2 < n)
    a = tl.zeros([BB, NP], dtype=ACC)
    bq = tl.zeros([BB, NP], dtype=ACC)
    c = tl.zeros([BB, NP], dtype=ACC)
    ssg = tl.zeros([BB], dtype=ACC)
    ssf = tl.zeros([BB], dtype=ACC)
    sxg = tl.zeros([BB], dtype=ACC)
    sxs = tl.zeros([BB], dtype=ACC)
    for q in range(0, nblk):
        pb = PART + (bo64 * nblk + q) * P
        a += tl.load(pb[:, None] + o2, mask=jm, other=0.0)
        bq += tl.load(pb[:, None] + mem + o2, mask=jm, other=0.0)
        c += tl.load(pb[:, None] + 2 * mem + o2, mask=jm, other=0.0)
        ssg += tl.load(pb + 3 * mem, mask=bmask, other=0.0)
        ssf += tl.load(pb + 3 * mem + 1, mask=bmask, other=0.0)
        sxg += tl.load(pb + 3 * mem + 2, mask=bmask, other=0.0)
        sxs += tl.load(pb + 3 * mem + 3, mask=bmask, other=0.0)

    # ---- bookkeeping (common.residual_bookkeeping, as anderson_step; candidate = the iterate x) ----
    st1, improved, tr_abs, tr_rel, new_lo_abs, new_lo_rel, new_step = residual_bookkeeping(
        ssg, ssf, eps_b, tol, step, STATUS, LOWEST, B, bo, bmask, ACC, STOP_REL)
    still = st1 == 0

    # ---- the rank-one update's scalars ----
    den = tl.sum(a * bq, axis=1) - sxg
    vg = tl.sum(a * c, axis=1) - sxs
    nonfin = (a != a) | (tl.abs(a) == float("inf")) | (bq != bq) | (tl.abs(bq) == float("inf")) \
        | (c != c) | (tl.abs(c) == float("inf"))
    ok = (tl.sum(tl.where(jm, nonfin, False).to(tl.int32), axis=1) == 0) & (k > 0)
    ok = ok & (den == den) & (tl.abs(den) < float("inf")) & (den != 0) & (vg == vg) & (tl.abs(vg) < float("inf"))
    if FULL:
        c = tl.where(o2 == s, 0.0, c)  # slot s leaves the memory
    inv_den = tl.where(ok, 1.0 / tl.where(ok, den, 1.0), 0.0)
    vg_ok = tl.where(ok, vg, 0.0)
    flags = tl.where(still, 1.0, 0.0) + tl.where(improved, 2.0, 0.0) + tl.where(ok, 4.0, 0.0)

    store_residuals(TRACE, LOWEST, STATUS, B, T, k, bo, bmask, st1, tr_abs, tr_rel, new_lo_abs, new_lo_rel, new_step)
    cb = COEF + bo64 * P
    tl.store(cb[:, None] + o2, a, mask=jm)
    tl.store(cb[:, None] + mem + o2, bq, mask=jm)
    tl.store(cb[:, None] + 2 * mem + o2, c, mask=jm)
    tl.store(cb + 3 * mem, inv_den.to(ACC), mask=bmask)
    tl.store(cb + 3 * mem + 1, vg_ok.to(ACC), mask=bmask)
    tl.store(cb + 3 * mem + 2, flags.to(ACC), mask=bmask)


@triton.jit(do_not_specialize=["mem", "B", "D", "k", "n", "s", "CHUNK"])
def _supdate_kernel(X, FX, U, V, GP, DX, BEST, COEF, mem, B, D, k, n, s, CHUNK, BLOCK: tl.constexpr,
                    MANUAL_BF16: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    ACC = COEF.dtype.element_ty
    SDT = X.dtype.element_ty
    P = 3 * mem + 4
    cb = COEF + b.to(tl.int64) * P
    fl = tl.load(cb + 3 * mem + 2).to(tl.int32)
    still = (fl & 1) != 0
    improved = (fl & 2) != 0
    ok = (fl & 4) != 0
    inv_den = tl.load(cb + 3 * mem)
    vg = tl.load(cb + 3 * mem + 1)
    start = blk * CHUNK
    end = tl.minimum(start + CHUNK, D)
    base = tl.arange(0, BLOCK)
    row = b.to(tl.int64) * D
    slot = (s * B + b).to(tl.int64) * D
    for i0 in range(start, end, BLOCK):
        offs = i0 + base
        mask = offs < end
        xraw = tl.load(X + row + offs, mask=mask, other=0.0)
        xo = xraw.to(ACC)
        g = tl.load(FX + row + offs, mask=mask, other=0.0).to(ACC) - xo
        gsr = round_to(g, SDT, MANUAL_BF16)
        gs = gsr.to(ACC)
        dg = gs - tl.load(GP + row + offs, mask=mask, other=0.0).to(ACC)
        d = tl.load(DX + row + offs, mask=mask, other=0.0).to(ACC)
        v = -d
        bdg = -dg
        bg = -gs
        for j in range(0, n):
            hist = (j * B + b).to(tl.int64) * D + offs
            uu = tl.load(U + hist, mask=mask, other=0.0).to(ACC)
            vv = tl.load(V + hist, mask=mask, other=0.0).to(ACC)
            v += tl.load(cb + j) * vv
            bdg += tl.load(cb + mem + j) * uu
            bg += tl.load(cb + 2 * mem + j) * uu
        tl.store(BEST + row + offs, xraw, mask=mask & improved)  # before x moves
        u = tl.where(ok, (d - bdg) * inv_den, 0.0)  # an invalid pair is stored as zeros
        v = tl.where(ok, v, 0.0)
        bg += vg * u
        kmask = mask & (k > 0)
        tl.store(U + slot + offs, round_to(u, SDT, MANUAL_BF16), mask=kmask)
        tl.store(V + slot + offs, round_to(v, SDT, MANUAL_BF16), mask=kmask)
        xn = tl.where(still, round_to(xo - bg, SDT, MANUAL_BF16), xraw)
        tl.store(DX + row + offs, round_to(xn.to(ACC) - xo, SDT, MANUAL_BF16), mask=mask)
        tl.store(GP + row + offs, gsr, mask=mask)
        tl.store(X + row + offs, xn, mask=mask)


def broyden_step(x, U, V, g_prev, dx, best, lowest, trace, status, fx, k, tol, stop_rel, eps, nblk, chunk):
    """Launch the three kernels of one Broyden iteration: ``nblk`` programs of ``chunk`` elements
    per sample; buffers validated by the caller."""
    mem, B, D = U.shape
    T = trace.shape[2]
    n = min(k - 1, mem) if k > 0 else 0
    s = (k - 1) % mem if k > 0 else 0
    full = k > 0 and k - 1 >= mem
    acc = lowest.dtype
    P = 3 * mem + 4
    part = torch.empty(B, nblk, P, dtype=acc, device=x.device)
    coef = torch.empty(B, P, dtype=acc, device=x.device)
    npow = max(2, triton.next_power_of_2(max(n, 1)))
    bb = min(16, triton.next_power_of_2(B)) if INTERPRET else 1
    manual = manual_bf16(x.dtype)
    _sdots_kernel[(nblk, B)](x, fx, U, V, g_prev, dx, part, mem, B, D, n, chunk, NP=npow, BLOCK=BLOCK,
                             MANUAL_BF16=manual)
    _sscal_kernel[(triton.cdiv(B, bb),)](lowest, trace, status, part, coef, mem, B, T, k, n, s, nblk,
                                         f64_bits(tol), f64_bits(eps), FULL=bool(full), STOP_REL=bool(stop_rel),
                                         NP=npow, BB=bb)
    _supdate_kernel[(nblk, B)](x, fx, U, V, g_prev, dx, best, coef, mem, B, D, k, n, s, chunk, BLOCK=BLOCK,
                               MANUAL_BF16=manual)
