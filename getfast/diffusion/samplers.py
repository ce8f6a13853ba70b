"""Samplers: EDM Euler/Heun (Karras et al. 2022, Algorithms 1-2) and DDIM in VP form (Song et al. 2021).

Every sampler takes a denoiser ``D(x, sigma, class_labels, cfg_scale=...)`` and the initial noise
``z ~ N(0, I)`` and returns images. A one-step student is ``steps=1``.

The noise levels are Python floats computed on the host, so a sampler never reads a device value: on a GPU
a fixed-step sampler can be captured whole in a CUDA graph (:mod:`getfast.sampling.graphs`).
"""
from __future__ import annotations

import math

import torch

from getfast.options import check_number


def edm_sigmas(steps: int, sigma_min: float = 0.002, sigma_max: float = 80.0, rho: float = 7.0, device=None):
    """Time steps of EDM Eq. 5, with a final 0 appended: σ_0 = σ_max > ... > σ_{N-1} = σ_min, σ_N = 0."""
    if steps == 1:
        return torch.tensor([sigma_max, 0.0], dtype=torch.float64, device=device)
    i = torch.arange(steps, dtype=torch.float64, device=device)
    t = (sigma_max ** (1 / rho) + i / (steps - 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([t, torch.zeros(1, dtype=torch.float64, device=device)])


def _sigma_list(steps: int, sigma_min: float, sigma_max: float, rho: float) -> list[float]:
    """:func:`edm_sigmas` as host floats (the values of the CPU float64 schedule)."""
    check_number("steps", steps, lo=1, integer=True, option=False)
    return edm_sigmas(steps, sigma_min, sigma_max, rho).tolist()


def _call(D, x, sigma, class_labels, cfg_scale):
    sig = torch.full((x.shape[0],), float(sigma), device=x.device)
    kw = {} if cfg_scale is None else {"cfg_scale": cfg_scale}
    return D(x, sig, class_labels, **kw).to(torch.float64)


@torch.no_grad()
def heun(D, z, steps: int = 18, class_labels=None, cfg_scale=None, sigma_min=0.002, sigma_max=80.0, rho=7.0,
         S_churn: float = 0.0, S_min: float = 0.0, S_max: float = float("inf"), S_noise: float = 1.0, generator=None):
    """EDM's 2nd-order sampler (Algorithm 2): 2·steps − 1 network evaluations (35 for 18 steps)."""
    t_steps = _sigma_list(steps, sigma_min, sigma_max, rho)
    x_next = z.to(torch.float64) * t_steps[0]
    for i, (t_cur, t_next) in enumerate(zip(t_steps[:-1], t_steps[1:])):
        x_cur = x_next
        # Churn: temporarily raise the noise level (γ = 0 gives the deterministic ODE sampler).
        gamma = min(S_churn / steps, math.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur + gamma * t_cur
        if gamma > 0:
            eps = torch.randn(x_cur.shape, generator=generator, device=z.device, dtype=torch.float64)
            x_hat = x_cur + math.sqrt(t_hat**2 - t_cur**2) * S_noise * eps
        else:
            x_hat = x_cur
        d_cur = (x_hat - _call(D, x_hat.to(z.dtype), t_hat, class_labels, cfg_scale)) / t_hat
        x_next = x_hat + (t_next - t_hat) * d_cur
        if i < steps - 1 and t_next > 0:
            d_prime = (x_next - _call(D, x_next.to(z.dtype), t_next, class_labels, cfg_scale)) / t_next
            x_next = x_hat + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(z.dtype)


@torch.no_grad()
def euler(D, z, steps: int = 18, class_labels=None, cfg_scale=None, sigma_min=0.002, sigma_max=80.0, rho=7.0):
    """EDM's 1st-order ODE sampler: ``steps`` network evaluations. ``steps=1`` is a one-step generator."""
    t_steps = _sigma_list(steps, sigma_min, sigma_max, rho)
    x = z.to(torch.float64) * t_steps[0]
    for t_cur, t_next in zip(t_steps[:-1], t_steps[1:]):
        d = (x - _call(D, x.to(z.dtype), t_cur, class_labels, cfg_scale)) / t_cur
        x = x + (t_next - t_cur) * d
    return x.to(z.dtype)


# --- DDIM in the variance-preserving parameterisation, for progressive distillation -------------
# z_t = α_t x + σ_t ε with α_t² + σ_t² = 1, cosine schedule (Nichol & Dhariwal 2021) on t ∈ [0, 1].
# An EDM denoiser is reused through σ_EDM = σ_t/α_t and x_EDM = z_t/α_t.

def vp_alpha_sigma(t: torch.Tensor):
    """Cosine schedule: α_t = cos(πt/2), σ_t = sin(πt/2). t=1 is pure noise."""
    t = t.clamp(0, 1)
    return torch.cos(0.5 * math.pi * t), torch.sin(0.5 * math.pi * t)


def vp_denoise(D, z_t, t, class_labels=None, cfg_scale=None, **kw):
    """x̂(z_t) from an EDM denoiser. At t=1 (α=0) σ_EDM is capped at 80: the VP state is then ≈ pure noise."""
    a, s = vp_alpha_sigma(t)
    a = a.clamp(min=s * (1 / 80.0))  # σ/α ≤ 80 keeps the denoiser inside its training range
    a, s = a.reshape(-1, 1, 1, 1), s.reshape(-1, 1, 1, 1)
    extra = {} if cfg_scale is None else {"cfg_scale": cfg_scale}
    return D(z_t / a, (s / a).flatten(), class_labels, **extra, **kw)


def ddim_step(x_hat, z_t, t, t_next):
    """One deterministic DDIM step (Song et al. 2021, Eq. 12 with η=0) from t to t_next given x̂."""
    a, s = (v.reshape(-1, 1, 1, 1) for v in vp_alpha_sigma(t))
    a2, s2 = (v.reshape(-1, 1, 1, 1) for v in vp_alpha_sigma(t_next))
    eps_hat = (z_t - a * x_hat) / s.clamp(min=1e-8)
    return a2 * x_hat + s2 * eps_hat


@torch.no_grad()
def ddim(D, z, steps: int, class_labels=None, cfg_scale=None, **kw):
    """DDIM sampler with ``steps`` uniform steps in t from 1 to 0; ``steps`` network evaluations.

    A discrete-time teacher that defines ``scheduler_ddim`` (a diffusers UNet2DModel,
    :class:`getfast.importers.hf_diffusers.DiffusersDenoiser`) is stepped on its own scheduler's timesteps instead,
    as its pipeline does, so that ``--sampler ddim`` reproduces the pipeline's images."""
    check_number("steps", steps, lo=1, integer=True, option=False)
    native = getattr(D, "scheduler_ddim", None)
    if native is not None:
        if kw:
            raise ValueError(f"{', '.join(sorted(kw))}: not an input of a diffusers teacher's DDIM")
        return native(z, steps, class_labels, cfg_scale=cfg_scale)
    x = z
    ts = torch.linspace(1, 0, steps + 1, device=z.device)
    for t, t_next in zip(ts[:-1], ts[1:]):
        tb, tnb = t.expand(z.shape[0]), t_next.expand(z.shape[0])
        x_hat = vp_denoise(D, x, tb, class_labels, cfg_scale, **kw)
        x = ddim_step(x_hat, x, tb, tnb)
    return x


SAMPLERS = {"heun": heun, "euler": euler, "ddim": ddim}


def sample(D, z, sampler: str = "heun", **kw):
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; known: {sorted(SAMPLERS)}")
    return SAMPLERS[sampler](D, z, **kw)


def nfe(sampler: str, steps: int) -> int:
    """Network evaluations per sample (a CFG call counts as one batched evaluation)."""
    return 2 * steps - 1 if sampler == "heun" else steps
