"""getfast.deq gradients: IFT vs unrolled autograd and finite differences, phantom gradient vs
autograd through k steps (exact), fixed-point correction weights, Hutchinson Jacobian term."""
import pytest
import torch

import getfast.deq as deq

DT = torch.float64


def _params(D=7, B=3, seed=0, scale=0.7):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=DT)
    W = (scale * W / torch.linalg.matrix_norm(W, 2)).requires_grad_()
    x = torch.randn(B, D, generator=g, dtype=DT).requires_grad_()
    c = torch.randn(B, D, generator=g, dtype=DT)
    return W, x, c


def _f(W, x):
    return lambda z: torch.tanh(z @ W.T + x)


def _loss(z, c):
    return (z * c).sum() + 0.5 * (z ** 2).sum()


def _solve_star(W, x, tol=1e-13):
    z, st = deq.anderson(_f(W, x), torch.zeros_like(x), lam=0.0, max_iter=200, tol=tol, backend="reference")
    assert st["converged"].all()
    return z


@pytest.mark.parametrize("solver,opts", [
    ("fixed_point", {"max_iter": 300, "tol": 1e-13}),
    ("anderson", {"max_iter": 200, "tol": 1e-13, "lam": 0.0}),
    ("broyden", {"max_iter": 100, "tol": 1e-13}),
    ("fixed_point", {"max_iter": 150, "tol": None}),
])
def test_ift_matches_long_unrolled_autograd(solver, opts):
    W, x, c = _params()
    f = _f(W, x)
    hooks = []
    y = deq.ift(f, _solve_star(W, x), solver=solver, stats_hook=hooks.append, backend="reference", **opts)
    gW, gx = torch.autograd.grad(_loss(y, c), (W, x))
    assert len(hooks) == 1 and hooks[0]["abs_lowest"].shape == (3,)
    z = torch.zeros_like(x)
    for _ in range(200):  # contraction 0.7: 0.7^200 ~ 1e-31
        z = f(z)
    uW, ux = torch.autograd.grad(_loss(z, c), (W, x))
    torch.testing.assert_close(gW, uW, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gx, ux, rtol=1e-9, atol=1e-10)


def test_ift_matches_finite_differences():
    W, x, c = _params(D=5, B=2, seed=1)
    y = deq.ift(_f(W, x), _solve_star(W, x), solver="anderson", lam=0.0, max_iter=200, tol=1e-13,
                backend="reference")
    gW, gx = torch.autograd.grad(_loss(y, c), (W, x))
    eps = 1e-6

    def L(Wv, xv):
        with torch.no_grad():
            return _loss(_solve_star(Wv, xv, tol=1e-14), c).item()

    Wd, xd = W.detach(), x.detach()
    for (i, j) in [(0, 0), (1, 3), (4, 2)]:
        E = torch.zeros_like(Wd)
        E[i, j] = eps
        fd = (L(Wd + E, xd) - L(Wd - E, xd)) / (2 * eps)
        assert abs(fd - gW[i, j].item()) < 1e-7 * max(1.0, abs(fd)), (i, j, fd, gW[i, j].item())
    for (b, j) in [(0, 1), (1, 4)]:
        E = torch.zeros_like(xd)
        E[b, j] = eps
        fd = (L(Wd, xd + E) - L(Wd, xd - E)) / (2 * eps)
        assert abs(fd - gx[b, j].item()) < 1e-7 * max(1.0, abs(fd)), (b, j, fd, gx[b, j].item())


def test_ift_forward_value_and_option_checks():
    W, x, c = _params()
    f = _f(W, x)
    z = _solve_star(W, x)
    y = deq.ift(f, z, solver="fixed_point", max_iter=5)
    torch.testing.assert_close(y, f(z))  # forward is one application of f at the detached z*
    with pytest.raises(TypeError, match="bogus"):
        deq.ift(f, z, solver="anderson", bogus=1)
    with pytest.raises(ValueError, match="solver"):
        deq.ift(f, z, solver="nope")
    with torch.no_grad():
        assert deq.ift(f, z).grad_fn is None


@pytest.mark.parametrize("tau", [1.0, 0.6])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_phantom_grad_equals_autograd_through_k_steps(tau, k):
    W, x, c = _params()
    f = _f(W, x)
    z_star = _solve_star(W, x, tol=1e-6) + 0.01  # any start; the start is detached
    states = deq.phantom_grad(f, z_star, k=k, tau=tau)
    assert len(states) == k
    loss = deq.fp_correction(lambda s, t: ((s - t) ** 2).sum(), states, c, gamma=0.8)
    gW, gx = torch.autograd.grad(loss, (W, x))

    z = z_star.detach()
    manual = []
    for _ in range(k):
        fz = f(z)
        z = fz if tau == 1.0 else tau * fz + (1.0 - tau) * z
        manual.append(z)
    ref = sum(0.8 ** (k - 1 - i) * ((s - c) ** 2).sum() for i, s in enumerate(manual))
    rW, rx = torch.autograd.grad(ref, (W, x))
    for a, b in zip(states, manual):
        assert torch.equal(a, b)
    assert torch.equal(gW, rW) and torch.equal(gx, rx)


