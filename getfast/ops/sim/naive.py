"""Plain-PyTorch SIM surrogate: the eager composition the fused op replaces, and the reference
forward/backward of ``getfast::sim_loss`` (math in ``getfast/ops/sim/__init__.py``)."""
import torch

from .._framework import acc_dtype


def sim_loss(d_teacher, d_fake, x_g, sigma, c: float) -> torch.Tensor:
    """Per-sample ``u·(d_fake − x_g)/σ²`` with ``u = y/√(‖y‖²+c²)``, ``y = (d_teacher − d_fake)/σ²``,
    differentiable by autograd (the normaliser is not detached)."""
    B, acc = d_teacher.shape[0], acc_dtype(d_teacher.dtype)
    a, f, g = (t.reshape(B, -1).to(acc) for t in (d_teacher, d_fake, x_g))
    s = sigma.to(acc).square()[:, None]
    y = (a - f) / s
    u = y / torch.sqrt(y.square().sum(1, keepdim=True) + c * c)
    return (u * (f - g)).sum(1) / s[:, 0]


def forward(d_teacher, d_fake, x_g, sigma, c: float):
    """``(loss, stats)`` with ``stats = (r, P)`` per sample, as the fused kernels save them."""
    B, acc = d_teacher.shape[0], acc_dtype(d_teacher.dtype)
    a, f, g = (t.reshape(B, -1).to(acc) for t in (d_teacher, d_fake, x_g))
    s = sigma.to(acc).square()
    d = a - f
    r = torch.sqrt(d.square().sum(1) / s.square() + c * c)
    P = (d * (f - g)).sum(1) / s
    return P / (r * s), torch.stack([r, P], 1)


def backward(grad, d_teacher, d_fake, x_g, sigma, stats, c: float):
    """``(grad_d_teacher, grad_d_fake, grad_x_g)`` from the upstream ``grad`` (B,) and ``stats``."""
    B, acc = d_teacher.shape[0], stats.dtype
    a, f, g = (t.reshape(B, -1).to(acc) for t in (d_teacher, d_fake, x_g))
    s = sigma.to(acc).square()[:, None]
    r, P = stats[:, :1], stats[:, 1:]
    alpha = grad.to(acc)[:, None] / (r * s * s)
    d = a - f
    x = alpha * (f - g) - alpha * P / (r * r * s) * d
    z = -alpha * d
    return tuple(t.view(d_teacher.shape).to(d_teacher.dtype) for t in (x, -x - z, z))
