"""Deep equilibrium (DEQ) core: fixed-point solvers and gradients (Bai et al. 2019).

Solvers (``z, stats = solver(f, z0, **options)``; see :mod:`getfast.deq.solvers`):
:func:`fixed_point`, :func:`anderson`, :func:`broyden`, and :func:`solve` by name (registry:
:func:`register_solver`, :func:`get_solver`, :func:`list_solvers`).

Gradients and losses (see :mod:`getfast.deq.grad`): :func:`phantom_grad` (alias
:func:`unrolled`), :func:`ift`, :func:`fp_correction`, :func:`fp_correction_weights`,
:func:`jacobian_reg`.
"""
from .grad import fp_correction, fp_correction_weights, ift, jacobian_reg, phantom_grad, unrolled
from .solvers import anderson, broyden, fixed_point, get_solver, list_solvers, register_solver, solve

__all__ = [
    "fixed_point",
    "anderson",
    "broyden",
    "solve",
    "register_solver",
    "get_solver",
    "list_solvers",
    "phantom_grad",
    "unrolled",
    "ift",
    "fp_correction",
    "fp_correction_weights",
    "jacobian_reg",
]