def test_phantom_grad_supervision_and_detach():
    W, x, c = _params()
    f = _f(W, x)
    z0 = torch.zeros_like(x).requires_grad_()
    allst = deq.phantom_grad(f, z0, k=6)
    assert len(allst) == 6
    last = deq.phantom_grad(f, z0, k=6, supervise="last")
    assert len(last) == 1 and torch.equal(last[0], allst[-1])
    some = deq.phantom_grad(f, z0, k=6, supervise=[2, 5])
    assert torch.equal(some[0], allst[1]) and torch.equal(some[1], allst[4])
    g = torch.autograd.grad(allst[-1].sum(), z0, allow_unused=True)[0]
    assert g is None  # the start is detached
    kept = deq.phantom_grad(f, z0, k=2, detach=False)
    assert torch.autograd.grad(kept[-1].sum(), z0)[0] is not None
    assert deq.unrolled is deq.phantom_grad
    for bad in ({"k": 0}, {"tau": 0.0}, {"tau": 1.5}, {"supervise": [0]}, {"supervise": "first"}):
        with pytest.raises(ValueError):
            deq.phantom_grad(f, z0, **{"k": 3, **bad})


def test_fp_correction_weights_get_recipe():
    w = deq.fp_correction_weights(6, 0.8)
    assert w == [0.8 ** (5 - k) for k in range(6)] and w[-1] == 1.0
    states = [torch.full((2,), float(i)) for i in range(6)]
    loss = deq.fp_correction(lambda s: s.sum(), states)
    assert loss.item() == pytest.approx(sum(0.8 ** (5 - i) * 2 * i for i in range(6)))
    with pytest.raises(ValueError):
        deq.fp_correction(lambda s: s.sum(), [])
    with pytest.raises(ValueError):
        deq.fp_correction_weights(0)


def test_fp_correction_matches_torchdeq():
    torchdeq_loss = pytest.importorskip("torchdeq.loss")
    g = torch.Generator().manual_seed(0)
    states = [torch.randn(3, 4, generator=g) for _ in range(5)]
    y = torch.randn(3, 4, generator=g)
    crit = lambda a, b: (a - b).abs().mean()  # noqa: E731
    ours = deq.fp_correction(crit, states, y, gamma=0.8)
    theirs = torchdeq_loss.fp_correction(crit, (states, y), weight_func="exp", gamma=0.8)
    torch.testing.assert_close(ours, theirs)


def test_jacobian_reg_is_unbiased_and_differentiable():
    W, x, _ = _params(D=6, B=2, seed=3)
    z = torch.randn(2, 6, dtype=DT).requires_grad_()
    fz = torch.tanh(z @ W.T + x)
    # exact ||J||_F^2 per sample: J_b = diag(1 - fz_b^2) W
    s = (1 - fz.detach() ** 2)
    exact = sum(((s[b][:, None] * W.detach()) ** 2).sum() for b in range(2)) / z.numel()
    gen = torch.Generator().manual_seed(0)
    est = deq.jacobian_reg(fz, z, n_samples=4000, create_graph=False, generator=gen)
    assert abs(est.item() - exact.item()) < 0.05 * exact.item()
    small = deq.jacobian_reg(fz, z, n_samples=2)
    (gW,) = torch.autograd.grad(small, (W,))
    assert torch.isfinite(gW).all() and gW.abs().sum() > 0
    with pytest.raises(ValueError):
        deq.jacobian_reg(fz, z.detach())


def test_jacobian_reg_matches_torchdeq_on_same_noise():
    torchdeq_loss = pytest.importorskip("torchdeq.loss")
    W, x, _ = _params(D=6, B=2, seed=4)
    z = torch.randn(2, 6, dtype=DT).requires_grad_()
    fz = torch.tanh(z @ W.T + x)
    torch.manual_seed(7)
    ours = deq.jacobian_reg(fz, z, n_samples=3)
    torch.manual_seed(7)
    theirs = torchdeq_loss.jac_reg(fz, z, vecs=3)
    torch.testing.assert_close(ours.double(), theirs.double(), rtol=1e-6, atol=0)
