"""Fused Broyden iteration ``getfast::broyden_step`` (Broyden 1965, "good" method on
``g(x) = f(x) − x``; as in Bai et al. 2019, *Deep Equilibrium Models*, §3.1.3).

The inverse Jacobian of ``g`` is ``B = −I + U Vᵀ`` over a ring of ``mem`` rank-one pairs. After
the caller evaluated ``fx = f(x)``, one call (``n = min(k−1, mem)`` live pairs, new slot
``s = (k−1) % mem``; ``g`` rounded to the state dtype, ``Δg = g − g_prev``, ``Δx = dx``):

1. the bookkeeping of ``anderson.naive.record`` with ``best = x`` where the residual improved;
2. for ``k > 0`` the pair ``vᵀ = Δxᵀ B``, ``u = (Δx − B Δg)/(vᵀ Δg)`` from ``aⱼ = ⟨Uⱼ, Δx⟩``,
   ``bⱼ = ⟨Vⱼ, Δg⟩``, ``cⱼ = ⟨Vⱼ, g⟩`` (one read of the history): ``vᵀΔg = Σaⱼbⱼ − ⟨Δx, Δg⟩``;
   a zero or non-finite denominator stores a zero pair for that sample;
3. ``B g = −g + Σⱼ≠s cⱼ Uⱼ + u (vᵀg)`` with ``vᵀg = Σaⱼcⱼ − ⟨Δx, g⟩``, then ``x ← x − B g`` for
   running samples, ``dx ← x_new − x``, ``g_prev ← g`` (second read).

State (:class:`BroydenState`, mutated): ``x, g_prev, dx, best`` (B, D) and ``U, V`` (mem, B, D)
in the state dtype; ``lowest``, ``trace``, ``status`` as for ``getfast::anderson_step``. Kernels:
``kernels/broyden.py``, ``csrc/cpu/broyden.cpp``, ``csrc/cuda/broyden.cu``.
"""
from typing import NamedTuple

import torch

from getfast.options import check_number

from .._framework import DTYPE_CODES, OpSpec, check_real, chunking, define_op, load_C, stream_ptr
from ..anderson import new_record
from ..anderson.naive import REL_EPS
from . import naive


class BroydenState(NamedTuple):
    x: torch.Tensor
    U: torch.Tensor
    V: torch.Tensor
    g_prev: torch.Tensor
    dx: torch.Tensor
    best: torch.Tensor
    lowest: torch.Tensor
    trace: torch.Tensor
    status: torch.Tensor

    @classmethod
    def new(cls, z: torch.Tensor, mem: int, T: int) -> "BroydenState":
        """The state of a solve from ``z`` (B, D) with ``mem`` pair slots and room for ``T`` steps."""
        U = z.new_zeros((mem, *z.shape))
        return cls(z.clone(), U, torch.zeros_like(U), torch.zeros_like(z), torch.zeros_like(z), z.clone(),
                   *new_record(z, T))


def _native(backend: str, x, U, V, g_prev, dx, best, lowest, trace, status, fx, k, tol, stop_rel) -> None:
    mem, B, D = U.shape
    nblk, chunk = chunking(D, 256)
    ptrs = [t.data_ptr() for t in (x, U, V, g_prev, dx, best, lowest, trace, status, fx)]
    ints = [mem, B, D, trace.shape[2], k, int(stop_rel), nblk, chunk]
    C = load_C()
    if backend == "cpp":
        C.broyden_step_cpu(DTYPE_CODES[x.dtype], ptrs, ints, [tol, REL_EPS])
        return
    with torch.cuda.device(x.device):  # workspace: partial sums (3 mem + 4) per (sample, block), coefficients
        work = torch.empty((B * nblk + B) * (3 * mem + 4), dtype=lowest.dtype, device=x.device)
        C.broyden_step_cuda(DTYPE_CODES[x.dtype], [*ptrs, work.data_ptr()], ints, [tol, REL_EPS],
                            stream_ptr(x.device))


def _triton(*args) -> None:
    from getfast.kernels import broyden as K

    K.broyden_step(*args, REL_EPS, *chunking(args[0].shape[1], 256))


def _check(dims, *args):
    k, tol = args[10:12]
    check_number("k", k, lo=0, hi=dims["T"], hi_open=True, integer=True, option=False)
    check_real("tol", tol)


BROYDEN_STEP = define_op(OpSpec(
    schema="broyden_step(Tensor(a!) x, Tensor(b!) U, Tensor(c!) V, Tensor(d!) g_prev, Tensor(e!) dx, "
           "Tensor(f!) best, Tensor(g!) lowest, Tensor(h!) trace, Tensor(i!) status, Tensor fx, int k, float tol, "
           "bool stop_rel, str backend) -> ()",
    args={"x": "B D state", "U": "mem B D state", "V": "mem B D state", "g_prev": "B D state", "dx": "B D state",
          "best": "B D state", "lowest": "3 B acc", "trace": "2 B T acc", "status": "B int32", "fx": "B D state"},
    launchers={"reference": naive.broyden_step, "triton": _triton,
               "cuda": lambda *a: _native("cuda", *a), "cpp": lambda *a: _native("cpp", *a)},
    check=_check, native={"cpp": "broyden_step_cpu", "cuda": "broyden_step_cuda"}, grid_y=("B",),
))


def broyden_step(state: BroydenState, fx: torch.Tensor, k: int, *, tol: float | None = None,
                 stop_mode: str = "abs", backend: str | None = None, validate: bool = True) -> None:
    """Advance a Broyden solve by one iteration in place (Broyden 1965; Bai et al. 2019 §3.1.3;
    see the module docstring). ``tol=None`` never marks samples converged."""
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    BROYDEN_STEP(*state, fx, k, -1.0 if tol is None else tol, stop_mode == "rel", backend=backend,
                 validate=validate)


broyden_step_reference = naive.broyden_step
