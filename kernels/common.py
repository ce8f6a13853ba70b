"""Helpers shared by the Triton kernels of every op family.

``INTERPRET`` is read once, when this module is imported: Triton decides at decoration time
whether a kernel is compiled or interpreted, so the flag must match what the kernels did.

Scalars: the compiled path types a Python ``float`` argument as fp32 while the interpreter keeps
it a double, so a float64 kernel fed ``tau=0.9`` would silently compute with
``0.89999998`` on a GPU only. Every floating-point scalar therefore travels as the int64 bit
pattern of the double (:func:`f64_bits`) and is rebuilt exactly in the kernel (:func:`scalar`).
"""
from __future__ import annotations

import os
import struct

import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
BLOCK = 1024  # elements per inner iteration of the streaming kernels


def f64_bits(x: float) -> int:
    """The IEEE-754 bit pattern of the double ``x`` as a signed int64 kernel argument."""
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


@triton.jit
def scalar(bits, ACC: tl.constexpr):
    """The double whose bit pattern is ``bits``, rounded once to ``ACC``."""
    return bits.to(tl.int64).to(tl.float64, bitcast=True).to(ACC)

@triton.jit
def residual_bookkeeping(ssg, ssf, eps_b, tol, step, STATUS, LOWEST, B, bo, bmask, ACC: tl.constexpr,
                         STOP_REL: tl.constexpr):
    """The per-sample stopping rule every solver step shares, from the squared norms ``ssg = ‖g‖²`` and
    ``ssf = ‖f(x)‖²`` (vectors over the block's samples): absolute and relative residual, the lowest so far
    and its step, the status (0 running, 1 converged: lowest < tol, 2 non-finite) and the trace entries (a
    frozen sample reports its lowest residuals if converged, inf if non-finite: torchdeq-style padding).
    Returns ``(status, improved, trace_abs, trace_rel, lowest_abs, lowest_rel, lowest_step)``; storing them is
    :func:`store_residuals`' (a kernel may have loads to finish first)."""
    abs_r = tl.sqrt(ssg)
    f_norm = tl.sqrt(ssf)
    fin = (abs_r == abs_r) & (tl.abs(abs_r) < float("inf")) & (f_norm == f_norm) & (tl.abs(f_norm) < float("inf"))
    rel_r = tl.where(fin, abs_r / (f_norm + scalar(eps_b, ACC)), float("inf"))
    abs_r = tl.where(fin, abs_r, float("inf"))
    st0 = tl.load(STATUS + bo, mask=bmask, other=1)
    running = st0 == 0
    lo_abs = tl.load(LOWEST + bo, mask=bmask, other=0.0)
    lo_rel = tl.load(LOWEST + B + bo, mask=bmask, other=0.0)
    lo_step = tl.load(LOWEST + 2 * B + bo, mask=bmask, other=0.0)
    if STOP_REL:
        improved = running & (rel_r < lo_rel)
    else:
        improved = running & (abs_r < lo_abs)
    new_lo_abs = tl.where(running, tl.minimum(lo_abs, abs_r), lo_abs)
    new_lo_rel = tl.where(running, tl.minimum(lo_rel, rel_r), lo_rel)
    if STOP_REL:
        new_lo = new_lo_rel
    else:
        new_lo = new_lo_abs
    st1 = tl.where(running & (~fin), 2, st0)
    st1 = tl.where(running & fin & (new_lo < tol), 1, st1)  # residuals are >= 0: tol < 0 never converges
    tr_abs = tl.where(running, abs_r, tl.where(st0 == 1, lo_abs, float("inf")))
    tr_rel = tl.where(running, rel_r, tl.where(st0 == 1, lo_rel, float("inf")))
    return st1, improved, tr_abs, tr_rel, new_lo_abs, new_lo_rel, tl.where(improved, step, lo_step)


@triton.jit
def store_residuals(TRACE, LOWEST, STATUS, B, T, k, bo, bmask, st1, tr_abs, tr_rel, lo_abs, lo_rel, lo_step):
    """Store what :func:`residual_bookkeeping` returned: trace column ``k``, the lowest residuals, the status."""
    bo64 = bo.to(tl.int64)
    tl.store(TRACE + bo64 * T + k, tr_abs, mask=bmask)
    tl.store(TRACE + (B + bo64) * T + k, tr_rel, mask=bmask)
    tl.store(LOWEST + bo, lo_abs, mask=bmask)
    tl.store(LOWEST + B + bo, lo_rel, mask=bmask)
    tl.store(LOWEST + 2 * B + bo, lo_step, mask=bmask)
    tl.store(STATUS + bo, st1, mask=bmask)


@triton.jit
def round_to(x, DTYPE: tl.constexpr, MANUAL_BF16: tl.constexpr):
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


def manual_bf16(dtype) -> bool:
    """Whether :func:`round_to` must round bf16 by hand (interpreter only)."""
    import torch

    return INTERPRET and dtype == torch.bfloat16
