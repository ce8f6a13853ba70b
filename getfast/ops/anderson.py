"""Fused Anderson-acceleration step: ``getfast::anderson_step``.

One call advances an Anderson solve (Anderson 1965, "Iterative procedures for nonlinear
integral equations"; Walker & Ni 2011, "Anderson acceleration for fixed-point iterations",
eq. (1.2) in the constrained least-squares form) by one iteration, *after* the caller has
evaluated ``fx = f(x_k)`` for the current iterate ``x_k = X[k % m]``:

1. residual ``g_k = fx - x_k`` is stored in the ring slot ``s = k % m`` of the history ``G``;
2. only the new row/column of the Gram matrix ``H = G Gᵀ`` is computed (``⟨g_k, g_j⟩`` for the
   ``n = min(k+1, m)`` live slots: O(m·D) instead of recomputing ``G Gᵀ`` in O(m²·D));
3. residual norms ``‖g_k‖`` and ``‖fx‖`` give the per-sample ``abs``/``rel`` residuals, written to
   column ``k`` of ``trace``; the running minima, the step of the minimum and the
   lowest-residual image (``best = fx``) are updated for samples still running;
4. the regularised normal equations ``(H + λI) w = 1``, ``α = w / Σw`` (equivalent to the bordered
   system ``[[0, 1ᵀ], [1, H + λI]] [ν; α] = [1; 0]`` that torchdeq solves) are solved per sample by
   a Cholesky factorisation in the accumulation dtype (float32, float64 for float64 states);
5. the next iterate ``x_{k+1} = Σ αᵢ xᵢ + τ Σ αᵢ gᵢ`` (= ``τ Σ αᵢ fᵢ + (1−τ) Σ αᵢ xᵢ``) is written
   into slot ``(k+1) % m`` of ``X``.

Per-sample robustness: a system whose factorisation breaks down (a pivot ``≤ rtol·(H+λI)ⱼⱼ`` with
``rtol = 100·eps`` of the accumulation dtype) or yields non-finite ``α`` falls back to the plain
damped step ``α = e_s`` (``x_{k+1} = x_k + τ g_k``). A sample whose residual is not finite gets
status 2 (non-finite) and is frozen; a sample whose lowest residual (in the stop mode) drops
below ``tol`` (``tol < 0`` disables this) gets status 1 (converged) and is frozen. Frozen samples
keep ``x_{k+1} = x_k`` and never update ``best``/``lowest`` again, so one bad sample never
poisons another (every reduction and every small solve is per sample).

Buffers (all mutated in place; ``m`` history slots, batch ``B``, flattened state size ``D``):

``X, G``  ``(m, B, D)`` state dtype (float32/float64/float16/bfloat16), contiguous
``H``     ``(B, m, m)`` accumulation dtype (the Gram matrix without ``λ``)
``fx``    ``(B, D)`` state dtype (read only)
``best``  ``(B, D)`` state dtype: the image ``f(x)`` of the lowest-residual iterate
``lowest`` ``(3, B)`` accumulation dtype: lowest abs residual, lowest rel residual, its step
``trace`` ``(2, B, T)`` accumulation dtype, ``T > k``: abs and rel residual of every iteration
          (frozen samples: their lowest residuals if converged, inf if non-finite)
``status`` ``(B,)`` int32: 0 running, 1 converged, 2 non-finite

Backends (``getfast.ops._framework``): ``reference`` (this file), ``triton``
(``kernels/anderson.py``), ``cuda`` (``csrc/cuda/anderson.cu``), ``cpp`` (``csrc/cpu/anderson.cpp``).
The op has no autograd: solvers run it under ``torch.no_grad()``.
"""
from __future__ import annotations

import os

import torch

from . import _framework as fw

__all__ = ["anderson_step", "anderson_step_reference", "record_reference", "pivot_rtol", "REL_EPS", "MAX_M"]

OP_NAME = "anderson_step"
REL_EPS = 1e-9  # rel residual = ‖f(x) − x‖ / (‖f(x)‖ + REL_EPS), as in torchdeq
MAX_M = 32  # history size supported by the fused kernels (registers / shared memory)

SPEC = fw.register_op(
    OP_NAME,
    cuda_preference=("cuda", "triton"),
    cpu_preference=("cpp",),
    cpp_symbol="anderson_step_cpu",
    cuda_symbol="anderson_step_cuda",
    triton_module="getfast.kernels.anderson",
)


