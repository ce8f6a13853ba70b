"""Flash attention forward and backward in Triton (Dao et al. 2022, *FlashAttention*, Alg. 1;
Dao 2023, *FlashAttention-2*, Alg. 2), non-causal, over ``(B, H, N, d)`` tensors of any strides.

* forward: each program owns ``BLOCK_M`` queries and streams ``BLOCK_N`` keys/values with an
  online softmax in fp32; the softmax scale is folded into the base-2 exponent
  (``exp2(s·scale·log2 e − m)``, one fused multiply-add per score). It writes ``O`` and the row
  log-sum-exp in base 2 of the scaled scores, ``lse2``, which the backward reuses.
* backward: ``delta = rowsum(dO ∘ O)``, then each program owns ``BLOCK_N`` keys and walks every
  query tile once: ``P`` is recomputed from ``lse2`` once per tile pair, ``dV += Pᵀ dO``,
  ``dK += dSᵀ Q`` stay in registers and ``dQ += dS K`` is added atomically into an fp32 buffer —
  FlashAttention-2's schedule, so no score is recomputed twice (the order of the fp32 atomic
  additions makes ``dQ`` non-deterministic in its last bits on a GPU).

Sequence lengths need not divide the tiles (masked); head dimensions up to 256 are padded to a
power of two ≥ 16. Tiles are autotuned on a GPU (64/128 × 64/128, 4/8 warps, 2-4 stages) per
head dimension, dtype and power-of-two bucket of the sequence length, so a new length reuses the
tuned and compiled kernel (``GETFAST_QUICK_AUTOTUNE=1`` at import: 2 configurations, for quick benchmark
runs); under ``TRITON_INTERPRET=1`` there is one configuration, and every
``tl.dot`` operand is fp32 (the interpreter's half-precision ``tl.dot`` is wrong). fp32 inputs use
IEEE fp32 products (no TF32), half-precision inputs the tensor cores with fp32 accumulation.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

from .common import INTERPRET

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256


def _configs():
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if os.environ.get("GETFAST_QUICK_AUTOTUNE", "0") not in ("", "0"):  # quick benchmark/GPU-check runs: 2 of the 24
        return [triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=4, num_stages=3),
                triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2)]
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m in (64, 128) for n in (64, 128) for w in (4, 8) for s in (2, 3, 4)]


@triton.jit
def _load(base, rows, cols, s_row, s_col, mask_r, mask_c, FP32: tl.constexpr):
    """A (rows × cols) tile from a strided matrix, zero outside the masks, fp32 if asked."""
    t = tl.load(base + rows[:, None] * s_row + cols[None, :] * s_col, mask=mask_r[:, None] & mask_c[None, :], other=0.0)
    if FP32:
        t = t.to(tl.float32)
    return t


@triton.autotune(configs=_configs(), key=["N_BUCKET", "HEAD_DIM_P"])
@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _fwd_kernel(Q, K, V, O, LSE, qk_scale, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd, s_vb, s_vh, s_vn, s_vd,
                H, N_Q, N_K, HEAD_DIM, N_BUCKET, HEAD_DIM_P: tl.constexpr, FP32: tl.constexpr,
                PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h = bh // H, bh % H
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_m, mask_d = offs_m < N_Q, offs_d < HEAD_DIM
    q = _load(Q + b.to(tl.int64) * s_qb + h * s_qh, offs_m, offs_d, s_qn, s_qd, mask_m, mask_d, FP32)
    k_base = K + b.to(tl.int64) * s_kb + h * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h * s_vh
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N_K
        kt = _load(k_base, offs_d, offs_n, s_kd, s_kn, mask_d, mask_n, FP32)  # Kᵀ tile (d × BLOCK_N)
        s = tl.where(mask_n[None, :], tl.dot(q, kt, input_precision=PREC), float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)  # every tile holds a valid key: finite
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load(v_base, offs_n, offs_d, s_vn, s_vd, mask_n, mask_d, FP32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PREC)
        m_i = m_new
    rows = bh.to(tl.int64) * N_Q + offs_m  # O and LSE are contiguous
    o_ptrs = O + rows[:, None] * HEAD_DIM + offs_d[None, :]
    tl.store(o_ptrs, (acc / l_i[:, None]).to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    tl.store(LSE + rows, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit
def _delta_kernel(O, DO, DELTA, s_db, s_dh, s_dn, s_dd, H, N_Q, HEAD_DIM, HEAD_DIM_P: tl.constexpr,
                  BLOCK_M: tl.constexpr):
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_m, mask_d = offs_m < N_Q, offs_d < HEAD_DIM
    o = _load(O + bh.to(tl.int64) * N_Q * HEAD_DIM, offs_m, offs_d, HEAD_DIM, 1, mask_m, mask_d, True)
    do = _load(DO + (bh // H).to(tl.int64) * s_db + (bh % H) * s_dh, offs_m, offs_d, s_dn, s_dd, mask_m, mask_d, True)
    tl.store(DELTA + bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=mask_m)


@triton.autotune(configs=_configs(), key=["N_BUCKET", "HEAD_DIM_P"], reset_to_zero=["DQ"])
@triton.jit(do_not_specialize=["N_Q", "N_K"])
def _bwd_kernel(Q, K, V, DO, LSE, DELTA, DQ, DK, DV, scale, qk_scale, s_qb, s_qh, s_qn, s_qd, s_kb, s_kh, s_kn, s_kd,
                s_vb, s_vh, s_vn, s_vd, s_db, s_dh, s_dn, s_dd, H, N_Q, N_K, HEAD_DIM, N_BUCKET,
                HEAD_DIM_P: tl.constexpr, FP32: tl.constexpr, PREC: tl.constexpr, BLOCK_M: tl.constexpr,
                BLOCK_N: tl.constexpr):
    bh = tl.program_id(1)
    b, h = (bh // H).to(tl.int64), bh % H
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_n, mask_d = offs_n < N_K, offs_d < HEAD_DIM
    k = _load(K + b * s_kb + h * s_kh, offs_n, offs_d, s_kn, s_kd, mask_n, mask_d, FP32)
    v = _load(V + b * s_vb + h * s_vh, offs_n, offs_d, s_vn, s_vd, mask_n, mask_d, FP32)
    q_base, do_base = Q + b * s_qb + h * s_qh, DO + b * s_db + h * s_dh
    rows0 = bh.to(tl.int64) * N_Q  # LSE, DELTA and DQ are contiguous
    dk = tl.zeros([BLOCK_N, HEAD_DIM_P], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_P], dtype=tl.float32)
    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < N_Q
        qt = _load(q_base, offs_d, offs_m, s_qd, s_qn, mask_d, mask_m, FP32)  # Qᵀ tile (d × BLOCK_M)
        do = _load(do_base, offs_m, offs_d, s_dn, s_dd, mask_m, mask_d, FP32)
        lse = tl.load(LSE + rows0 + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + rows0 + offs_m, mask=mask_m, other=0.0)
        pt = tl.math.exp2(tl.dot(k, qt, input_precision=PREC) * qk_scale - lse[None, :])  # Pᵀ (BLOCK_N × BLOCK_M)
        pt = tl.where(mask_n[:, None] & mask_m[None, :], pt, 0.0)
        dv += tl.dot(pt.to(do.dtype), do, input_precision=PREC)
        dst = pt * (tl.dot(v, tl.trans(do), input_precision=PREC) - delta[None, :])  # dSᵀ
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt), input_precision=PREC)
        dq = tl.dot(tl.trans(dst).to(k.dtype), k, input_precision=PREC) * scale
        tl.atomic_add(DQ + (rows0 + offs_m)[:, None] * HEAD_DIM + offs_d[None, :], dq,
                      mask=mask_m[:, None] & mask_d[None, :])
    out = (bh.to(tl.int64) * N_K + offs_n)[:, None] * HEAD_DIM + offs_d[None, :]  # DK, DV contiguous
    tl.store(DK + out, (dk * scale).to(DK.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])
    tl.store(DV + out, dv.to(DV.dtype.element_ty), mask=mask_n[:, None] & mask_d[None, :])


def _args(q: torch.Tensor):
    d = q.shape[-1]
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q: head dimension {d} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    fp32 = INTERPRET or q.dtype == torch.float32
    return dict(HEAD_DIM_P=max(16, triton.next_power_of_2(d)), FP32=fp32, PREC="ieee" if fp32 else "tf32")


def _device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float):
    """``(out, lse2)``: ``out`` (B, H, Nq, d) contiguous in the input dtype, ``lse2`` (B, H, Nq)
    fp32, the base-2 log-sum-exp of the scaled scores."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    out = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    with _device(q):
        _fwd_kernel[lambda meta: (triton.cdiv(NQ, meta["BLOCK_M"]), B * H)](
            q, k, v, out, lse, float(scale) * LOG2E, *q.stride(), *k.stride(), *v.stride(), H, NQ, NK, D,
            min(triton.next_power_of_2(max(NQ, NK)), 1 << 16), **_args(q))
    return out, lse


def attention_bwd(do, q, k, v, out, lse, scale: float):
    """``(dq, dk, dv)`` (contiguous, the inputs' dtypes) from the forward's ``out`` (contiguous)
    and ``lse2``."""
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    do = do.to(q.dtype)
    out, lse = out.contiguous(), lse.contiguous()
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    dq = torch.zeros((B, H, NQ, D), dtype=torch.float32, device=q.device)
    dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=q.device)
    dv = torch.empty((B, H, NK, D), dtype=v.dtype, device=q.device)
    args = _args(q)
    with _device(q):
        _delta_kernel[(triton.cdiv(NQ, 32), B * H)](out, do, delta, *do.stride(), H, NQ, D,
                                                   HEAD_DIM_P=args["HEAD_DIM_P"], BLOCK_M=32)
        _bwd_kernel[lambda meta: (triton.cdiv(NK, meta["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dq, dk, dv, float(scale), float(scale) * LOG2E, *q.stride(), *k.stride(),
            *v.stride(), *do.stride(), H, NQ, NK, D, min(triton.next_power_of_2(max(NQ, NK)), 1 << 16), **args)
    return dq.to(q.dtype), dk, dv
