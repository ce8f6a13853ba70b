"""Fixed-point solvers for deep equilibrium models: ``z* = f(z*)``.

``fixed_point``  damped Picard iteration ``z ← z + τ (f(z) − z)``.
``anderson``     Anderson acceleration (Anderson 1965; Walker & Ni 2011) with an incremental Gram
                 matrix (``getfast::anderson_step``).
``broyden``      Broyden's good method on ``g(z) = f(z) − z`` with a low-rank inverse Jacobian
                 ``−I + U Vᵀ`` (Broyden 1965; as in Bai et al. 2019, "Deep Equilibrium Models").
``solve``        any registered solver by name (:func:`register_solver`, :func:`get_solver`).

Common contract (the statistics mean what torchdeq 0.1.0's ``SolverStat`` means):

* ``f`` maps a tensor shaped like ``z0`` (batch first, any trailing shape) to the same shape.
* The residual of an iterate ``z`` is ``‖f(z) − z‖`` per sample (``stop_mode="abs"``) or that
  divided by ``‖f(z)‖ + 1e-9`` (``"rel"``); every evaluation of ``f`` is one iteration and is
  recorded.
* Returned: the per-sample lowest-residual result — ``f(z)`` of the best iterate for
  ``fixed_point``/``anderson`` (torchdeq returns the image there too), the best iterate ``z``
  itself for ``broyden`` (as torchdeq) — and a ``stats`` dict:

  ``abs_lowest``, ``rel_lowest`` ``(B,)``  lowest abs / rel residual seen (each its own minimum)
  ``nstep`` ``(B,)`` (float, as torchdeq)   1-based iteration of the stop-mode minimum (0: none)
  ``abs_trace``, ``rel_trace`` ``(B, n)``   residual of every iteration run (``n ≤ max_iter``);
                                           after a sample froze: its lowest residual
                                           (converged) or inf (non-finite), as torchdeq pads
  ``nonfinite`` ``(B,)`` bool               ``f`` produced NaN/Inf for that sample (then frozen)
  ``converged`` ``(B,)`` bool               the stop-mode minimum went below ``tol``

* A sample whose lowest residual drops below ``tol`` is frozen: its iterate, result and
  statistics stop changing while the others continue; the loop ends when every sample is
  frozen. The convergence test reads the device once per ``check_every`` iterations.
* ``tol=None`` runs exactly ``max_iter`` iterations with no host synchronisation and no
  data-dependent Python control flow: the solver is CUDA-graph capturable and traceable by
  ``torch.compile(fullgraph=True)``.
* bfloat16/float16 states work: history buffers keep the state dtype; norms, the Gram matrix and
  the small solves use float32 (float64 for float64 states).
* Solvers run under ``torch.no_grad()`` on a detached ``z0``; gradients come from
  :mod:`getfast.deq.grad`.
* Unknown options raise ``TypeError``; bad values raise ``ValueError`` naming the option.

Differences from torchdeq, on purpose: the first iterations are recorded too (torchdeq's
Anderson skips two evaluations, its Broyden one); ``fixed_point`` with ``tau < 1`` records the
undamped residual ``‖f(z) − z‖`` (torchdeq records ``τ‖f(z) − z‖``) and returns ``f(z)``; Broyden
has no line search and no "lack of progress" exit (both need host syncs); a singular Anderson
system falls back to a plain step for that sample instead of raising for the whole batch.
"""
from __future__ import annotations

from typing import Callable

import torch

from getfast.ops import BACKENDS
from getfast.options import check_number
from getfast.ops.anderson import MAX_M, AndersonState, anderson_step
from getfast.ops.broyden import BroydenState, broyden_step

__all__ = [
    "fixed_point",
    "anderson",
    "broyden",
    "solve",
    "register_solver",
    "get_solver",
    "list_solvers",
]

Tensor = torch.Tensor
_STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_TRACE0 = 32  # trace columns allocated up front; doubled on demand up to max_iter


# --------------------------------------------------------------------------------------
# validation helpers (all before any work; ValueError names the option)
# --------------------------------------------------------------------------------------
def _check_int(name: str, v, lo: int) -> int:
    return check_number(name, v, lo=lo, integer=True, option=False)


def _check_common(f, z0, max_iter, tol, stop_mode, check_every, backend) -> None:
    if not callable(f):
        raise ValueError(f"f must be callable, got {type(f).__name__}")
    if not isinstance(z0, torch.Tensor):
        raise ValueError(f"z0 must be a torch.Tensor, got {type(z0).__name__}")
    if z0.dtype not in _STATE_DTYPES:
        raise ValueError(f"z0 must be float32/float64/float16/bfloat16, got {z0.dtype}")
    if z0.dim() < 1 or z0.numel() == 0:
        raise ValueError(f"z0 must be a non-empty tensor with a batch dimension, got shape {tuple(z0.shape)}")
    _check_int("max_iter", max_iter, 1)
    _check_int("check_every", check_every, 1)
    if tol is not None:
        check_number("tol", tol, lo=0, option=False)
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS}, got {backend!r}")


