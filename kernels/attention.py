"""Flash attention (forward and backward) in Triton.

Non-causal scaled dot-product attention over tensors shaped ``(B, H, N, d)``, computed
tile by tile with an online softmax (Dao et al., *FlashAttention*, 2022; *FlashAttention-2*,
2023, Alg. 1 for the forward and Alg. 2 for the backward):

* forward: for each tile of ``BLOCK_M`` queries, stream tiles of ``BLOCK_N`` keys/values,
  keep the running row maximum ``m``, the running normaliser ``l`` and the un-normalised
  output in fp32; write ``O = acc / l`` and the row log-sum-exp ``lse`` (saved for backward);
* backward: ``delta = rowsum(dO * O)``; one kernel owns a tile of keys and accumulates
  ``dK``, ``dV`` over all query tiles, another owns a tile of queries and accumulates
  ``dQ`` over all key tiles (no atomics, deterministic).

The log-sum-exp is stored in base 2 and in "scaled" units: ``lse2 = log2(sum_j 2^(s_ij))``
with ``s_ij = (q_i . k_j) * scale * log2(e)``; :func:`lse_to_natural` converts it.

Any sequence length is supported (rows/columns past ``N`` are masked at tile edges) and any
head dimension up to 256 (padded to the next power of two >= 16 with a mask on the feature
axis). Inputs may have arbitrary strides. Accumulation is always fp32.

Under ``TRITON_INTERPRET=1`` the kernels run on CPU tensors; the interpreter's bf16/fp16
``tl.dot`` is wrong, so there (``DOT_FP32``) all ``tl.dot`` operands are cast to fp32. On a GPU,
half-precision operands go to the tensor cores directly, with fp32 accumulation.
"""
from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

__all__ = ["attention_fwd", "attention_bwd", "lse_to_natural", "INTERPRET"]

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453
MAX_HEAD_DIM = 256


def _configs(kind: str):
    # The interpreter (and `triton.testing.do_bench` without a driver) cannot autotune over
    # several configs: keep exactly one there.
    if INTERPRET:
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=1)]
    if kind == "fwd":
        return [
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 64}, num_warps=8, num_stages=2),
            triton.Config({"BLOCK_M": 128, "BLOCK_N": 32}, num_warps=4, num_stages=3),
            triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=4, num_stages=3),
        ]
    return [
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 64}, num_warps=4, num_stages=2),
        triton.Config({"BLOCK_M": 64, "BLOCK_N": 128}, num_warps=8, num_stages=2),
        triton.Config({"BLOCK_M": 32, "BLOCK_N": 32}, num_warps=4, num_stages=3),
    ]


@triton.autotune(configs=_configs("fwd"), key=["N_Q", "N_K", "HEAD_DIM_P"])
@triton.jit
def _attn_fwd_kernel(
    Q, K, V, O, LSE,
    qk_scale,  # scale * log2(e)
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_ob, s_oh, s_on, s_od,
    H, N_Q, N_K, HEAD_DIM,
    HEAD_DIM_P: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM

    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh

    q = tl.load(
        q_base + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
        mask=mask_m[:, None] & mask_d[None, :], other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)

    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N_K
        # K^T tile: (HEAD_DIM_P, BLOCK_N)
        kt = tl.load(
            k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
            mask=mask_d[:, None] & mask_n[None, :], other=0.0,
        )
        if DOT_FP32:
            kt = kt.to(tl.float32)
        s = tl.dot(q, kt) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        # every tile holds at least one valid key, so m_new is finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            v_base + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
            mask=mask_n[:, None] & mask_d[None, :], other=0.0,
        )
        if DOT_FP32:
            v = v.to(tl.float32)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_ptrs = O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    # LSE is contiguous (B, H, N_Q), base 2, scaled units
    tl.store(LSE + pid_bh.to(tl.int64) * N_Q + offs_m, m_i + tl.math.log2(l_i), mask=mask_m)


