"""Gradients of deep equilibrium models.

A DEQ output ``z* = f(z*, x; θ)`` comes from a solver that runs without autograd
(:mod:`getfast.deq.solvers`). Training needs ``∂L/∂θ`` (and ``∂L/∂x``) anyway; this module gives
three ways plus two training losses:

:func:`phantom_grad`  ("unrolled" / phantom gradient; Geng et al. 2021, "On Training Implicit
                     Models", eq. 7–8): ``k`` differentiable damped steps
                     ``z ← (1 − τ) z + τ f(z)`` from the detached solver output (or, GET's recipe,
                     from the noise start), returning the supervised states.
:func:`ift`          implicit differentiation (Bai et al. 2019, "Deep Equilibrium Models", §3.1.2,
                     eq. 5–7): the output is ``f(z*)`` and its backward solves
                     ``w = Jᵀ w + ∂L/∂z*`` (``J = ∂f/∂z`` at ``z*``) with any registered solver,
                     with its own ``max_iter``/``tol``.
:func:`fp_correction` fixed-point correction loss ``Σₖ γ^(n−1−k) ℓ(zₖ, …)`` over a sequence of
                     states (Bai et al. 2022, "Deep Equilibrium Optical Flow Estimation", eq. 9;
                     GET uses γ = 0.8 over its 6 unrolled states).
:func:`jacobian_reg`  Hutchinson estimate of ``‖J‖_F²`` (Bai et al. 2021, "Stabilizing
                     Equilibrium Models by Jacobian Regularization", eq. 6) as a loss term.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import torch

from getfast.ops import acc_dtype
from getfast.options import check_number

from .solvers import get_solver

__all__ = ["phantom_grad", "unrolled", "ift", "fp_correction", "fp_correction_weights", "jacobian_reg"]

Tensor = torch.Tensor


# --------------------------------------------------------------------------------------
# phantom / unrolled gradient
# --------------------------------------------------------------------------------------
def phantom_grad(
    f: Callable[[Tensor], Tensor],
    z: Tensor,
    *,
    k: int = 1,
    tau: float = 1.0,
    supervise: str | Iterable[int] = "all",
    detach: bool = True,
) -> list[Tensor]:
    """Phantom (unrolled) gradient: ``k`` differentiable damped steps (Geng et al. 2021, eq. 8).

    ``z₀ = z`` (detached when ``detach``), ``zᵢ = (1 − τ) zᵢ₋₁ + τ f(zᵢ₋₁)`` for ``i = 1..k``; the
    gradient of any loss on the returned states is exactly autograd through these ``k`` steps.
    ``supervise``: ``"all"`` returns ``[z₁, …, z_k]`` (GET: 6 steps from the noise start, every
    state supervised), ``"last"`` returns ``[z_k]``, an iterable of 1-based step indices returns
    those states in increasing order.
    """
    if not callable(f):
        raise ValueError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(z, torch.Tensor):
        raise ValueError(f"z must be a torch.Tensor, got {type(z).__name__}")
    check_number("k", k, lo=1, integer=True, option=False)
    check_number("tau", tau, lo=0, lo_open=True, hi=1, option=False)
    if supervise == "all":
        keep = set(range(1, k + 1))
    elif supervise == "last":
        keep = {k}
    elif isinstance(supervise, str):
        raise ValueError(f"supervise must be 'all', 'last' or step indices, got {supervise!r}")
    else:
        keep = set()
        for i in supervise:
            check_number("supervise index", i, lo=1, hi=k, integer=True, option=False)
            keep.add(i)
        if not keep:
            raise ValueError("supervise must select at least one step")
    if detach:
        z = z.detach()
    out = []
    for i in range(1, k + 1):
        fz = f(z)
        z = fz if tau == 1.0 else tau * fz + (1.0 - tau) * z
        if i in keep:
            out.append(z)
    return out


unrolled = phantom_grad


# --------------------------------------------------------------------------------------
# implicit differentiation
# --------------------------------------------------------------------------------------
class _IFTBackward(torch.autograd.Function):
    """Identity forward; backward maps ``v`` to ``w = (I − Jᵀ)⁻¹ v`` by a fixed-point solve."""

    @staticmethod
    def forward(ctx, y, z_star, f, solve_fn, hook):
        ctx.f, ctx.solve_fn, ctx.hook = f, solve_fn, hook
        ctx.save_for_backward(z_star)
        return y.view_as(y)

    @staticmethod
    def backward(ctx, grad):
        (z_star,) = ctx.saved_tensors
        h = z_star.detach().requires_grad_()
        with torch.enable_grad():
            fh = ctx.f(h)
        grad = grad.contiguous()

        def adjoint(w: Tensor) -> Tensor:  # w ↦ Jᵀ w + v
            (jtw,) = torch.autograd.grad(fh, h, w, retain_graph=True)
            return jtw + grad

        w, stats = ctx.solve_fn(adjoint, torch.zeros_like(grad))
        if ctx.hook is not None:
            ctx.hook(stats)
        return w, None, None, None, None


def ift(
    f: Callable[[Tensor], Tensor],
    z_star: Tensor,
    *,
    solver: str = "fixed_point",
    stats_hook: Callable[[dict], None] | None = None,
    **solver_options,
) -> Tensor:
    """Implicit-function-theorem gradient (Bai et al. 2019, eq. 5–7).

    Returns ``y = f(z*)`` (one differentiable application of ``f`` at the detached ``z*``, which
    carries ``∂f/∂θ`` and ``∂f/∂x``). In the backward pass the incoming ``v = ∂L/∂y`` is replaced by
    the solution of ``w = Jᵀ w + v`` (``J = ∂f/∂z`` at ``z*``), found by ``solver`` (any name
    :func:`getfast.deq.solve` accepts) with ``solver_options`` (its own ``max_iter``, ``tol``,
    ``m``, …; options the solver does not take raise ``TypeError`` here, not in the backward).
    ``stats_hook(stats)`` receives the backward solver's
    statistics. For a contractive ``f`` this is the exact gradient of ``L(z*)`` up to the
    solver tolerances.
    """
    if not callable(f):
        raise ValueError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(z_star, torch.Tensor):
        raise ValueError(f"z_star must be a torch.Tensor, got {type(z_star).__name__}")
    solve_impl = get_solver(solver)
    _check_options(solve_impl, solver_options)

    def solve_fn(g, w0):
        return solve_impl(g, w0, **solver_options)

    z_star = z_star.detach()
    y = f(z_star)
    if not torch.is_grad_enabled() or not y.requires_grad:
        return y
    return _IFTBackward.apply(y, z_star, f, solve_fn, stats_hook)


def _check_options(solver: Callable, options: dict) -> None:
    import inspect

    try:
        sig = inspect.signature(solver)
    except (TypeError, ValueError):
        return
    params = sig.parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return
    names = {p.name for p in params if p.kind in (inspect.Parameter.KEYWORD_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)}
    unknown = sorted(set(options) - names)
    if unknown:
        raise TypeError(f"unknown solver option(s) for the IFT backward solve: {', '.join(unknown)}")


# --------------------------------------------------------------------------------------
# losses
# --------------------------------------------------------------------------------------
def fp_correction_weights(n: int, gamma: float = 0.8) -> list[float]:
    """``[γ^(n−1−k) for k in 0..n−1]``: the last state has weight 1."""
    check_number("n", n, lo=1, integer=True, option=False)
    check_number("gamma", gamma, lo=0, lo_open=True, option=False)
    return [float(gamma) ** (n - 1 - k) for k in range(n)]


def fp_correction(
    loss_fn: Callable[..., Tensor],
    states: Sequence[Tensor],
    *targets,
    gamma: float = 0.8,
) -> Tensor:
    """Fixed-point correction loss ``Σₖ γ^(n−1−k) · loss_fn(states[k], *targets)``.

    Bai et al. 2022 (eq. 9); GET supervises its 6 unrolled states with γ = 0.8 and an L1 loss.
    ``states`` is what :func:`phantom_grad` returns.
    """
    if not callable(loss_fn):
        raise ValueError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if isinstance(states, torch.Tensor) or len(states) == 0:
        raise ValueError("states must be a non-empty sequence of tensors")
    w = fp_correction_weights(len(states), gamma)
    total = None
    for wk, s in zip(w, states):
        term = wk * loss_fn(s, *targets)
        total = term if total is None else total + term
    return total


def jacobian_reg(
    fz: Tensor,
    z: Tensor,
    *,
    n_samples: int = 1,
    create_graph: bool = True,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Hutchinson estimate of ``‖∂f/∂z‖_F²`` per element (Bai et al. 2021, eq. 6).

    ``fz = f(z)`` must have been computed from ``z`` with autograd on. Returns
    ``mean over n_samples of ‖εᵀ J‖² / z.numel()`` with ``ε ~ N(0, I)`` (an unbiased estimate of
    ``Σ_b ‖J_b‖_F² / (B·D)``, the normalisation torchdeq uses). ``create_graph=True`` keeps it
    differentiable so it can be added to the training loss.
    """
    if not isinstance(fz, torch.Tensor) or not isinstance(z, torch.Tensor):
        raise ValueError("fz and z must be tensors")
    if fz.shape != z.shape:
        raise ValueError(f"fz must have the shape of z {tuple(z.shape)}, got {tuple(fz.shape)}")
    check_number("n_samples", n_samples, lo=1, integer=True, option=False)
    if not z.requires_grad:
        raise ValueError("z must require grad (compute fz = f(z) with z.requires_grad_())")
    total = None
    for i in range(n_samples):
        # drawn in float32 then cast (so a seeded run reproduces torchdeq's jac_reg noise)
        eps = torch.randn(fz.shape, dtype=torch.float32, device=fz.device, generator=generator).to(fz.dtype)
        (vjp,) = torch.autograd.grad(fz, z, eps, retain_graph=True, create_graph=create_graph)
        term = vjp.to(acc_dtype(vjp.dtype)).square().sum()
        total = term if total is None else total + term
    return total / (n_samples * z.numel())
