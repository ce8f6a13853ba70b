"""Explicit attention in fp32 (fp64 for fp64 inputs): the reference of ``getfast::attention_fwd``
and ``getfast::attention_bwd``, with the kernel's saved statistic (base-2 log-sum-exp)."""
import torch

from .._framework import acc_dtype

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


def forward(q, k, v, scale: float):
    """``(softmax(q kᵀ·scale) v, log2 Σ exp(q kᵀ·scale))``."""
    cd = acc_dtype(q.dtype)
    s = q.to(cd) @ k.to(cd).transpose(-1, -2) * scale
    lse = torch.logsumexp(s, dim=-1)
    return (torch.exp(s - lse[..., None]) @ v.to(cd)).to(q.dtype), lse * LOG2E


def backward(do, q, k, v, out, lse, scale: float):
    """``(dq, dk, dv)`` from the saved output and base-2 log-sum-exp (Dao 2023, Alg. 2)."""
    cd = acc_dtype(q.dtype)
    q_, k_, v_, do_ = q.to(cd), k.to(cd), v.to(cd), do.to(cd)
    p = torch.exp(q_ @ k_.transpose(-1, -2) * scale - (lse.to(cd) * LN2)[..., None])
    ds = p * (do_ @ v_.transpose(-1, -2) - (do_ * out.to(cd)).sum(-1, keepdim=True))
    return (ds @ k_ * scale).to(q.dtype), (ds.transpose(-1, -2) @ q_ * scale).to(k.dtype), \
        (p.transpose(-1, -2) @ do_).to(v.dtype)