@triton.jit
def _attn_bwd_preprocess(
    O, DO, DELTA,
    s_ob, s_oh, s_on, s_od,
    s_db, s_dh, s_dn, s_dd,
    H, N_Q, HEAD_DIM,
    HEAD_DIM_P: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask = (offs_m[:, None] < N_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(O + b.to(tl.int64) * s_ob + h.to(tl.int64) * s_oh + offs_m[:, None] * s_on + offs_d[None, :] * s_od,
                mask=mask, other=0.0).to(tl.float32)
    do = tl.load(DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh + offs_m[:, None] * s_dn + offs_d[None, :] * s_dd,
                 mask=mask, other=0.0).to(tl.float32)
    tl.store(DELTA + pid_bh.to(tl.int64) * N_Q + offs_m, tl.sum(o * do, 1), mask=offs_m < N_Q)


@triton.autotune(configs=_configs("bwd"), key=["N_Q", "N_K", "HEAD_DIM_P"])
@triton.jit
def _attn_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    scale, qk_scale,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dn, s_dd,  # dO
    s_gb, s_gh, s_gn, s_gd,  # dK and dV (same layout)
    H, N_Q, N_K, HEAD_DIM,
    HEAD_DIM_P: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program owns BLOCK_N keys; loops over all query tiles (transposed formulation)."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m0 = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_n = offs_n < N_K
    mask_d = offs_d < HEAD_DIM

    q_base = Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh
    do_base = DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh
    row_base = pid_bh.to(tl.int64) * N_Q

    k = tl.load(K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh + offs_n[:, None] * s_kn + offs_d[None, :] * s_kd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    v = tl.load(V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)

    dk = tl.zeros([BLOCK_N, HEAD_DIM_P], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_P], dtype=tl.float32)

    for start_m in range(0, N_Q, BLOCK_M):
        offs_m = start_m + offs_m0
        mask_m = offs_m < N_Q
        # Q^T and dO^T tiles: (HEAD_DIM_P, BLOCK_M)
        qt = tl.load(q_base + offs_m[None, :] * s_qn + offs_d[:, None] * s_qd,
                     mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        dot_ = tl.load(do_base + offs_m[None, :] * s_dn + offs_d[:, None] * s_dd,
                       mask=mask_d[:, None] & mask_m[None, :], other=0.0)
        if DOT_FP32:
            qt = qt.to(tl.float32)
            dot_ = dot_.to(tl.float32)
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        st = tl.dot(k, qt) * qk_scale  # (BLOCK_N, BLOCK_M)
        pt = tl.math.exp2(st - lse[None, :])
        pt = tl.where(mask_m[None, :], pt, 0.0)
        # dV += P^T dO
        dv += tl.dot(pt.to(dot_.dtype), tl.trans(dot_))
        # dP^T = V dO^T ; dS^T = P^T * (dP^T - delta)
        dpt = tl.dot(v, dot_)
        dst = pt * (dpt - delta[None, :])
        # dK += dS^T Q
        dk += tl.dot(dst.to(qt.dtype), tl.trans(qt))

    dk = dk * scale
    g_off = b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh + offs_n[:, None] * s_gn + offs_d[None, :] * s_gd
    mask_out = mask_n[:, None] & mask_d[None, :]
    tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=mask_out)
    tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=mask_out)


@triton.autotune(configs=_configs("bwd"), key=["N_Q", "N_K", "HEAD_DIM_P"])
@triton.jit
def _attn_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    scale, qk_scale,
    s_qb, s_qh, s_qn, s_qd,
    s_kb, s_kh, s_kn, s_kd,
    s_vb, s_vh, s_vn, s_vd,
    s_db, s_dh, s_dn, s_dd,
    s_gb, s_gh, s_gn, s_gd,
    H, N_Q, N_K, HEAD_DIM,
    HEAD_DIM_P: tl.constexpr,
    DOT_FP32: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """One program owns BLOCK_M queries; loops over all key tiles."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n0 = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_P)
    mask_m = offs_m < N_Q
    mask_d = offs_d < HEAD_DIM
    row_base = pid_bh.to(tl.int64) * N_Q

    k_base = K + b.to(tl.int64) * s_kb + h.to(tl.int64) * s_kh
    v_base = V + b.to(tl.int64) * s_vb + h.to(tl.int64) * s_vh

    q = tl.load(Q + b.to(tl.int64) * s_qb + h.to(tl.int64) * s_qh + offs_m[:, None] * s_qn + offs_d[None, :] * s_qd,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    do = tl.load(DO + b.to(tl.int64) * s_db + h.to(tl.int64) * s_dh + offs_m[:, None] * s_dn + offs_d[None, :] * s_dd,
                 mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)

    dq = tl.zeros([BLOCK_M, HEAD_DIM_P], dtype=tl.float32)
    for start_n in range(0, N_K, BLOCK_N):
        offs_n = start_n + offs_n0
        mask_n = offs_n < N_K
        kt = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * s_vn + offs_d[:, None] * s_vd,
                     mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        if DOT_FP32:
            kt = kt.to(tl.float32)
            vt = vt.to(tl.float32)
        s = tl.dot(q, kt) * qk_scale
        p = tl.math.exp2(s - lse[:, None])
        p = tl.where(mask_n[None, :], p, 0.0)
        dp = tl.dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt))

    dq = dq * scale
    tl.store(DQ + b.to(tl.int64) * s_gb + h.to(tl.int64) * s_gh + offs_m[:, None] * s_gn + offs_d[None, :] * s_gd,
             dq.to(DQ.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])


def _head_dim_p(d: int) -> int:
    if d > MAX_HEAD_DIM:
        raise ValueError(f"q: head dimension {d} > {MAX_HEAD_DIM} is not supported by the Triton kernel")
    return max(16, triton.next_power_of_2(d))


def _check_device(t: torch.Tensor) -> None:
    if t.device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "getfast attention: the Triton backend got CPU tensors but TRITON_INTERPRET=1 was not set "
            "before getfast.kernels was imported; set it (or use GETFAST_BACKEND=reference)"
        )


def _dot_fp32(q: torch.Tensor) -> bool:
    # interpreter: half-precision tl.dot is wrong -> always fp32 operands
    return INTERPRET or q.dtype == torch.float32


def attention_fwd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, out=None, lse=None):
    """Forward. ``q`` (B,H,Nq,d), ``k``/``v`` (B,H,Nk,d). Returns ``(out, lse2)``:
    ``out`` (B,H,Nq,d) in the input dtype, ``lse2`` (B,H,Nq) fp32 contiguous, base 2, scaled.
    ``out``/``lse`` may be given (preallocated; every element is written)."""
    _check_device(q)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    DP = _head_dim_p(D)
    if out is None:
        out = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    if lse is None:
        lse = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    assert out.shape == q.shape and lse.shape == (B, H, NQ) and lse.is_contiguous()

    def grid(meta):
        return (triton.cdiv(NQ, meta["BLOCK_M"]), B * H)

    with _device_ctx(q):
        _attn_fwd_kernel[grid](
            q, k, v, out, lse,
            float(scale) * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *out.stride(),
            H, NQ, NK, D,
            HEAD_DIM_P=DP, DOT_FP32=_dot_fp32(q),
        )
    return out, lse


def attention_bwd(do, q, k, v, out, lse, scale: float, dq=None, dk=None, dv=None):
    """Backward from the saved ``out`` and ``lse2``. Returns ``(dq, dk, dv)`` in the dtypes of
    ``q``, ``k``, ``v`` (contiguous unless preallocated ones are given; ``dk``/``dv`` must then
    share strides)."""
    _check_device(q)
    B, H, NQ, D = q.shape
    NK = k.shape[2]
    DP = _head_dim_p(D)
    delta = torch.empty((B, H, NQ), dtype=torch.float32, device=q.device)
    if dq is None:
        dq = torch.empty((B, H, NQ, D), dtype=q.dtype, device=q.device)
    if dk is None:
        dk = torch.empty((B, H, NK, D), dtype=k.dtype, device=q.device)
    if dv is None:
        dv = torch.empty((B, H, NK, D), dtype=v.dtype, device=q.device)
    assert dk.stride() == dv.stride(), "dk and dv must share strides"
    lse = lse.contiguous()
    if do.dtype != q.dtype:
        do = do.to(q.dtype)
    pre_block = 32 if INTERPRET else 64
    with _device_ctx(q):
        _attn_bwd_preprocess[(triton.cdiv(NQ, pre_block), B * H)](
            out, do, delta, *out.stride(), *do.stride(), H, NQ, D,
            HEAD_DIM_P=DP, BLOCK_M=pre_block,
        )
        _attn_bwd_dkdv_kernel[lambda m: (triton.cdiv(NK, m["BLOCK_N"]), B * H)](
            q, k, v, do, lse, delta, dk, dv,
            float(scale), float(scale) * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(),
            H, NQ, NK, D,
            HEAD_DIM_P=DP, DOT_FP32=_dot_fp32(q),
        )
        _attn_bwd_dq_kernel[lambda m: (triton.cdiv(NQ, m["BLOCK_M"]), B * H)](
            q, k, v, do, lse, delta, dq,
            float(scale), float(scale) * LOG2E,
            *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
            H, NQ, NK, D,
            HEAD_DIM_P=DP, DOT_FP32=_dot_fp32(q),
        )
    return dq, dk, dv


def lse_to_natural(lse2: torch.Tensor) -> torch.Tensor:
    """Convert the kernel's base-2 scaled log-sum-exp to ``logsumexp(q k^T * scale)``."""
    return lse2 * LN2


def _device_ctx(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
