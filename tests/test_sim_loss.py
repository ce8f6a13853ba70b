"""getfast::sim_loss on every backend present against the plain-PyTorch reference in float64."""
import pytest
import torch

from getfast.ops import sim as S
from getfast.ops import sim_loss, sim_loss_reference
from getfast.ops._framework import acc_dtype

CPU_BACKENDS = ["reference", "cpp", "triton"]
SHAPES = [(5, 3, 31, 29), (7, 123), (3, 257), (1, 1)]


def _inputs(shape, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, f, g = (torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3))
    sigma = (torch.rand(shape[0], generator=gen, dtype=torch.float64) * 2 + 0.2).to(device)
    return a, f, g, sigma


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_and_backward_match_reference_fp64(backend, shape, nan_empty):
    a, f, g, sigma = _inputs(shape)
    c = 0.37
    leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    ref = sim_loss_reference(*leaves, sigma, c)
    loss, stats = S.SIM_LOSS.run(backend, a, f, g, sigma, c)
    assert torch.isfinite(loss).all() and torch.isfinite(stats).all()
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    y = ((a - f) / sigma.view(-1, *([1] * (a.dim() - 1))) ** 2).reshape(shape[0], -1)
    torch.testing.assert_close(stats[:, 0], torch.sqrt((y * y).sum(1) + c * c), rtol=1e-12, atol=1e-12)
    upstream = torch.linspace(-1.0, 2.0, shape[0], dtype=torch.float64)
    (ref * upstream).sum().backward()
    grads = S.SIM_LOSS_BACKWARD.run(backend, upstream, a, f, g, sigma, stats, c)
    for name, got, leaf in zip(("d_teacher", "d_fake", "x_g"), grads, leaves):
        assert torch.isfinite(got).all(), name
        torch.testing.assert_close(got, leaf.grad, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_public_op_end_to_end(backend, monkeypatch):
    monkeypatch.setenv("GETFAST_BACKEND", backend)
    a, f, g, sigma = _inputs((5, 3, 31, 29), seed=2)
    leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    ref_leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    w = torch.randn(5, dtype=torch.float64)
    loss = sim_loss(*leaves, sigma, 0.5)
    ref = sim_loss_reference(*ref_leaves, sigma, 0.5)
    assert loss.shape == (5,) and loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref.detach(), rtol=1e-12, atol=1e-12)
    (loss * w).sum().backward()
    (ref * w).sum().backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-10, atol=1e-12)
    with torch.no_grad():  # no autograd: the launcher alone
        torch.testing.assert_close(sim_loss(a, f, g, sigma, 0.5), ref.detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_custom_op(backend, monkeypatch):
    monkeypatch.setenv("GETFAST_BACKEND", backend)
    a, f, g, sigma = _inputs((2, 2, 3), seed=4)  # small: gradcheck calls the op 2·numel times
    leaves = tuple(t.clone().requires_grad_() for t in (a, f, g))
    assert torch.autograd.gradcheck(lambda x, y, z: sim_loss(x, y, z, sigma, 0.8), leaves)
    small = tuple(t[:, :1].detach().clone().requires_grad_() for t in leaves)  # through the torch.library op too
    assert torch.autograd.gradcheck(lambda x, y, z: torch.ops.getfast.sim_loss(x, y, z, sigma, 0.8)[0], small)


def test_normaliser_not_detached():
    # With a detached normaliser the d_teacher gradient would be w/(r s^2) only.
    a, f, g, sigma = _inputs((2, 9), seed=5)
    at = a.clone().requires_grad_()
    sim_loss(at, f, g, sigma, 0.1).sum().backward()
    s = sigma[:, None] ** 2
    y = (a - f) / s
    r = torch.sqrt((y * y).sum(1, keepdim=True) + 0.01)
    assert not torch.allclose(at.grad, (f - g) / (r * s * s))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype, nan_empty):
    a, f, g, sigma = _inputs((5, 3, 31, 29), dtype=dtype, seed=6)
    sigma = sigma.float()
    ref = sim_loss_reference(a.double(), f.double(), g.double(), sigma.double(), 0.9)
    loss, stats = S.SIM_LOSS.run(backend, a, f, g, sigma, 0.9)
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    leaves = [t.double().requires_grad_() for t in (a, f, g)]
    sim_loss_reference(*leaves, sigma.double(), 0.9).sum().backward()
    grads = S.SIM_LOSS_BACKWARD.run(backend, torch.ones(5), a, f, g, sigma, stats, 0.9)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for got, leaf in zip(grads, leaves):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), leaf.grad, rtol=tol, atol=tol * leaf.grad.abs().max().item())


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_torch_compile_fullgraph(backend, monkeypatch):
    monkeypatch.setenv("GETFAST_BACKEND", backend)
    torch._dynamo.reset()

    def fn(a, f, g, sigma):  # reference: the custom op's own launcher (the public function runs eager ops)
        loss = torch.ops.getfast.sim_loss(a, f, g, sigma, 0.5)[0] if backend == "reference" else sim_loss(a, f, g, sigma, 0.5)
        return (loss * torch.arange(1, 6, dtype=a.dtype)).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, f, g, sigma = _inputs((5, 3, 7, 9), seed=7)
    leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    ref_leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    out = compiled(*leaves, sigma)
    out.backward()
    ref = fn(*ref_leaves, sigma)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.slow
