"""getfast.deq solvers: API, statistics, per-sample semantics, syncs, low precision, robustness.

Runs on the `reference` backend of the fused ops unless a test says otherwise (backends are
compared against it in test_deq_ops.py).
"""
import math

import pytest
import torch

import getfast.deq as deq
from getfast.bench.common import OpCounter
from getfast.deq import solvers as S

SOLVERS = ["fixed_point", "anderson", "broyden"]


def _problem(B=4, D=24, dtype=torch.float64, seed=0, scale=0.9):
    """f(z) = tanh(W z + x) with spectral norm ‖W‖ = scale < 1 (a contraction)."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(D, D, generator=g, dtype=torch.float64)
    W = scale * W / torch.linalg.matrix_norm(W, 2)
    x = torch.randn(B, D, generator=g, dtype=torch.float64)
    W, x = W.to(dtype), x.to(dtype)

    def f(z):
        return torch.tanh(z @ W.T + x)

    return f, torch.zeros(B, D, dtype=dtype)


# --------------------------------------------------------------------------------------
# API and registry
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SOLVERS)
def test_solve_by_name_equals_direct_call(name):
    f, z0 = _problem()
    z1, s1 = deq.solve(f, z0, solver=name, max_iter=30, tol=1e-8, backend="reference")
    z2, s2 = getattr(deq, name)(f, z0, max_iter=30, tol=1e-8, backend="reference")
    assert torch.equal(z1, z2)
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key


@pytest.mark.parametrize("name", SOLVERS)
def test_unknown_option_is_type_error(name):
    f, z0 = _problem()
    with pytest.raises(TypeError):
        getattr(deq, name)(f, z0, not_an_option=1)
    with pytest.raises(TypeError):
        deq.solve(f, z0, solver=name, LBFGS_thres=3)


def test_solver_specific_options_are_not_shared():
    f, z0 = _problem()
    with pytest.raises(TypeError):
        deq.fixed_point(f, z0, m=3)
    with pytest.raises(TypeError):
        deq.broyden(f, z0, lam=1e-4)
    with pytest.raises(TypeError):
        deq.anderson(f, z0, memory=3)


@pytest.mark.parametrize(
    "name,kwargs,word",
    [
        ("anderson", {"m": 0}, "m"),
        ("anderson", {"m": 1000}, "m"),
        ("anderson", {"lam": -1.0}, "lam"),
        ("anderson", {"tau": 0.0}, "tau"),
        ("fixed_point", {"tau": float("nan")}, "tau"),
        ("broyden", {"memory": 0}, "memory"),
        ("anderson", {"max_iter": 0}, "max_iter"),
        ("anderson", {"tol": -1.0}, "tol"),
        ("anderson", {"stop_mode": "max"}, "stop_mode"),
        ("broyden", {"check_every": 0}, "check_every"),
        ("fixed_point", {"backend": "gpu"}, "backend"),
    ],
)
def test_bad_values_raise_value_error_naming_option(name, kwargs, word):
    f, z0 = _problem()
    with pytest.raises(ValueError, match=word):
        getattr(deq, name)(f, z0, **kwargs)


def test_bad_inputs_raise_value_error():
    f, z0 = _problem()
    with pytest.raises(ValueError, match="z0"):
        deq.anderson(f, z0.to(torch.int64))
    with pytest.raises(ValueError, match="f"):
        deq.anderson(None, z0)
    with pytest.raises(ValueError, match="f must return"):
        deq.anderson(lambda z: z[:, :3], z0)
    with pytest.raises(ValueError, match="solver"):
        deq.solve(f, z0, solver="newton")


def test_registry_register_and_get():
    def newton(f, z0, *, max_iter=3, tol=None):
        z = z0
        for _ in range(max_iter):
            z = f(z)
        return z, {"nstep": torch.full((z0.shape[0],), float(max_iter))}

    assert "newton" not in deq.list_solvers()
    deq.register_solver("newton", newton)
    try:
        assert deq.get_solver("newton") is newton
        f, z0 = _problem()
        z, st = deq.solve(f, z0, solver="newton", max_iter=2)
        assert torch.equal(z, f(f(z0)))
        with pytest.raises(ValueError, match="already registered"):
            deq.register_solver("newton", newton)
        with pytest.raises(TypeError):
            deq.solve(f, z0, solver="newton", m=3)
    finally:
        S._SOLVERS.pop("newton", None)
    assert sorted(deq.list_solvers()) == ["anderson", "broyden", "fixed_point"]


# --------------------------------------------------------------------------------------
# convergence and statistics
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("stop_mode", ["abs", "rel"])
def test_converges_and_stats_are_consistent(name, stop_mode):
    f, z0 = _problem(B=5, D=31)
    tol = 1e-9
    z, st = deq.solve(f, z0, solver=name, max_iter=80, tol=tol, stop_mode=stop_mode, backend="reference")
    B = z0.shape[0]
    n = st["abs_trace"].shape[1]
    assert n < 80
    for key in ("abs_lowest", "rel_lowest", "nstep", "nonfinite", "converged"):
        assert st[key].shape == (B,), key
    assert st["abs_trace"].shape == st["rel_trace"].shape == (B, n)
    assert st["converged"].all() and not st["nonfinite"].any()
    crit = st["rel_lowest"] if stop_mode == "rel" else st["abs_lowest"]
    assert (crit < tol).all()
    # each lowest is the minimum of its own trace; nstep points at the stop-mode minimum
    torch.testing.assert_close(st["abs_lowest"], st["abs_trace"].min(dim=1).values, rtol=0, atol=0)
    torch.testing.assert_close(st["rel_lowest"], st["rel_trace"].min(dim=1).values, rtol=0, atol=0)
    trace = st["rel_trace"] if stop_mode == "rel" else st["abs_trace"]
    idx = st["nstep"].long() - 1
    torch.testing.assert_close(trace.gather(1, idx[:, None])[:, 0], crit, rtol=0, atol=0)
    # the returned state really is (close to) the fixed point
    res = torch.linalg.vector_norm(f(z) - z, dim=1)
    assert (res < 10 * tol).all()


def test_fixed_point_returns_image_of_lowest_residual_iterate():
    """Replays the Picard iteration by hand: per sample, the iterate with the lowest residual."""
    f, z0 = _problem(B=3, D=9, scale=0.97)
    tau = 0.7
    n = 12
    z, st = deq.fixed_point(f, z0, tau=tau, max_iter=n, tol=None, backend="reference")
    xs, res, imgs = [z0], [], []
    for _ in range(n):
        fx = f(xs[-1])
        res.append(torch.linalg.vector_norm(fx - xs[-1], dim=1))
        imgs.append(fx)
        xs.append(xs[-1] + tau * (fx - xs[-1]))
    res = torch.stack(res, 1)
    torch.testing.assert_close(st["abs_trace"], res, rtol=1e-13, atol=1e-15)
    best = res.argmin(dim=1)
    want = torch.stack([imgs[best[b]][b] for b in range(3)])
    torch.testing.assert_close(z, want, rtol=1e-13, atol=1e-15)
    assert torch.equal(st["nstep"], (best + 1).to(st["nstep"].dtype))


def test_anderson_with_history_one_is_fixed_point():
    f, z0 = _problem(B=3, D=10)
    a = deq.anderson(f, z0, m=1, tau=0.8, max_iter=15, tol=None, backend="reference")
    b = deq.fixed_point(f, z0, tau=0.8, max_iter=15, tol=None, backend="reference")
    torch.testing.assert_close(a[0], b[0], rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(a[1]["abs_trace"], b[1]["abs_trace"], rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize("name", SOLVERS)
def test_any_trailing_shape(name):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)

    def f(z):
        return 0.5 * torch.tanh(z.flip(-1)) + x

    z, st = deq.solve(f, torch.zeros_like(x), solver=name, max_iter=60, tol=1e-7, backend="reference")
    assert z.shape == x.shape and st["converged"].all()
    assert (torch.linalg.vector_norm((f(z) - z).reshape(2, -1), dim=1) < 1e-6).all()
    # a 1-D batch of scalars
    z, st = deq.solve(lambda v: torch.cos(v), torch.zeros(4, dtype=torch.float64), solver=name,
                      max_iter=100, tol=1e-9, backend="reference")
    torch.testing.assert_close(z, torch.full((4,), 0.7390851332151607, dtype=torch.float64), rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("name", SOLVERS)
def test_tol_none_runs_exactly_max_iter_without_syncs(name):
    f, z0 = _problem(B=3, D=12)
    counter = OpCounter()
    with counter:
        z, st = deq.solve(counter.excluding(f), z0, solver=name, max_iter=7, tol=None, backend="reference")
    assert st["abs_trace"].shape == (3, 7)
    assert st["rel_trace"].shape == (3, 7)
    assert counter.syncs() == 0, counter.counts
    assert not st["converged"].any()


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("check_every", [1, 3])
def test_tolerance_syncs_at_most_once_per_check(name, check_every):
    f, z0 = _problem(B=3, D=12)
    counter = OpCounter()
    with counter:
        z, st = deq.solve(counter.excluding(f), z0, solver=name, max_iter=40, tol=1e-6,
                          check_every=check_every, backend="reference")
    n = st["abs_trace"].shape[1]
    assert n % check_every == 0 and n < 40
    assert counter.syncs() == n // check_every, counter.counts


@pytest.mark.parametrize("name", SOLVERS)
def test_converged_samples_stop_changing(name):
    """Each sample's result in a batch equals its solo result: freezing is per sample."""
    g = torch.Generator().manual_seed(5)
    D = 16
    rates = torch.tensor([0.2, 0.9, 0.6], dtype=torch.float64)[:, None]  # sample 0 converges first
    x = torch.randn(3, D, generator=g, dtype=torch.float64)
    P = torch.randperm(D, generator=g)

    def make_f(r, xx):
        return lambda z: r * torch.tanh(z[:, P]) + xx

    z0 = torch.zeros(3, D, dtype=torch.float64)
    tol = 1e-10
    zb, sb = deq.solve(make_f(rates, x), z0, solver=name, max_iter=100, tol=tol, backend="reference")
    n_batch = sb["abs_trace"].shape[1]
    for b in range(3):
        zs, ss = deq.solve(make_f(rates[b:b + 1], x[b:b + 1]), z0[b:b + 1], solver=name, max_iter=100,
                           tol=tol, backend="reference")
        n_solo = ss["abs_trace"].shape[1]
        assert n_solo <= n_batch
        torch.testing.assert_close(zb[b:b + 1], zs, rtol=1e-12, atol=1e-14)
        for key in ("abs_lowest", "rel_lowest", "nstep"):
            torch.testing.assert_close(sb[key][b:b + 1], ss[key], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(sb["abs_trace"][b, :n_solo], ss["abs_trace"][0], rtol=1e-10, atol=1e-14)
        # after it converged the sample is frozen: its residual no longer moves
        frozen = sb["abs_trace"][b, n_solo - 1:]
        torch.testing.assert_close(frozen, frozen[:1].expand_as(frozen), rtol=0, atol=0)


@pytest.mark.parametrize("name", SOLVERS)
def test_nonfinite_sample_is_isolated(name):
    f, z0 = _problem(B=4, D=12)
    bad = 2

    def g(z):
        out = f(z).clone()
        out[bad, 5] = float("nan") if name != "broyden" else float("inf")
        return out

    z, st = deq.solve(g, z0, solver=name, max_iter=25, tol=None, backend="reference")
    keep = [0, 1, 3]
    zr, sr = deq.solve(lambda v: f(torch.cat([v[:2], torch.zeros_like(v[:1]), v[2:]]))[keep], z0[keep],
                       solver=name, max_iter=25, tol=None, backend="reference")
    assert st["nonfinite"].tolist() == [False, False, True, False]
    torch.testing.assert_close(z[keep], zr, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(st["abs_trace"][keep], sr["abs_trace"], rtol=1e-12, atol=1e-14)
    assert torch.isfinite(z).all()
    assert math.isinf(st["abs_lowest"][bad].item()) and st["nstep"][bad].item() == 0
    assert torch.equal(z[bad], z0[bad])  # nothing finite was ever seen: z0 is returned
    assert torch.isinf(st["abs_trace"][bad]).all()


def test_nonfinite_after_progress_keeps_best_finite_iterate():
    f, z0 = _problem(B=2, D=8)
    calls = {"n": 0}

    def g(z):
        calls["n"] += 1
        out = f(z).clone()
        if calls["n"] >= 6:
            out[1] = float("nan")
        return out

    z, st = deq.anderson(g, z0, max_iter=12, tol=None, backend="reference")
    assert st["nonfinite"].tolist() == [False, True]
    assert st["nstep"][1].item() <= 5 and torch.isfinite(z[1]).all()
    torch.testing.assert_close(st["abs_lowest"][1], st["abs_trace"][1, :5].min())


# --------------------------------------------------------------------------------------
# Anderson robustness and low precision
# --------------------------------------------------------------------------------------
def test_anderson_singular_system_falls_back_per_sample():
    """lam=0 and a constant map: after one step g = 0, the Gram matrix is singular."""
    g = torch.Generator().manual_seed(1)
    c = torch.randn(3, 7, generator=g, dtype=torch.float64)
    f2, _ = _problem(B=3, D=7)

    def f(z):  # sample 0: constant map (singular history); samples 1-2: a contraction
        out = f2(z)
        return torch.cat([c[:1].expand(1, -1), out[1:]])

    z, st = deq.anderson(f, torch.zeros(3, 7, dtype=torch.float64), lam=0.0, max_iter=20, tol=None,
                         backend="reference")
    assert torch.isfinite(z).all() and not st["nonfinite"].any()
    assert torch.equal(z[0], c[0])
    assert st["abs_lowest"][0].item() == 0.0
    assert (st["abs_lowest"][1:] < 1e-8).all()


@pytest.mark.parametrize("name", SOLVERS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_states(name, dtype, monkeypatch):
    seen = []
    real_step = S.anderson_step

    def spy(state, *args, **kwargs):
        seen.append((state.X.dtype, state.G.dtype, state.H.dtype))
        return real_step(state, *args, **kwargs)

    monkeypatch.setattr(S, "anderson_step", spy)
    f, z0 = _problem(B=4, D=64, dtype=dtype)
    z, st = deq.solve(f, z0, solver=name, max_iter=40, tol=2e-2, backend="reference")
    assert z.dtype == dtype and torch.isfinite(z).all()
    assert st["abs_lowest"].dtype == torch.float32
    assert st["converged"].all()
    res = torch.linalg.vector_norm((f(z) - z).float(), dim=1)
    assert (res < 0.1).all()
    if name != "broyden":
        assert seen and all(s == (dtype, dtype, torch.float32) for s in seen)


def test_broyden_ring_memory():
    f, z0 = _problem(B=3, D=40, scale=0.95)
    _, full = deq.broyden(f, z0, max_iter=60, tol=1e-10, backend="reference")
    _, big = deq.broyden(f, z0, memory=60, max_iter=60, tol=1e-10, backend="reference")
    z, ring = deq.broyden(f, z0, memory=3, max_iter=60, tol=1e-10, backend="reference")
    torch.testing.assert_close(full["abs_trace"], big["abs_trace"], rtol=0, atol=0)
    assert ring["converged"].all()
    assert (torch.linalg.vector_norm(f(z) - z, dim=1) < 1e-9).all()


def test_solver_runs_without_autograd_and_returns_detached():
    f, z0 = _problem(B=2, D=6)
    W = torch.randn(6, 6, dtype=torch.float64, requires_grad=True)
    z, st = deq.anderson(lambda v: torch.tanh(0.1 * v @ W), z0.requires_grad_(), max_iter=5, tol=None,
                         backend="reference")
    assert not z.requires_grad and z.grad_fn is None


# --------------------------------------------------------------------------------------
# inputs a user may pass, and memory held for max_iter
# --------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "cpp"])
@pytest.mark.parametrize("name", SOLVERS)
def test_non_contiguous_z0_is_accepted(name, backend):
    f, z0 = _problem(B=3, D=10)
    zt = torch.randn(10, 3, dtype=torch.float64).t()  # (B, D) with transposed strides
    assert not zt.is_contiguous()
    z, st = deq.solve(f, zt, solver=name, max_iter=6, tol=None, backend=backend)
    zc, sc = deq.solve(f, zt.contiguous(), solver=name, max_iter=6, tol=None, backend=backend)
    assert torch.equal(z, zc) and torch.equal(st["abs_trace"], sc["abs_trace"])


@pytest.mark.parametrize("name", SOLVERS)
def test_errors_name_the_public_argument(name):
    f, z0 = _problem(B=2, D=5)
    with pytest.raises(ValueError, match=r"^f must return a tensor shaped like z0 \(2, 5\)"):
        deq.solve(lambda z: z[:, :4], z0, solver=name, max_iter=3)
    with pytest.raises(ValueError, match="^z0 must be"):
        deq.solve(f, z0.long(), solver=name, max_iter=3)
    with pytest.raises(ValueError, match="^z0 must be a non-empty tensor"):
        deq.solve(f, z0[:, :0], solver=name, max_iter=3)


def test_history_grows_on_demand_instead_of_max_iter(monkeypatch):
    """max_iter bounds the work, not the memory held up front: a solve that converges in a few
    dozen iterations allocates a few dozen history columns even with max_iter = 10**5 / 10**7."""
    sizes = []
    real_new_zeros, real_zeros_like = torch.Tensor.new_zeros, torch.zeros_like

    def new_zeros(self, size, *a, **k):
        sizes.append(math.prod(size) if isinstance(size, (tuple, list)) else size)
        return real_new_zeros(self, size, *a, **k)

    def zeros_like(t, *a, **k):
        sizes.append(t.numel())
        return real_zeros_like(t, *a, **k)

    monkeypatch.setattr(torch.Tensor, "new_zeros", new_zeros)
    monkeypatch.setattr(torch, "zeros_like", zeros_like)
    f, z0 = _problem(B=2, D=16)
    for solver, max_iter in (("broyden", 10**5), ("anderson", 10**7), ("fixed_point", 10**7)):
        sizes.clear()
        z, st = deq.solve(f, z0, solver=solver, max_iter=max_iter, tol=1e-8, backend="cpp")
        assert st["converged"].all(), solver
        n = st["abs_trace"].shape[1]
        assert n < 200 and max(sizes) <= 2 * 2 * 16 * max(64, n), (solver, n, max(sizes))
