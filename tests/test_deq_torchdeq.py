"""getfast.deq against torchdeq 0.1.0 (the reference ecosystem): same fixed points in no more
evaluations of f, identical trajectories where the algorithms coincide, and the cases where
torchdeq fails (bf16 states, a singular Anderson system) but getfast does not."""
import pytest
import torch

import getfast.deq as deq

torchdeq_solver = pytest.importorskip("torchdeq.solver")

PAIRS = [("fixed_point", "fixed_point_iter"), ("anderson", "anderson"), ("broyden", "broyden")]


def _tanh_problem(B, D, dtype, seed, scale=0.9):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    W = (scale * W / torch.linalg.matrix_norm(W, 2)).to(dtype)
    x = (2 * torch.randn(B, D, generator=g, dtype=torch.float64)).to(dtype)
    return (lambda z: torch.tanh(z @ W.T + x)), torch.zeros(B, D, dtype=dtype)


class Counted:
    def __init__(self, f):
        self.f, self.calls = f, 0

    def __call__(self, z):
        self.calls += 1
        return self.f(z)


def _theirs(name, f, z0, **kw):
    z, _, stats = torchdeq_solver.get_solver(name)(f, z0, **kw)
    return z, stats


@pytest.mark.parametrize("ours,theirs", PAIRS)
@pytest.mark.parametrize("dtype,tol,seed,B,D", [
    (torch.float64, 1e-8, 0, 4, 50),
    (torch.float32, 1e-4, 2, 8, 300),
    (torch.float32, 1e-3, 3, 2, 64),
])
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_same_fixed_point_in_no_more_evaluations(ours, theirs, dtype, tol, seed, B, D, stop_mode):
    f, z0 = _tanh_problem(B, D, dtype, seed)
    fo, ft = Counted(f), Counted(f)
    z, st = deq.solve(fo, z0, solver=ours, max_iter=100, tol=tol, stop_mode=stop_mode)
    zt, stt = _theirs(theirs, ft, z0, max_iter=100, tol=tol, stop_mode=stop_mode)
    assert st["converged"].all()
    assert fo.calls <= ft.calls, (fo.calls, ft.calls)
    # both are within tol of the unique fixed point z*; for a 0.9-contraction the distance
    # between two approximations is at most (res1 + res2) / (1 - 0.9)
    res = torch.linalg.vector_norm((f(z) - z).double(), dim=1)
    res_t = torch.linalg.vector_norm((f(zt) - zt).double(), dim=1)
    dist = torch.linalg.vector_norm((z - zt).double(), dim=1)
    assert (dist <= (res + res_t) / 0.1 + 1e-6).all()
    crit = st["rel_lowest"] if stop_mode == "rel" else st["abs_lowest"]
    assert (crit < tol).all()


def test_trajectories_coincide_with_torchdeq():
    """tau = 1, float64, no early exit: the same iterates, so the same residual traces.

    torchdeq records no residual for the first two Anderson evaluations and the first Broyden
    one; getfast records every evaluation, hence the column offsets."""
    f, z0 = _tanh_problem(3, 40, torch.float64, 7, scale=0.95)
    n = 20
    _, s = deq.fixed_point(f, z0, max_iter=n, tol=None)
    _, t = _theirs("fixed_point_iter", f, z0, max_iter=n, tol=1e-300)
    torch.testing.assert_close(s["abs_trace"], t["abs_trace"][:, 1:], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(s["rel_trace"], t["rel_trace"][:, 1:], rtol=1e-12, atol=1e-14)

    za, s = deq.anderson(f, z0, m=5, lam=1e-4, max_iter=n, tol=None)
    zt, t = _theirs("anderson", f, z0, m=5, lam=1e-4, max_iter=n, tol=1e-300)
    torch.testing.assert_close(s["abs_trace"][:, 2:], t["abs_trace"][:, 1:], rtol=1e-8, atol=1e-12)
    torch.testing.assert_close(za, zt, rtol=1e-8, atol=1e-10)

    zb, s = deq.broyden(f, z0, max_iter=n, tol=None)
    zt, t = _theirs("broyden", f, z0, max_iter=n, tol=1e-300)
    torch.testing.assert_close(s["abs_trace"][:, 1:], t["abs_trace"][:, 1:n], rtol=1e-8, atol=1e-12)


@pytest.mark.slow
def test_get_equilibrium_block():
    models = pytest.importorskip("getfast.models")
    try:
        net = models.create("GET-N/4", img_resolution=8, in_channels=1)
    except Exception as exc:  # pragma: no cover - depends on another package part
        pytest.skip(f"GET-N/4 unavailable: {exc}")
    torch.manual_seed(0)
    net.eval()
    with torch.no_grad():
        x, offsets = net.inject(torch.randn(2, 1, 8, 8))

        def f(z):  # the GET equilibrium transformer, scaled to a contraction
            return 0.2 * net.equilibrium_step(z, *offsets)

        z0 = torch.randn_like(x)
        for ours, theirs in PAIRS:
            fo, ft = Counted(f), Counted(f)
            z, st = deq.solve(fo, z0, solver=ours, max_iter=60, tol=1e-3, stop_mode="rel")
            zt, stt = _theirs(theirs, ft, z0, max_iter=60, tol=1e-3, stop_mode="rel")
            assert st["converged"].all(), ours
            assert fo.calls <= ft.calls, (ours, fo.calls, ft.calls)
            scale = torch.linalg.vector_norm(zt.reshape(2, -1), dim=1)
            dist = torch.linalg.vector_norm((z - zt).reshape(2, -1), dim=1)
            assert (dist <= 0.05 * scale).all(), (ours, dist, scale)


def test_bf16_states_work_where_torchdeq_anderson_fails():
    f, z0 = _tanh_problem(4, 64, torch.bfloat16, 4)
    with pytest.raises(Exception):
        _theirs("anderson", f, z0, max_iter=20, tol=1e-2)
    z, st = deq.anderson(f, z0, max_iter=30, tol=2e-2)
    assert z.dtype == torch.bfloat16 and st["converged"].all()


def test_singular_anderson_system_falls_back_where_torchdeq_raises():
    """f = identity with lam = 0: every residual is 0, the (bordered) Gram system is singular."""
    z0 = torch.randn(3, 6, dtype=torch.float64)
    with pytest.raises(Exception):
        _theirs("anderson", lambda z: z.clone(), z0, lam=0.0, max_iter=10, tol=1e-300)
    # f returns its own input (aliasing the solver's history slot): handled too
    z, st = deq.anderson(lambda z: z, z0, lam=0.0, max_iter=10, tol=None)
    assert torch.equal(z, z0) and not st["nonfinite"].any()
    assert (st["abs_trace"] == 0).all()