def test_torch_compile_inductor_fullgraph(monkeypatch):
    monkeypatch.setenv("GETFAST_BACKEND", "cpp")
    torch._dynamo.reset()

    def fn(a, f, g, sigma):
        return sim_loss(a * 2, f, g, sigma, 0.5).square().sum()

    compiled = torch.compile(fn, fullgraph=True)
    a, f, g, sigma = _inputs((5, 3, 31, 29), dtype=torch.float32, seed=8)
    leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    ref_leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    compiled(*leaves, sigma).backward()
    fn(*ref_leaves, sigma).backward()
    for got, want in zip(leaves, ref_leaves):
        torch.testing.assert_close(got.grad, want.grad)


@pytest.mark.parametrize("backend", ["reference", "cpp"])
def test_opcheck(backend, monkeypatch):
    monkeypatch.setenv("GETFAST_BACKEND", backend)
    a, f, g, sigma = _inputs((5, 3, 7, 9), dtype=torch.float32, seed=9)
    leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    torch.library.opcheck(torch.ops.getfast.sim_loss.default, (*leaves, sigma, 0.5))
    _, stats = S.SIM_LOSS.run(backend, a, f, g, sigma, 0.5)
    torch.library.opcheck(torch.ops.getfast.sim_loss_backward.default, (torch.ones(5), a, f, g, sigma, stats, 0.5))


# ---- sigma -----------------------------------------------------------------------------
def test_sigma_as_a_number():
    a, f, g, _ = _inputs((4, 6), seed=12)
    full = torch.full((4,), 0.7, dtype=torch.float64)
    torch.testing.assert_close(sim_loss(a, f, g, 0.7, 0.5), sim_loss_reference(a, f, g, full, 0.5))
    torch.testing.assert_close(sim_loss(a, f, g, 2, 0.5), sim_loss_reference(a, f, g, full * 0 + 2, 0.5))
    for bad in (-0.5, 0.0, float("nan"), "1.0", None, True):
        with pytest.raises(ValueError, match="sigma"):
            sim_loss(a, f, g, bad, 0.5)


@pytest.mark.parametrize("backend,error", [("cpp", ValueError), ("reference", RuntimeError),
                                           ("triton", RuntimeError)])
def test_negative_sigma_tensor_refused(backend, error, monkeypatch):
    monkeypatch.setenv("GETFAST_BACKEND", backend)
    a, f, g, sigma = _inputs((3, 8), seed=13)
    sigma[1] = -sigma[1]
    with pytest.raises(error, match="sigma must be > 0"):
        sim_loss(a, f, g, sigma, 0.5)


# ---- bad inputs ------------------------------------------------------------------------
def _good():
    a, f, g, sigma = _inputs((4, 3, 5, 5), dtype=torch.float32, seed=10)
    return dict(d_teacher=a, d_fake=f, x_g=g, sigma=sigma.float(), c=0.5)