def _check_float(name: str, v, *, positive=False, nonnegative=False) -> float:
    return float(check_number(name, v, lo=0 if positive or nonnegative else None, lo_open=positive, option=False))


def _start(z0: Tensor) -> Tensor:
    """``z0`` as a detached, contiguous ``(B, D)`` tensor (any strides accepted)."""
    return z0.detach().reshape(z0.shape[0], -1).contiguous()


def _eval(f: Callable, z: Tensor, z0: Tensor) -> Tensor:
    """``f(z)`` as a contiguous ``(B, D)`` tensor of ``z0``'s dtype; checks shape and device."""
    out = f(z)
    if not isinstance(out, torch.Tensor) or out.shape != z0.shape or out.device != z0.device:
        got = f"{tuple(out.shape)} on {out.device}" if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"f must return a tensor shaped like z0 {tuple(z0.shape)} on {z0.device}, got {got}")
    return out.to(z0.dtype).reshape(z0.shape[0], -1).contiguous()


def _room(state, k: int, max_iter: int):
    """``state`` with a trace long enough for iteration ``k`` (doubled on demand, so a solve that
    stops early never holds ``max_iter`` columns)."""
    T = state.trace.shape[2]
    if k < T:
        return state
    trace = state.trace.new_zeros((2, state.trace.shape[1], min(max_iter, 2 * T)))
    trace[:, :, :T] = state.trace
    return state._replace(trace=trace)


def _stats(state, n: int) -> dict:
    lowest, trace, status = state.lowest, state.trace, state.status
    return {
        "abs_lowest": lowest[0],
        "rel_lowest": lowest[1],
        "nstep": lowest[2],
        "abs_trace": trace[0, :, :n],
        "rel_trace": trace[1, :, :n],
        "nonfinite": status == 2,
        "converged": status == 1,
    }


def _all_frozen(status: Tensor) -> bool:
    """The one host sync of a convergence check."""
    return not bool((status == 0).any())


# --------------------------------------------------------------------------------------
# Anderson (and fixed-point iteration, which is Anderson with a history of one)
# --------------------------------------------------------------------------------------
def _anderson_loop(f, z0, m, lam, tau, max_iter, tol, stop_mode, check_every, backend):
    with torch.no_grad():
        state = AndersonState.new(_start(z0), m, min(max_iter, _TRACE0))
        n_run = max_iter
        for k in range(max_iter):
            state = _room(state, k, max_iter)
            fx = _eval(f, state.X[k % m].view(z0.shape), z0)
            anderson_step(state, fx, k, tau=tau, lam=lam, tol=tol, stop_mode=stop_mode, backend=backend,
                          validate=k == 0)
            if tol is not None and (k + 1) % check_every == 0 and k + 1 < max_iter and _all_frozen(state.status):
                n_run = k + 1
                break
        return state.best.view(z0.shape), _stats(state, n_run)
def fixed_point(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    tau: float = 1.0,
    max_iter: int = 50,
    tol: float | None = 1e-3,
    stop_mode: str = "abs",
    check_every: int = 1,
    backend: str | None = None,
) -> tuple[Tensor, dict]:
    """Damped fixed-point (Picard) iteration ``z_{k+1} = z_k + τ (f(z_k) − z_k)``.

    The iteration GET samples with (Geng et al. 2023; a DEQ forward pass as in Bai et al. 2019).
    Returns ``f(z)`` of the lowest-residual iterate ``z`` per sample and the ``stats`` dict
    described in :mod:`getfast.deq.solvers`. ``tol=None``: exactly ``max_iter`` iterations, no
    host syncs. ``backend`` forces the ``getfast::anderson_step`` backend (history of one).
    """
    _check_common(f, z0, max_iter, tol, stop_mode, check_every, backend)
    tau = _check_float("tau", tau, positive=True)
    return _anderson_loop(f, z0, 1, 0.0, tau, max_iter, tol, stop_mode, check_every, backend)