def pivot_rtol(dtype: torch.dtype) -> float:
    """Relative pivot threshold of the small solve: ``100·eps`` of the accumulation dtype."""
    return 100.0 * torch.finfo(dtype).eps


# --------------------------------------------------------------------------------------
# reference (plain PyTorch; the ground truth)
# --------------------------------------------------------------------------------------
def _small_solve_reference(Hn: torch.Tensor, lam: float, slot: int) -> torch.Tensor:
    """α (B, n) from ``(H + λI) w = 1``, ``α = w/Σw``; per-sample fallback to ``e_slot``."""
    B, n, _ = Hn.shape
    if n == 1:
        return torch.ones(B, 1, dtype=Hn.dtype, device=Hn.device)
    eye = torch.eye(n, dtype=Hn.dtype, device=Hn.device)
    A = Hn + lam * eye
    L, info = torch.linalg.cholesky_ex(A)  # never raises, never syncs
    ones = torch.ones(B, n, 1, dtype=Hn.dtype, device=Hn.device)
    w = torch.cholesky_solve(ones, L).squeeze(-1)
    alpha = w / w.sum(dim=1, keepdim=True)
    piv = torch.diagonal(L, dim1=-2, dim2=-1).square()
    diag = torch.diagonal(A, dim1=-2, dim2=-1)
    ok = (info == 0) & (piv > pivot_rtol(Hn.dtype) * diag).all(dim=1) & torch.isfinite(alpha).all(dim=1)
    fallback = eye[slot].expand(B, n)
    return torch.where(ok[:, None], alpha, fallback)


def record_reference(
    g: torch.Tensor,
    f: torch.Tensor,
    cand: torch.Tensor,
    best: torch.Tensor,
    lowest: torch.Tensor,
    trace: torch.Tensor,
    status: torch.Tensor,
    k: int,
    tol: float,
    stop_rel: bool,
) -> torch.Tensor:
    """Shared solver bookkeeping for iteration ``k`` (plain PyTorch); returns the still-running mask.

    ``g = f(x) − x`` and ``f = f(x)`` in the accumulation dtype; ``cand`` is what ``best`` becomes
    for a sample whose residual (in the stop mode) improved. Writes the residuals to column ``k``
    of ``trace`` (a frozen sample gets its lowest residuals if converged, inf if non-finite);
    updates ``lowest`` (running minima of the abs and rel residuals and the 1-based
    step of the stop-mode minimum, torchdeq's ``abs_lowest``/``rel_lowest``/``nstep``) and
    ``status`` (2 when the residual is not finite, 1 when the stop-mode minimum is below
    ``tol >= 0``) for samples with status 0 only.
    """
    abs_r = torch.linalg.vector_norm(g, dim=1)
    f_norm = torch.linalg.vector_norm(f, dim=1)
    finite = torch.isfinite(abs_r) & torch.isfinite(f_norm)
    inf = torch.full_like(abs_r, float("inf"))
    abs_r = torch.where(finite, abs_r, inf)
    rel_r = torch.where(finite, abs_r / (f_norm + REL_EPS), inf)
    running = status == 0
    # frozen samples are padded like torchdeq pads after its stop: converged -> their lowest
    # residuals, non-finite -> inf
    done = status == 1
    trace[0, :, k] = torch.where(running, abs_r, torch.where(done, lowest[0], inf))
    trace[1, :, k] = torch.where(running, rel_r, torch.where(done, lowest[1], inf))

    lo_abs = torch.where(running, torch.minimum(lowest[0], abs_r), lowest[0])
    lo_rel = torch.where(running, torch.minimum(lowest[1], rel_r), lowest[1])
    crit, lo_crit = (rel_r, lowest[1]) if stop_rel else (abs_r, lowest[0])
    improved = running & (crit < lo_crit)
    new_lo_crit = lo_rel if stop_rel else lo_abs
    lowest[2] = torch.where(improved, float(k + 1), lowest[2])
    lowest[0] = lo_abs
    lowest[1] = lo_rel
    best.copy_(torch.where(improved[:, None], cand, best))

    new_status = torch.where(running & ~finite, 2, status)
    if tol >= 0:
        new_status = torch.where(running & finite & (new_lo_crit < tol), 1, new_status)
    status.copy_(new_status)
    return new_status == 0