def _bad_cases():
    k = _good()
    return [
        ("d_teacher", dict(k, d_teacher=k["d_teacher"].to(torch.int32))),
        ("d_fake", dict(k, d_fake=k["d_fake"].double())),
        ("x_g", dict(k, x_g=k["x_g"][:, :2].contiguous())),
        ("d_fake", dict(k, d_fake=k["d_fake"].transpose(2, 3))),  # non-contiguous
        ("x_g", dict(k, x_g=torch.empty(4, 3, 5, 5, device="meta"))),  # device mismatch
        ("d_teacher", dict(k, d_teacher=torch.empty(0, 3), d_fake=torch.empty(0, 3), x_g=torch.empty(0, 3),
                           sigma=torch.empty(0))),
        ("d_teacher", dict(k, d_teacher=torch.empty(4, 0), d_fake=torch.empty(4, 0), x_g=torch.empty(4, 0))),
        ("sigma", dict(k, sigma=torch.ones(3))),
        ("sigma", dict(k, sigma=torch.ones(4, 1))),
        ("sigma", dict(k, sigma=torch.ones(4, dtype=torch.int64))),
        ("c", dict(k, c=0.0)),
        ("c", dict(k, c=-1.0)),
        ("c", dict(k, c=float("nan"))),
        ("d_teacher", dict(k, d_teacher=k["d_teacher"].numpy())),
    ]


@pytest.mark.parametrize("argname,kwargs", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("entry", ["wrapper", "torch_ops", "cpp"])
def test_bad_inputs_raise_value_error(argname, kwargs, entry):
    if entry == "wrapper":
        call = lambda: sim_loss(**kwargs)  # noqa: E731
    elif entry == "torch_ops":
        if not all(isinstance(kwargs[n], torch.Tensor) for n in ("d_teacher", "d_fake", "x_g")):
            pytest.skip("the dispatcher rejects non-tensors itself")
        call = lambda: torch.ops.getfast.sim_loss(*kwargs.values())  # noqa: E731
    else:
        call = lambda: S.SIM_LOSS.run("cpp", *kwargs.values())  # noqa: E731
    with pytest.raises(ValueError, match=argname):
        call()


def test_backward_validates_grad_and_stats():
    k = _good()
    _, stats = S.SIM_LOSS.run("reference", *k.values())
    with pytest.raises(ValueError, match="grad"):
        S.SIM_LOSS_BACKWARD(torch.ones(3), k["d_teacher"], k["d_fake"], k["x_g"], k["sigma"], stats, 0.5)
    with pytest.raises(ValueError, match="stats"):
        S.SIM_LOSS_BACKWARD(torch.ones(4), k["d_teacher"], k["d_fake"], k["x_g"], k["sigma"], stats.double(), 0.5)


def test_forced_unavailable_backend_is_an_error(monkeypatch):
    k = _good()
    monkeypatch.setenv("GETFAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors only"):
        sim_loss(**k)
    monkeypatch.setenv("GETFAST_BACKEND", "bogus")
    with pytest.raises(RuntimeError, match="not a backend"):
        sim_loss(**k)


# ---- GPU (skipped without one) ---------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cuda_cupy"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gpu_backends(backend, dtype, monkeypatch, nan_empty):
    launched = None
    if backend == "cuda_cupy":
        pytest.importorskip("cupy")
        from getfast.ops import _cupy, _framework

        # Without _C only the CuPy/NVRTC path is left: the launchers look load_C up in getfast.ops.sim, the
        # availability check in _framework; both must see no extension. Then prove CuPy ran the kernels.
        monkeypatch.setattr(_framework, "load_C", lambda required=True: None)
        monkeypatch.setattr(S, "load_C", lambda required=True: None)
        launched = []
        real_launch = _cupy.launch
        monkeypatch.setattr(_cupy, "launch", lambda *a, **k: launched.append(a[1]) or real_launch(*a, **k))
        if _cupy.unavailable_reason() is not None:
            pytest.skip(f"CuPy path unavailable: {_cupy.unavailable_reason()}")
        backend = "cuda"
    a, f, g, sigma = _inputs((5, 3, 31, 29), dtype=dtype, device="cuda", seed=11)
    ref = sim_loss_reference(a.double(), f.double(), g.double(), sigma.double(), 0.6)
    loss, stats = S.SIM_LOSS.run(backend, a, f, g, sigma, 0.6)
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    _, ref_stats = S.SIM_LOSS.run("reference", a, f, g, sigma, 0.6)
    up = torch.randn(5, device="cuda", dtype=acc_dtype(dtype))
    want = S.SIM_LOSS_BACKWARD.run("reference", up, a, f, g, sigma, ref_stats, 0.6)
    got = S.SIM_LOSS_BACKWARD.run(backend, up, a, f, g, sigma, stats, 0.6)
    gtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y.double(), rtol=gtol, atol=gtol * y.double().abs().max().item())
    if launched is not None:
        assert [n.split("<")[0] for n in launched] == ["getfast::sim_loss_fwd", "getfast::sim_loss_bwd"], launched
