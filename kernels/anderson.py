"""Fused Anderson-acceleration step in Triton (Anderson 1965; Walker & Ni 2011).

Contract, buffer layouts and the plain-PyTorch reference: ``getfast/ops/anderson/``. Three
launches per iteration (``s = k % m``, ``n = min(k+1, m)``):

``_gram_kernel``   grid ``(nblk, B)``: streams its chunk of ``D`` once — ``g = fx − X[s]`` (stored to
                   ``G[s]`` in the state dtype) and partial sums of ``⟨G[s], G[j]⟩`` (``j < n``),
                   ``‖g‖²``, ``‖fx‖²`` into ``part[b, blk, :m+2]``.
``_solve_kernel``  grid ``(⌈B/BB⌉,)``: sums the partials, forms ``[H + λI | 1]`` in registers (old
                   ``H`` with the new row/column), Gauss-Jordan elimination without pivoting
                   (on this SPD matrix the pivots are the squared Cholesky diagonal of the
                   reference, tested against ``rtol`` × diagonal), ``α = w / Σw`` with the
                   per-sample fallback ``e_s``; writes the Gram row/column, ``trace[:, b, k]``, the
                   running minima, the step, ``status``, and ``α`` + flags to ``work``.
``_mix_kernel``    grid ``(nblk, B)``: one read of the live ``X``/``G`` history per element:
                   ``X[(k+1) % m] = Σ αⱼ (X[j] + τ G[j])`` (running) or ``X[s]`` (frozen), and
                   ``best = fx`` where the residual improved.

No ``tl.dot`` (all reductions are elementwise products + ``tl.sum``), no block pointers, no
autotuning: the same code runs under ``TRITON_INTERPRET=1`` on CPU tensors. Accumulation is
float32, float64 for float64 states.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .common import (BLOCK, INTERPRET, f64_bits, manual_bf16, residual_bookkeeping, round_to, scalar,
                     store_residuals)

__all__ = ["anderson_step"]

@triton.jit(do_not_specialize=["m", "B", "D", "s", "n", "CHUNK"])
def _gram_kernel(X, G, FX, PART, m, B, D, s, n, CHUNK, MP2: tl.constexpr, BLOCK: tl.constexpr,
                 MANUAL_BF16: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    nblk = tl.num_programs(0)
    ACC = PART.dtype.element_ty
    start = blk * CHUNK
    end = tl.minimum(start + CHUNK, D)
    offs_j = tl.arange(0, MP2)
    base = tl.arange(0, BLOCK)
    x_row = X + (s * B + b).to(tl.int64) * D
    g_row = G + (s * B + b).to(tl.int64) * D
    f_row = FX + b.to(tl.int64) * D
    dots = tl.zeros([MP2], dtype=ACC)
    ssg = tl.sum(tl.zeros([BLOCK], dtype=ACC), axis=0)
    ssf = tl.sum(tl.zeros([BLOCK], dtype=ACC), axis=0)
    for i0 in range(start, end, BLOCK):
        offs = i0 + base
        mask = offs < end
        x = tl.load(x_row + offs, mask=mask, other=0.0).to(ACC)
        f = tl.load(f_row + offs, mask=mask, other=0.0).to(ACC)
        g = f - x
        gst = round_to(g, G.dtype.element_ty, MANUAL_BF16)
        tl.store(g_row + offs, gst, mask=mask)
        gr = gst.to(ACC)  # the Gram uses the stored (rounded) residual
        ssg += tl.sum(g * g, axis=0)
        ssf += tl.sum(f * f, axis=0)
        for j in range(0, n):
            gj = tl.load(G + (j * B + b).to(tl.int64) * D + offs, mask=mask & (j != s), other=0.0).to(ACC)
            gj = tl.where(j == s, gr, gj)
            d = tl.sum(gr * gj, axis=0)
            dots += tl.where(offs_j == j, d, 0.0)
    dots = tl.where(offs_j == m, ssg, dots)
    dots = tl.where(offs_j == m + 1, ssf, dots)
    tl.store(PART + (b * nblk + blk).to(tl.int64) * (m + 2) + offs_j, dots, mask=offs_j < m + 2)


@triton.jit(do_not_specialize=["m", "B", "T", "k", "s", "n", "nblk", "lam_b", "tol_b", "rtol_b", "eps_b"])
def _solve_kernel(
    H, LOWEST, TRACE, STATUS, PART, WORK,
    m, B, T, k, s, n, nblk,
    lam_b, tol_b, rtol_b, eps_b,
    STOP_REL: tl.constexpr, MP: tl.constexpr, BB: tl.constexpr,
):
    # BB samples per program (1 on a GPU; the whole batch under the interpreter, where every
    # reduction is a slow Python call).
    ACC = H.dtype.element_ty
    lam = scalar(lam_b, ACC)
    tol = scalar(tol_b, ACC)
    rtol = scalar(rtol_b, ACC)
    step = (k + 1).to(ACC)
    bo = tl.program_id(0) * BB + tl.arange(0, BB)
    bmask = bo < B
    bo64 = bo.to(tl.int64)
    offs = tl.arange(0, MP)
    offw = tl.arange(0, 2 * MP)
    o2 = offs[None, :]
    w2 = offw[None, :]
    rowm = tl.zeros([BB, MP], dtype=ACC)
    roww = tl.zeros([BB, 2 * MP], dtype=ACC)
    ssg = tl.zeros([BB], dtype=ACC)
    ssf = tl.zeros([BB], dtype=ACC)
    for q in range(0, nblk):
        pb = PART + (bo64 * nblk + q) * (m + 2)
        rowm += tl.load(pb[:, None] + o2, mask=bmask[:, None] & (o2 < n), other=0.0)
        roww += tl.load(pb[:, None] + w2, mask=bmask[:, None] & (w2 < n), other=0.0)
        ssg += tl.load(pb + m, mask=bmask, other=0.0)
        ssf += tl.load(pb + m + 1, mask=bmask, other=0.0)

    # ---- residuals and bookkeeping (vectors over the BB samples) ----
    st1, improved, tr_abs, tr_rel, new_lo_abs, new_lo_rel, new_step = residual_bookkeeping(
        ssg, ssf, eps_b, tol, step, STATUS, LOWEST, B, bo, bmask, ACC, STOP_REL)
    still = st1 == 0

    # ---- small solve: Gauss-Jordan on [H + lam I | 1] (n x n block, identity padding) ----
    # Without pivoting on this SPD matrix the pivots equal the squared Cholesky diagonal of the
    # reference; a pivot <= rtol * diagonal (or a non-finite alpha) selects the plain step.
    ii = offs[None, :, None]
    jw = offw[None, None, :]
    b3 = bo64[:, None, None]
    valid = bmask[:, None, None] & (ii < n) & (jw < n)
    A = tl.load(H + b3 * m * m + ii * m + jw, mask=valid, other=0.0)
    A = tl.where((ii == s) & (jw < n), roww[:, None, :], A)
    A = tl.where((jw == s) & (ii < n), rowm[:, :, None], A)
    eye = ii == jw
    A = tl.where(valid, A + tl.where(eye, lam, 0.0), tl.where(eye, 1.0, 0.0))
    A = tl.where(jw == MP, tl.where(ii < n, 1.0, 0.0), A)  # right-hand side column
    thr = rtol * tl.sum(tl.where(eye, A, 0.0), axis=2)
    pivs = tl.zeros([BB, MP], dtype=ACC)
    for j in tl.static_range(MP):
        rowj = tl.sum(tl.where(ii == j, A, 0.0), axis=1)  # [BB, 2MP]
        colj = tl.sum(tl.where(jw == j, A, 0.0), axis=2)  # [BB, MP]
        piv = tl.sum(tl.where(o2 == j, colj, 0.0), axis=1)  # [BB]
        pivs = tl.where(o2 == j, piv[:, None], pivs)
        fac = tl.where(o2 != j, colj / piv[:, None], 0.0)
        A = A - fac[:, :, None] * rowj[:, None, :]
    diag = tl.sum(tl.where(eye, A, 0.0), axis=2)
    rhs = tl.sum(tl.where(jw == MP, A, 0.0), axis=2)
    w = tl.where(o2 < n, rhs / diag, 0.0)
    alpha = w / tl.sum(w, axis=1)[:, None]
    bad = tl.where(o2 < n, (~(pivs > thr)) | (alpha != alpha) | (tl.abs(alpha) == float("inf")), False)
    ok = tl.sum(bad.to(tl.int32), axis=1) == 0
    alpha = tl.where(ok[:, None], alpha, tl.where(o2 == s, 1.0, 0.0))
    flags = tl.where(still, 1.0, 0.0) + tl.where(improved, 2.0, 0.0)

    # ---- all stores after every load of H (no write-after-read race across threads) ----
    tl.debug_barrier()
    hb = H + bo64[:, None] * m * m
    hmask = bmask[:, None] & (o2 < n)
    tl.store(hb + s * m + o2, rowm, mask=hmask)
    tl.store(hb + o2 * m + s, rowm, mask=hmask)
    store_residuals(TRACE, LOWEST, STATUS, B, T, k, bo, bmask, st1, tr_abs, tr_rel, new_lo_abs, new_lo_rel, new_step)
    wb = WORK + bo64 * (m + 1)
    tl.store(wb[:, None] + o2, alpha.to(ACC), mask=hmask & still[:, None])
    tl.store(wb + m, flags.to(ACC), mask=bmask)


@triton.jit(do_not_specialize=["m", "B", "D", "s", "nxt", "n", "CHUNK", "tau_b"])
def _mix_kernel(X, G, FX, BEST, WORK, m, B, D, s, nxt, n, CHUNK, tau_b, BLOCK: tl.constexpr,
                MANUAL_BF16: tl.constexpr):
    blk = tl.program_id(0)
    b = tl.program_id(1)
    ACC = WORK.dtype.element_ty
    tau = scalar(tau_b, ACC)
    wb = WORK + b.to(tl.int64) * (m + 1)
    fl = tl.load(wb + m).to(tl.int32)
    still = (fl & 1) != 0
    improved = (fl & 2) != 0
    start = blk * CHUNK
    end = tl.minimum(start + CHUNK, D)
    base = tl.arange(0, BLOCK)
    for i0 in range(start, end, BLOCK):
        offs = i0 + base
        mask = offs < end
        # best first: fx may alias X[s] (f returning its input)
        fv = tl.load(FX + b.to(tl.int64) * D + offs, mask=mask & improved, other=0.0)
        tl.store(BEST + b.to(tl.int64) * D + offs, fv, mask=mask & improved)
        acc = tl.zeros([BLOCK], dtype=ACC)
        for j in range(0, n):
            aj = tl.load(wb + j)
            row = (j * B + b).to(tl.int64) * D
            xj = tl.load(X + row + offs, mask=mask & still, other=0.0).to(ACC)
            gj = tl.load(G + row + offs, mask=mask & still, other=0.0).to(ACC)
            acc += aj * (xj + tau * gj)
        xs = tl.load(X + (s * B + b).to(tl.int64) * D + offs, mask=mask & (~still), other=0.0)
        out = tl.where(still, round_to(acc, X.dtype.element_ty, MANUAL_BF16), xs)
        tl.store(X + (nxt * B + b).to(tl.int64) * D + offs, out, mask=mask & (still | (nxt != s)))


def anderson_step(X, G, H, best, lowest, trace, status, fx, k, tau, lam, tol, stop_rel, rtol, eps, nblk, chunk):
    """Launch the three kernels for iteration ``k``: ``nblk`` programs of ``chunk`` elements (a
    multiple of ``BLOCK``) per sample; buffers validated by the caller."""
    m, B, D = X.shape
    T = trace.shape[2]
    s, n, nxt = k % m, min(k + 1, m), (k + 1) % m
    acc = H.dtype
    part = torch.empty(B, nblk, m + 2, dtype=acc, device=X.device)
    work = torch.empty(B, m + 1, dtype=acc, device=X.device)
    mp2 = triton.next_power_of_2(m + 2)
    mp = max(2, triton.next_power_of_2(m))
    bb = min(16, triton.next_power_of_2(B)) if INTERPRET else 1
    manual = manual_bf16(X.dtype)
    _gram_kernel[(nblk, B)](X, G, fx, part, m, B, D, s, n, chunk, MP2=mp2, BLOCK=BLOCK, MANUAL_BF16=manual)
    _solve_kernel[(triton.cdiv(B, bb),)](H, lowest, trace, status, part, work, m, B, T, k, s, n, nblk,
                                          f64_bits(lam), f64_bits(tol), f64_bits(rtol), f64_bits(eps),
                                          STOP_REL=bool(stop_rel), MP=mp, BB=bb)
    _mix_kernel[(nblk, B)](X, G, fx, best, work, m, B, D, s, nxt, n, chunk, f64_bits(tau), BLOCK=BLOCK,
                           MANUAL_BF16=manual)