def anderson_step_reference(
    X: torch.Tensor,
    G: torch.Tensor,
    H: torch.Tensor,
    fx: torch.Tensor,
    best: torch.Tensor,
    lowest: torch.Tensor,
    trace: torch.Tensor,
    status: torch.Tensor,
    k: int,
    tau: float,
    lam: float,
    tol: float,
    stop_rel: bool,
) -> None:
    """Plain-PyTorch ``anderson_step`` (see the module docstring); mutates its buffers."""
    m = X.shape[0]
    acc = H.dtype
    slot, n, nxt = k % m, min(k + 1, m), (k + 1) % m
    x = X[slot].to(acc)
    f = fx.to(acc)
    g = f - x
    G[slot].copy_(g)  # rounded to the state dtype: the Gram uses the stored history
    Gn = G[:n].to(acc)
    row = torch.einsum("nbd,bd->bn", Gn, Gn[slot])
    H[:, slot, :n] = row
    H[:, :n, slot] = row

    still = record_reference(g, f, fx, best, lowest, trace, status, k, tol, stop_rel)

    alpha = _small_solve_reference(H[:, :n, :n], lam, slot)
    Xn = X[:n].to(acc)
    mixed = torch.einsum("bn,nbd->bd", alpha, Xn + tau * Gn)
    X[nxt].copy_(torch.where(still[:, None], mixed, x))


