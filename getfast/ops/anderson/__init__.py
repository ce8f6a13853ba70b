"""Fused Anderson-acceleration step ``getfast::anderson_step`` (Anderson 1965; Walker & Ni 2011,
"Anderson acceleration for fixed-point iterations", eq. 1.2 in the constrained least-squares form).

One call advances a solve by one iteration after the caller evaluated ``fx = f(x_k)``,
``x_k = X[k % m]``, in one pass over the history:

1. ``g_k = fx − x_k`` goes to ring slot ``s = k % m`` of ``G``;
2. only the new row/column of the Gram matrix ``H = G Gᵀ`` is computed (O(m·D), not O(m²·D));
3. ``‖g_k‖`` and ``‖fx‖`` give the abs/rel residuals: the shared bookkeeping of ``naive.record``;
4. ``(H + λI) w = 1``, ``α = w/Σw`` (torchdeq's bordered system) is solved per sample in the
   accumulation dtype; a breakdown (pivot ``≤ 100·eps·diagonal``, non-finite α) falls back to the
   plain damped step ``α = e_s``;
5. ``x_{k+1} = Σ αᵢ (xᵢ + τ gᵢ)`` (= ``τ Σ αᵢ fᵢ + (1−τ) Σ αᵢ xᵢ``) goes to slot ``(k+1) % m``;
   frozen samples keep ``x_k``.

State (:class:`AndersonState`, all mutated): ``X, G`` (m, B, D) state dtype; ``H`` (B, m, m),
``lowest`` (3, B: lowest abs, lowest rel, its step), ``trace`` (2, B, T > k) in the accumulation
dtype (float32, float64 for float64 states); ``best`` (B, D) state dtype (``f`` of the best
iterate); ``status`` (B,) int32 (0 running, 1 converged, 2 non-finite). Kernels:
``kernels/anderson.py``, ``csrc/cpu/anderson.cpp``, ``csrc/cuda/anderson.cu``.
"""
from typing import NamedTuple

import torch

from getfast.options import check_number

from .._framework import DTYPE_CODES, OpSpec, acc_dtype, check_real, chunking, define_op, load_C, stream_ptr
from . import naive
from .naive import REL_EPS, pivot_rtol

MAX_M = 32  # history size the fused kernels support (registers / shared memory)


class AndersonState(NamedTuple):
    X: torch.Tensor
    G: torch.Tensor
    H: torch.Tensor
    best: torch.Tensor
    lowest: torch.Tensor
    trace: torch.Tensor
    status: torch.Tensor

    @classmethod
    def new(cls, z: torch.Tensor, m: int, T: int) -> "AndersonState":
        """The state of a solve from ``z`` (B, D) with ``m`` history slots and room for ``T`` steps."""
        B, acc = z.shape[0], acc_dtype(z.dtype)
        X = z.new_zeros((m, *z.shape))
        X[0] = z
        return cls(X, torch.zeros_like(X), z.new_zeros((B, m, m), dtype=acc), z.clone(), *new_record(z, T))


def new_record(z: torch.Tensor, T: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``lowest`` (residuals inf, step 0), ``trace`` (2, B, T) and ``status`` for a batch like ``z``."""
    acc = acc_dtype(z.dtype)
    lowest = z.new_zeros((3, z.shape[0]), dtype=acc)
    lowest[:2] = float("inf")
    return lowest, z.new_zeros((2, z.shape[0], T), dtype=acc), z.new_zeros(z.shape[0], dtype=torch.int32)


def _native(backend: str, X, G, H, best, lowest, trace, status, fx, k, tau, lam, tol, stop_rel) -> None:
    m, B, D = X.shape
    nblk, chunk = chunking(D, 1024)
    ptrs = [t.data_ptr() for t in (X, G, H, best, lowest, trace, status, fx)]
    ints = [m, B, D, trace.shape[2], k, int(stop_rel), nblk, chunk]
    reals = [tau, lam, tol, pivot_rtol(H.dtype), REL_EPS]
    C = load_C()
    if backend == "cpp":
        C.anderson_step_cpu(DTYPE_CODES[X.dtype], ptrs, ints, reals)
        return
    with torch.cuda.device(X.device):  # workspace: per-(sample, block) partial sums, then α + flags
        work = torch.empty(B * nblk * (m + 2) + B * (m + 1), dtype=H.dtype, device=X.device)
        C.anderson_step_cuda(DTYPE_CODES[X.dtype], [*ptrs, work.data_ptr()], ints, reals, stream_ptr(X.device))


def _triton(*args) -> None:
    from getfast.kernels import anderson as K

    K.anderson_step(*args, pivot_rtol(args[2].dtype), REL_EPS, *chunking(args[0].shape[2], 1024))


def _check(dims, *args):
    k, tau, lam, tol = args[8:12]
    if dims["m"] > MAX_M:
        raise ValueError(f"X: history size m={dims['m']} exceeds the supported maximum {MAX_M}")
    check_number("k", k, lo=0, hi=dims["T"], hi_open=True, integer=True, option=False)
    check_real("tau", tau, positive=True), check_real("lam", lam, nonnegative=True), check_real("tol", tol)


ANDERSON_STEP = define_op(OpSpec(
    schema="anderson_step(Tensor(a!) X, Tensor(b!) G, Tensor(c!) H, Tensor(d!) best, Tensor(e!) lowest, "
           "Tensor(f!) trace, Tensor(g!) status, Tensor fx, int k, float tau, float lam, float tol, bool stop_rel, "
           "str backend) -> ()",
    args={"X": "m B D state", "G": "m B D state", "H": "B m m acc", "best": "B D state", "lowest": "3 B acc",
          "trace": "2 B T acc", "status": "B int32", "fx": "B D state"},
    launchers={"reference": naive.anderson_step, "triton": _triton,
               "cuda": lambda *a: _native("cuda", *a), "cpp": lambda *a: _native("cpp", *a)},
    check=_check, native={"cpp": "anderson_step_cpu", "cuda": "anderson_step_cuda"}, grid_y=("B",),
))


def anderson_step(state: AndersonState, fx: torch.Tensor, k: int, *, tau: float = 1.0, lam: float = 1e-4,
                  tol: float | None = None, stop_mode: str = "abs", backend: str | None = None,
                  validate: bool = True) -> None:
    """Advance an Anderson solve by one iteration in place (Walker & Ni 2011, eq. 1.2; see the
    module docstring). ``tol=None`` never marks samples converged; ``backend`` overrides the
    automatic choice; ``validate=False`` skips the checks for a state already validated."""
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    ANDERSON_STEP(*state, fx, k, tau, lam, -1.0 if tol is None else tol, stop_mode == "rel", backend=backend,
                  validate=validate)


anderson_step_reference = naive.anderson_step