def anderson(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    m: int = 6,
    lam: float = 1e-4,
    tau: float = 1.0,
    max_iter: int = 50,
    tol: float | None = 1e-3,
    stop_mode: str = "abs",
    check_every: int = 1,
    backend: str | None = None,
) -> tuple[Tensor, dict]:
    """Anderson acceleration (Anderson 1965; Walker & Ni 2011, eq. 1.2; Bai et al. 2019, §3.1.3).

    Keeps the last ``m`` iterates ``xᵢ`` and residuals ``gᵢ = f(xᵢ) − xᵢ``; each iteration solves
    ``min ‖Σ αᵢ gᵢ‖² + λ‖α‖²`` s.t. ``Σ αᵢ = 1`` and sets ``x ← τ Σ αᵢ f(xᵢ) + (1 − τ) Σ αᵢ xᵢ``.
    The Gram matrix ``G Gᵀ`` is kept across iterations and only its new row/column is computed
    (O(m·D) per iteration); a singular system falls back to a plain damped step for that sample.
    Returns ``f(z)`` of the lowest-residual iterate ``z`` per sample and the ``stats`` dict.
    """
    _check_common(f, z0, max_iter, tol, stop_mode, check_every, backend)
    _check_int("m", m, 1)
    if m > MAX_M:
        raise ValueError(f"m must be <= {MAX_M}, got {m}")
    lam = _check_float("lam", lam, nonnegative=True)
    tau = _check_float("tau", tau, positive=True)
    return _anderson_loop(f, z0, m, lam, tau, max_iter, tol, stop_mode, check_every, backend)


# --------------------------------------------------------------------------------------
# Broyden
# --------------------------------------------------------------------------------------
def broyden(
    f: Callable[[Tensor], Tensor],
    z0: Tensor,
    *,
    memory: int | None = None,
    max_iter: int = 50,
    tol: float | None = 1e-3,
    stop_mode: str = "abs",
    check_every: int = 1,
    backend: str | None = None,
) -> tuple[Tensor, dict]:
    """Broyden's good method for ``g(z) = f(z) − z = 0`` (Broyden 1965; Bai et al. 2019, §3.1.3).

    The inverse Jacobian of ``g`` is estimated as ``B = −I + U Vᵀ`` from the last ``memory``
    rank-one updates (a ring grown on demand, so memory is held only for the iterations run;
    ``None`` keeps all ``max_iter``, as torchdeq):
    ``vᵀ = Δzᵀ B``, ``u = (Δz − B Δg) / (vᵀ Δg)``, then ``z ← z − B g(z)``; one fused
    ``getfast::broyden_step`` per iteration. An update whose denominator is zero or non-finite
    is skipped for that sample. Returns the lowest-residual iterate ``z`` per sample (torchdeq's
    convention for Broyden) and the ``stats`` dict.
    """
    _check_common(f, z0, max_iter, tol, stop_mode, check_every, backend)
    if memory is not None:
        _check_int("memory", memory, 1)
    mem = max_iter if memory is None else memory
    with torch.no_grad():
        state = BroydenState.new(_start(z0), min(mem, 8), min(max_iter, _TRACE0))
        n_run = max_iter
        for k in range(max_iter):
            state = _room(state, k, max_iter)
            C = state.U.shape[0]
            if k - 1 >= C and C < mem:  # the ring has not wrapped yet: grow it instead
                grow = state.U.new_zeros((min(mem, 2 * C) - C, *state.U.shape[1:]))
                state = state._replace(U=torch.cat([state.U, grow]), V=torch.cat([state.V, grow]))
            fx = _eval(f, state.x.view(z0.shape), z0)
            broyden_step(state, fx, k, tol=tol, stop_mode=stop_mode, backend=backend, validate=k == 0)
            if tol is not None and (k + 1) % check_every == 0 and k + 1 < max_iter and _all_frozen(state.status):
                n_run = k + 1
                break
        return state.best.view(z0.shape), _stats(state, n_run)


# --------------------------------------------------------------------------------------
# registry
# --------------------------------------------------------------------------------------
_SOLVERS: dict[str, Callable] = {
    "fixed_point": fixed_point,
    "anderson": anderson,
    "broyden": broyden,
}


def register_solver(name: str, solver: Callable, *, overwrite: bool = False) -> None:
    """Register ``solver(f, z0, **options) -> (z, stats)`` under ``name`` for :func:`solve`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"name must be a non-empty string, got {name!r}")
    if not callable(solver):
        raise ValueError(f"solver must be callable, got {type(solver).__name__}")
    if name in _SOLVERS and not overwrite:
        raise ValueError(f"solver {name!r} is already registered (pass overwrite=True to replace it)")
    _SOLVERS[name] = solver


def get_solver(name: str) -> Callable:
    """The solver registered under ``name``; ``ValueError`` lists the known names otherwise."""
    try:
        return _SOLVERS[name]
    except (KeyError, TypeError):
        raise ValueError(f"solver must be one of {sorted(_SOLVERS)}, got {name!r}") from None


def list_solvers() -> list[str]:
    """Names accepted by :func:`solve`."""
    return sorted(_SOLVERS)


def solve(f: Callable[[Tensor], Tensor], z0: Tensor, solver: str = "anderson", **options) -> tuple[Tensor, dict]:
    """Solve ``z = f(z)`` with the solver registered under ``solver`` (``anderson``,
    ``broyden``, ``fixed_point`` or one added by :func:`register_solver`); ``options`` go to it
    unchanged, so an option it does not take raises ``TypeError``."""
    return get_solver(solver)(f, z0, **options)
