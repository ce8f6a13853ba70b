"""Plain-PyTorch Broyden step: the ground truth of ``getfast::broyden_step``."""
import torch

from ..anderson.naive import record


def broyden_step(x, U, V, g_prev, dx, best, lowest, trace, status, fx, k: int, tol: float, stop_rel: bool) -> None:
    """One Broyden iteration in place (math and buffers: ``getfast/ops/broyden/__init__.py``)."""
    mem, acc = U.shape[0], lowest.dtype
    xa, f = x.to(acc), fx.to(acc)
    g = f - xa
    gs = g.to(x.dtype).to(acc)  # the residual as stored
    still = record(g, f, x, best, lowest, trace, status, k, tol, stop_rel)
    bg = -gs
    if k > 0:
        n, s = min(k - 1, mem), (k - 1) % mem
        dxa, dg = dx.to(acc), gs - g_prev.to(acc)
        Un, Vn = U[:n].to(acc), V[:n].to(acc)
        a, b, c = (torch.einsum("nbd,bd->bn", M, v) for M, v in ((Un, dxa), (Vn, dg), (Vn, gs)))
        den = (a * b).sum(1) - (dxa * dg).sum(1)
        vg = (a * c).sum(1) - (dxa * gs).sum(1)
        ok = torch.isfinite(torch.cat([a, b, c, den[:, None], vg[:, None]], 1)).all(1) & (den != 0)
        u = torch.where(ok[:, None], (dxa - torch.einsum("bn,nbd->bd", b, Un) + dg) / den[:, None], 0.0)
        v = torch.where(ok[:, None], torch.einsum("bn,nbd->bd", a, Vn) - dxa, 0.0)
        if k - 1 >= mem:  # slot s leaves the memory
            c = c.clone()
            c[:, s] = 0.0
        bg = bg + torch.einsum("bn,nbd->bd", c, Un) + torch.where(ok, vg, 0.0)[:, None] * u
        U[s], V[s] = u, v
    x_new = torch.where(still[:, None], xa - bg, xa).to(x.dtype)
    dx.copy_(x_new.to(acc) - xa)
    g_prev.copy_(gs)
    x.copy_(x_new)
