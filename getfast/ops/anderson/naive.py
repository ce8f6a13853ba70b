"""Plain-PyTorch Anderson step and the bookkeeping every solver step shares (the ground truth of
``getfast::anderson_step`` and, for :func:`record`, of ``getfast::broyden_step``)."""
import torch

REL_EPS = 1e-9  # rel residual = ‖f(x) − x‖ / (‖f(x)‖ + REL_EPS), as in torchdeq


def record(g, f, cand, best, lowest, trace, status, k: int, tol: float, stop_rel: bool) -> torch.Tensor:
    """Iteration ``k``'s residuals into ``trace[:, :, k]``, running minima and 1-based step of the
    stop-mode minimum into ``lowest``, ``best = cand`` where it improved, ``status`` 2 for a
    non-finite residual and 1 below ``tol`` (``tol < 0``: never); frozen samples (status ≠ 0)
    only get their trace padded (lowest if converged, inf if non-finite). Returns the still-running
    mask. ``g = f(x) − x`` and ``f = f(x)`` in the accumulation dtype."""
    abs_r, f_norm = torch.linalg.vector_norm(g, dim=1), torch.linalg.vector_norm(f, dim=1)
    finite = torch.isfinite(abs_r) & torch.isfinite(f_norm)
    inf = torch.full_like(abs_r, float("inf"))
    abs_r = torch.where(finite, abs_r, inf)
    rel_r = torch.where(finite, abs_r / (f_norm + REL_EPS), inf)
    running, done = status == 0, status == 1
    trace[0, :, k] = torch.where(running, abs_r, torch.where(done, lowest[0], inf))
    trace[1, :, k] = torch.where(running, rel_r, torch.where(done, lowest[1], inf))
    lo_abs = torch.where(running, torch.minimum(lowest[0], abs_r), lowest[0])
    lo_rel = torch.where(running, torch.minimum(lowest[1], rel_r), lowest[1])
    improved = running & ((rel_r < lowest[1]) if stop_rel else (abs_r < lowest[0]))
    lowest[2] = torch.where(improved, float(k + 1), lowest[2])
    lowest[0], lowest[1] = lo_abs, lo_rel
    best.copy_(torch.where(improved[:, None], cand, best))
    new = torch.where(running & ~finite, 2, status)
    new = torch.where(running & finite & ((lo_rel if stop_rel else lo_abs) < tol), 1, new)
    status.copy_(new)
    return new == 0


def pivot_rtol(dtype: torch.dtype) -> float:
    """Relative pivot threshold of the small solve: ``100·eps`` of the accumulation dtype."""
    return 100.0 * torch.finfo(dtype).eps


def small_solve(Hn: torch.Tensor, lam: float, slot: int) -> torch.Tensor:
    """α (B, n) from ``(H + λI) w = 1``, ``α = w/Σw``; per-sample fallback to ``e_slot`` when a
    Cholesky pivot is ``≤ rtol·diagonal`` or α is not finite. Never raises, never syncs."""
    B, n, _ = Hn.shape
    eye = torch.eye(n, dtype=Hn.dtype, device=Hn.device)
    A = Hn + lam * eye
    L, info = torch.linalg.cholesky_ex(A)
    w = torch.cholesky_solve(torch.ones(B, n, 1, dtype=Hn.dtype, device=Hn.device), L).squeeze(-1)
    alpha = w / w.sum(dim=1, keepdim=True)
    piv = torch.diagonal(L, dim1=-2, dim2=-1).square()
    ok = (info == 0) & (piv > pivot_rtol(Hn.dtype) * torch.diagonal(A, dim1=-2, dim2=-1)).all(1)
    return torch.where((ok & torch.isfinite(alpha).all(1))[:, None], alpha, eye[slot].expand(B, n))


def anderson_step(X, G, H, best, lowest, trace, status, fx, k: int, tau: float, lam: float, tol: float,
                  stop_rel: bool) -> None:
    """One Anderson iteration in place (math and buffers: ``getfast/ops/anderson/__init__.py``)."""
    m, acc = X.shape[0], H.dtype
    slot, n, nxt = k % m, min(k + 1, m), (k + 1) % m
    x, f = X[slot].to(acc), fx.to(acc)
    g = f - x
    G[slot].copy_(g)  # rounded to the state dtype: the Gram matrix uses the stored history
    Gn = G[:n].to(acc)
    row = torch.einsum("nbd,bd->bn", Gn, Gn[slot])
    H[:, slot, :n] = row
    H[:, :n, slot] = row
    still = record(g, f, fx, best, lowest, trace, status, k, tol, stop_rel)
    alpha = small_solve(H[:, :n, :n], lam, slot) if n > 1 else torch.ones_like(H[:, :1, 0])
    mixed = torch.einsum("bn,nbd->bd", alpha, X[:n].to(acc) + tau * Gn)
    X[nxt].copy_(torch.where(still[:, None], mixed, x))
