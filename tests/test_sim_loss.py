"""getfast::sim_loss on every available backend against the PyTorch reference."""
import math

import pytest
import torch

from getfast.ops import _framework as F
from getfast.ops import sim_loss, sim_loss_reference
from getfast.ops import sim_loss_op as M

CPU_BACKENDS = ["reference", "cpp", "triton"]
SHAPES = [(5, 3, 31, 29), (7, 123), (3, 257), (1, 1)]


def _inputs(shape, dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    a, f, g = (torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype) for _ in range(3))
    sigma = (torch.rand(shape[0], generator=gen, dtype=torch.float64) * 2 + 0.2).to(device)
    return a, f, g, sigma


def _poisoned_fwd_out(B, dtype, device="cpu"):
    return (torch.full((B,), math.nan, dtype=dtype, device=device),
            torch.full((B, 2), math.nan, dtype=dtype, device=device))


def test_cpu_backends_available(no_backend_env):
    avail = F.available_backends("sim_loss", "cpu")
    assert avail == ["reference", "triton", "cpp"]
    assert F.select_backend("sim_loss", "cpu") == "cpp"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_forward_matches_reference_fp64(backend, shape):
    a, f, g, sigma = _inputs(shape)
    c = 0.37
    ref = sim_loss_reference(a, f, g, sigma, c)
    out = _poisoned_fwd_out(shape[0], torch.float64)
    loss, stats = M.forward(a, f, g, sigma, c, backend=backend, out=out)
    assert loss is out[0] and stats is out[1]
    assert torch.isfinite(loss).all() and torch.isfinite(stats).all()
    torch.testing.assert_close(loss, ref, rtol=1e-12, atol=1e-12)
    y = ((a - f) / sigma.view(-1, *([1] * (a.dim() - 1))) ** 2).reshape(shape[0], -1)
    torch.testing.assert_close(stats[:, 0], torch.sqrt((y * y).sum(1) + c * c), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_backward_matches_autograd_fp64(backend, shape):
    a, f, g, sigma = _inputs(shape, seed=1)
    c = 1.3
    leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    upstream = torch.linspace(-1.0, 2.0, shape[0], dtype=torch.float64)
    (sim_loss_reference(*leaves, sigma, c) * upstream).sum().backward()
    _, stats = M.forward(a, f, g, sigma, c, backend="reference")
    out = tuple(torch.full_like(a, math.nan) for _ in range(3))
    grads = M.backward(upstream, a, f, g, sigma, stats, c, backend=backend, out=out)
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


def test_gradcheck_reference():
    a, f, g, sigma = _inputs((3, 2, 5, 7), seed=3)
    leaves = tuple(t.clone().requires_grad_() for t in (a, f, g))
    assert torch.autograd.gradcheck(lambda x, y, z: sim_loss_reference(x, y, z, sigma, 0.8), leaves)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_gradcheck_custom_op(backend, monkeypatch):
    monkeypatch.setenv("GETFAST_BACKEND", backend)
    a, f, g, sigma = _inputs((3, 2, 5), seed=4)  # small: gradcheck calls the op 2·numel times
    leaves = tuple(t.clone().requires_grad_() for t in (a, f, g))
    assert torch.autograd.gradcheck(lambda x, y, z: sim_loss(x, y, z, sigma, 0.8), leaves)


def test_normaliser_not_detached():
    # With a detached normaliser the d_teacher gradient would be w/(r s^2) only.
    a, f, g, sigma = _inputs((2, 9), seed=5)
    at = a.clone().requires_grad_()
    sim_loss(at, f, g, sigma, 0.1).sum().backward()
    s = sigma[:, None] ** 2
    y = (a - f) / s
    r = torch.sqrt((y * y).sum(1, keepdim=True) + 0.01)
    detached = (f - g) / (r * s * s)
    assert not torch.allclose(at.grad, detached)


@pytest.mark.parametrize("backend", ["cpp", "triton", "reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_inputs(backend, dtype):
    a, f, g, sigma = _inputs((5, 3, 31, 29), dtype=dtype, seed=6)
    sigma = sigma.float()
    ref = sim_loss_reference(a.double(), f.double(), g.double(), sigma.double(), 0.9)
    loss, stats = M.forward(a, f, g, sigma, 0.9, backend=backend, out=_poisoned_fwd_out(5, torch.float32))
    assert loss.dtype == torch.float32
    torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-5)
    leaves = [t.double().requires_grad_() for t in (a, f, g)]
    sim_loss_reference(*leaves, sigma.double(), 0.9).sum().backward()
    out = tuple(torch.full_like(a, math.nan) for _ in range(3))
    grads = M.backward(torch.ones(5), a, f, g, sigma, stats, 0.9, backend=backend, out=out)
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}[dtype]
    for got, leaf in zip(grads, leaves):
        assert got.dtype == dtype
        torch.testing.assert_close(got.double(), leaf.grad, rtol=tol, atol=tol * leaf.grad.abs().max().item())


def test_torch_compile_fullgraph(no_backend_env):
    torch._dynamo.reset()

    def fn(a, f, g, sigma):
        return (sim_loss(a, f, g, sigma, 0.5) * torch.arange(1, 6, dtype=a.dtype)).sum()

    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    a, f, g, sigma = _inputs((5, 3, 31, 29), dtype=torch.float32, seed=7)
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
def test_torch_compile_inductor_fullgraph(no_backend_env):
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


def test_opcheck(no_backend_env):
    a, f, g, sigma = _inputs((5, 3, 7, 9), dtype=torch.float32, seed=9)
    leaves = [t.clone().requires_grad_() for t in (a, f, g)]
    torch.library.opcheck(torch.ops.getfast.sim_loss.default, (*leaves, sigma, 0.5))
    _, stats = M.forward(a, f, g, sigma, 0.5)
    torch.library.opcheck(torch.ops.getfast.sim_loss_backward.default, (torch.ones(5), a, f, g, sigma, stats, 0.5))


# ---- bad inputs ------------------------------------------------------------------------
def _good():
    a, f, g, sigma = _inputs((4, 3, 5, 5), dtype=torch.float32, seed=10)
    return dict(d_teacher=a, d_fake=f, x_g=g, sigma=sigma.float(), c=0.5)


def _bad_cases():
    cases = []
    k = _good()
    cases.append(("d_teacher", dict(k, d_teacher=k["d_teacher"].to(torch.int32))))
    cases.append(("d_fake", dict(k, d_fake=k["d_fake"].double())))
    cases.append(("x_g", dict(k, x_g=k["x_g"][:, :2].contiguous())))
    cases.append(("d_fake", dict(k, d_fake=k["d_fake"].transpose(2, 3))))  # non-contiguous
    cases.append(("x_g", dict(k, x_g=torch.empty(4, 3, 5, 5, device="meta"))))  # device mismatch
    cases.append(("d_teacher", dict(k, d_teacher=torch.empty(0, 3), d_fake=torch.empty(0, 3), x_g=torch.empty(0, 3),
                                    sigma=torch.empty(0))))
    cases.append(("d_teacher", dict(k, d_teacher=torch.empty(4, 0), d_fake=torch.empty(4, 0), x_g=torch.empty(4, 0))))
    cases.append(("sigma", dict(k, sigma=torch.ones(3))))
    cases.append(("sigma", dict(k, sigma=torch.ones(4, 1))))
    cases.append(("sigma", dict(k, sigma=torch.ones(4, dtype=torch.int64))))
    cases.append(("c", dict(k, c=0.0)))
    cases.append(("c", dict(k, c=-1.0)))
    cases.append(("c", dict(k, c=float("nan"))))
    cases.append(("d_teacher", dict(k, d_teacher=k["d_teacher"].numpy())))
    return cases


@pytest.mark.parametrize("argname,kwargs", _bad_cases(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("entry", ["wrapper", "torch_ops", "forward_cpp"])
def test_bad_inputs_raise_value_error(argname, kwargs, entry):
    if entry == "wrapper":
        call = lambda: sim_loss(**kwargs)  # noqa: E731
    elif entry == "torch_ops":
        if not all(isinstance(kwargs[n], torch.Tensor) for n in ("d_teacher", "d_fake", "x_g")):
            pytest.skip("the dispatcher rejects non-tensors itself")
        call = lambda: torch.ops.getfast.sim_loss(*kwargs.values())  # noqa: E731
    else:
        call = lambda: M.forward(*kwargs.values(), backend="cpp")  # noqa: E731
    with pytest.raises(ValueError, match=argname):
        call()


def test_backward_validates_grad():
    k = _good()
    _, stats = M.forward(*k.values())
    with pytest.raises(ValueError, match="grad"):
        M.backward(torch.ones(3), k["d_teacher"], k["d_fake"], k["x_g"], k["sigma"], stats, 0.5)
    with pytest.raises(ValueError, match="stats"):
        M.backward(torch.ones(4), k["d_teacher"], k["d_fake"], k["x_g"], k["sigma"], stats.double(), 0.5)


# ---- backend forcing -------------------------------------------------------------------
def test_forced_unavailable_backend_is_an_error(monkeypatch):
    k = _good()
    monkeypatch.setenv("GETFAST_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match="cuda backend runs on CUDA tensors"):
        sim_loss(**k)
    monkeypatch.setenv("GETFAST_BACKEND", "bogus")
    with pytest.raises(RuntimeError, match="not a backend"):
        sim_loss(**k)
    monkeypatch.setenv("GETFAST_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        sim_loss(**k)


# ---- GPU (skipped without one) ---------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda", "cpp_jit"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_gpu_backends(backend, dtype, monkeypatch):
    if backend == "cpp_jit":
        pytest.importorskip("cupy")
        monkeypatch.setattr(M, "_use_C_cuda", lambda: False)  # force the CuPy/NVRTC path
        backend = "cuda"
    a, f, g, sigma = _inputs((5, 3, 31, 29), dtype=dtype, device="cuda", seed=11)
    acc = F.acc_dtype(dtype)
    ref = sim_loss_reference(a.double(), f.double(), g.double(), sigma.double(), 0.6)
    loss, stats = M.forward(a, f, g, sigma, 0.6, backend=backend, out=_poisoned_fwd_out(5, acc, "cuda"))
    tol = 1e-10 if dtype == torch.float64 else 1e-4
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    _, ref_stats = M.forward(a, f, g, sigma, 0.6, backend="reference")
    up = torch.randn(5, device="cuda", dtype=acc)
    want = M.backward(up, a, f, g, sigma, ref_stats, 0.6, backend="reference")
    got = M.backward(up, a, f, g, sigma, stats, 0.6, backend=backend,
                     out=tuple(torch.full_like(a, math.nan) for _ in range(3)))
    gtol = {torch.float64: 1e-10, torch.float32: 1e-4, torch.bfloat16: 2e-2}[dtype]
    for x, y in zip(got, want):
        torch.testing.assert_close(x.double(), y.double(), rtol=gtol, atol=gtol * y.double().abs().max().item())
