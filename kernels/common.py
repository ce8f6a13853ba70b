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