# --------------------------------------------------------------------------------------
# validation
# --------------------------------------------------------------------------------------
_STATE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _validate(X, G, H, fx, best, lowest, trace, status, k, tau, lam, tol) -> None:
    fw.check_tensor("X", X, dtypes=_STATE_DTYPES, ndim=3)
    m, B, D = X.shape
    dev = X.device
    acc = fw.acc_dtype(X.dtype)
    fw.check_tensor("G", G, dtypes=(X.dtype,), shape=(m, B, D), device=dev)
    fw.check_tensor("H", H, dtypes=(acc,), shape=(B, m, m), device=dev)
    fw.check_tensor("fx", fx, dtypes=(X.dtype,), shape=(B, D), device=dev)
    fw.check_tensor("best", best, dtypes=(X.dtype,), shape=(B, D), device=dev)
    fw.check_tensor("lowest", lowest, dtypes=(acc,), shape=(3, B), device=dev)
    fw.check_tensor("trace", trace, dtypes=(acc,), ndim=3, device=dev)
    if trace.shape[0] != 2 or trace.shape[1] != B:
        raise ValueError(f"trace must have shape (2, {B}, T), got {tuple(trace.shape)}")
    fw.check_tensor("status", status, dtypes=(torch.int32,), shape=(B,), device=dev)
    if m > MAX_M:
        raise ValueError(f"X: history size m={m} exceeds the supported maximum {MAX_M}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0 or k >= trace.shape[2]:
        raise ValueError(f"k must be an int in [0, {trace.shape[2]}), got {k!r}")
    fw.check_scalar("tau", tau, positive=True)
    fw.check_scalar("lam", lam, nonnegative=True)
    fw.check_scalar("tol", tol)


# --------------------------------------------------------------------------------------
# backends
# --------------------------------------------------------------------------------------
def _run_cpp(X, G, H, fx, best, lowest, trace, status, k, tau, lam, tol, stop_rel) -> None:
    C = fw.load_C()
    m, B, D = X.shape
    C.anderson_step_cpu(
        fw.dtype_code(X.dtype), X.data_ptr(), G.data_ptr(), H.data_ptr(), fx.data_ptr(),
        best.data_ptr(), lowest.data_ptr(), trace.data_ptr(), status.data_ptr(),
        m, B, D, trace.shape[2], k, float(tau), float(lam), float(tol), bool(stop_rel),
        pivot_rtol(H.dtype),
    )


def _run_cuda(X, G, H, fx, best, lowest, trace, status, k, tau, lam, tol, stop_rel) -> None:
    C = fw.load_C(required=False)
    m, B, D = X.shape
    args = (
        fw.dtype_code(X.dtype), X.data_ptr(), G.data_ptr(), H.data_ptr(), fx.data_ptr(),
        best.data_ptr(), lowest.data_ptr(), trace.data_ptr(), status.data_ptr(),
        m, B, D, trace.shape[2], k, float(tau), float(lam), float(tol), bool(stop_rel),
        pivot_rtol(H.dtype),
    )
    if C is not None and hasattr(C, "anderson_step_cuda"):
        with torch.cuda.device(X.device):
            work = torch.empty(_cuda_workspace_numel(m, B, D), dtype=H.dtype, device=X.device)
            C.anderson_step_cuda(*args, work.data_ptr(), fw.current_stream_ptr(X.device))
        return
    raise RuntimeError(
        "getfast::anderson_step: the cuda backend needs getfast._C built with nvcc "
        "(the CuPy JIT path is not wired for this op)"
    )


def _cuda_workspace_numel(m: int, B: int, D: int) -> int:
    # mirrors csrc/cuda/anderson.h: per-(sample, block) partial sums (m + 2) + alpha and flags (m + 1)
    nblk = min(1024, max(1, -(-D // 4096)))
    return B * nblk * (m + 2) + B * (m + 1)


def _run_triton(X, G, H, fx, best, lowest, trace, status, k, tau, lam, tol, stop_rel) -> None:
    from getfast.kernels import anderson as tk  # noqa: PLC0415 (import on first use)

    tk.anderson_step(X, G, H, fx, best, lowest, trace, status, k, tau, lam, tol, stop_rel, pivot_rtol(H.dtype))


_RUNNERS = {
    "reference": anderson_step_reference,
    "cpp": _run_cpp,
    "cuda": _run_cuda,
    "triton": _run_triton,
}


_RESOLVED: dict = {}


def _resolve(backend: str, device: torch.device) -> str:
    """The backend to run on ``device``: ``backend`` if given (checked), else the framework's
    choice. Cached per (request, device type, GETFAST_BACKEND) — availability does not change
    within a process — so a solver iteration does not pay for the lookup."""
    key = (backend, device.type, os.environ.get(fw.ENV_BACKEND, ""))
    name = _RESOLVED.get(key)
    if name is None:
        if backend:
            why = fw.backend_unavailable_reason(OP_NAME, backend, device)
            if why is not None:
                raise RuntimeError(f"getfast::{OP_NAME}: backend {backend!r} unavailable on {device}: {why}")
            name = backend
        else:
            name = fw.select_backend(OP_NAME, device)
        _RESOLVED[key] = name
    return name


# --------------------------------------------------------------------------------------
# the custom op
# --------------------------------------------------------------------------------------
@torch.library.custom_op(
    "getfast::anderson_step",
    mutates_args=("X", "G", "H", "best", "lowest", "trace", "status"),
)
def _anderson_step_op(
    X: torch.Tensor,
    G: torch.Tensor,
    H: torch.Tensor,
    fx: torch.Tensor,
    best: torch.Tensor,
    lowest: torch.Tensor,
    trace: torch.Tensor,
    status: torch.Tensor,
    k: int,
    tau: float,
    lam: float,
    tol: float,
    stop_rel: bool,
    backend: str,
) -> None:
    _validate(X, G, H, fx, best, lowest, trace, status, k, tau, lam, tol)
    name = _resolve(backend, X.device)
    _RUNNERS[name](X, G, H, fx, best, lowest, trace, status, k, tau, lam, tol, stop_rel)


@_anderson_step_op.register_fake
def _(X, G, H, fx, best, lowest, trace, status, k, tau, lam, tol, stop_rel, backend) -> None:
    return None


def anderson_step(
    X: torch.Tensor,
    G: torch.Tensor,
    H: torch.Tensor,
    fx: torch.Tensor,
    best: torch.Tensor,
    lowest: torch.Tensor,
    trace: torch.Tensor,
    status: torch.Tensor,
    k: int,
    *,
    tau: float = 1.0,
    lam: float = 1e-4,
    tol: float | None = None,
    stop_mode: str = "abs",
    backend: str | None = None,
) -> None:
    """Advance an Anderson solve by one iteration in place (Walker & Ni 2011, eq. 1.2).

    See the module docstring for the buffers. ``tol=None`` never marks samples converged.
    ``backend`` (``reference|triton|cuda|cpp``) overrides the automatic choice.
    """
    if stop_mode not in ("abs", "rel"):
        raise ValueError(f"stop_mode must be 'abs' or 'rel', got {stop_mode!r}")
    if backend is not None and backend not in fw.BACKENDS:
        raise ValueError(f"backend must be one of {fw.BACKENDS}, got {backend!r}")
    t = -1.0 if tol is None else float(tol)
    torch.ops.getfast.anderson_step(
        X, G, H, fx, best, lowest, trace, status, int(k), float(tau), float(lam), t,
        stop_mode == "rel", backend or "",
    )
