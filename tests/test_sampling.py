"""getfast.sampling: the Sampler entry point, its refusals and checks, and the CUDA-graph bookkeeping.

The graph cache is exercised on the CPU with a stand-in capture backend (static buffers, per-shape cache,
eviction, fallbacks); the ``gpu`` tests check that a real capture happens and that its replay equals eager.
"""
import json
import math
import warnings

import pytest
import torch

from getfast.diffusion import samplers
from getfast.sampling import NonFiniteError, Sampler, load
from getfast.sampling.graphs import Captured, CudaGraphBackend, GraphCache
from getfast.teacher import ASSETS, EMBEDDED, build_denoiser, export

pytestmark = pytest.mark.usefixtures("one_thread_module")
STUDENTS = ASSETS / "students"
TEACHER_META = {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10, "label_dropout": 0.1}


def _denoiser(num_classes=10, seed=0):
    torch.manual_seed(seed)
    D = build_denoiser("UNet-XS", 8, 1, num_classes)
    with torch.no_grad():  # the output conv is zero-initialised: perturb so samples depend on the weights
        for p in D.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return D


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    export(_denoiser(), TEACHER_META, path)
    return path


@pytest.fixture(scope="module")
def uncond_teacher(tmp_path_factory):
    path = tmp_path_factory.mktemp("uteacher") / "teacher.safetensors"
    export(_denoiser(0), {**TEACHER_META, "num_classes": 0, "label_dropout": 0.0}, path)
    return path


def _one_step_student(path, nan=False):
    """A SIM-style one-step generator x = D(σ_init·z; σ_init) exported as a student."""
    from getfast.methods import save_student
    from getfast.models.onestep import OneStepGenerator
    G = OneStepGenerator(_denoiser(seed=1), 2.5)
    if nan:
        with torch.no_grad():
            next(G.parameters())[0].fill_(float("nan"))
    meta = {"method": "sim", "config": {"method": "sim", "sigma_init": 2.5}, "shape": [1, 8, 8], "num_classes": 10,
            "teacher_meta": TEACHER_META}
    save_student(G, meta, path)
    return path


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    return _one_step_student(tmp_path_factory.mktemp("student") / "student.safetensors")


def _zl(n=3, shape=(1, 8, 8), seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=g), torch.arange(n) % 10


# --- the entry point --------------------------------------------------------------------------------

def test_teacher_sampler_is_heun_by_default_and_matches_the_sampler(teacher):
    s = load(str(teacher), steps=3)
    assert isinstance(s, Sampler) and s.kind == "teacher" and s.shape == (1, 8, 8) and s.num_classes == 10
    assert (s.sampler, s.steps, s.evaluations, s.nfe) == ("heun", 3, 5, 5) and not s.bf16 and s.graphs is None
    z, labels = _zl()
    x = s(z, labels)
    assert torch.equal(x, samplers.heun(s.net, z, steps=3, class_labels=labels))
    assert load(str(teacher)).evaluations == 35  # the model's own: Heun 18
    assert load(str(teacher), sampler="euler", steps=4).evaluations == 4
    g = load(str(teacher), steps=2, cfg_scale=1.5)
    assert torch.equal(g(z, labels), samplers.heun(g.net, z, steps=2, class_labels=labels, cfg_scale=1.5))


def test_one_step_student_refuses_options_that_do_not_apply(student):
    s = load(str(student))
    assert (s.kind, s.method, s.evaluations, s.steps) == ("one-step", "sim", 1, None)
    z, labels = _zl()
    assert torch.equal(s(z, labels), s.net(z, labels))
    for kw, name in ((dict(steps=4), "steps"), (dict(sampler="heun"), "sampler"), (dict(cfg_scale=2.0), "cfg_scale")):
        with pytest.raises(ValueError, match=f"{name} .*does not apply to .*one-step sim student"):
            load(str(student), **kw)


def test_bad_options_and_inputs(teacher, uncond_teacher):
    for kw, match in ((dict(steps=0), "steps"), (dict(steps=-2), "steps"), (dict(steps=2.0), "steps"),
                      (dict(sampler="bogus"), "sampler"), (dict(cfg_scale=float("nan")), "cfg_scale"),
                      (dict(cfg_scale=True), "cfg_scale"), (dict(device="bogus"), "device")):
        with pytest.raises(ValueError, match=match):
            load(str(teacher), **kw)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="no CUDA device"):
            load(str(teacher), device="cuda")
    with pytest.raises(ValueError, match="cfg_scale .*unconditional teacher"):
        load(str(uncond_teacher), cfg_scale=1.0)
    s = load(str(teacher), steps=1)
    z, _ = _zl()
    with pytest.raises(ValueError, match="labels must be in"):
        s(z, torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="labels must be integer"):
        s(z, torch.zeros(3))
    with pytest.raises(ValueError, match="z must be"):
        s(torch.randn(3, 1, 9, 9))
    with pytest.raises(ValueError, match="at least one"):
        s(torch.randn(0, 1, 8, 8))
    u = load(str(uncond_teacher), steps=1)
    with pytest.raises(ValueError, match="unconditional"):
        u(z, torch.tensor([0, 1, 2]))
    assert u(z).shape == z.shape


def test_nan_weights_are_refused_at_load(tmp_path):
    p = _one_step_student(tmp_path / "student.safetensors", nan=True)
    with pytest.raises(NonFiniteError, match="weights hold NaN/Inf"):
        load(str(p))


def test_nonfinite_output_is_an_error_naming_the_checkpoint(teacher):
    s = load(str(teacher), steps=1)
    orig = s._body

    def overflowing(z, labels):  # what a network whose activations overflow returns
        x = orig(z, labels)[0] * float("inf")
        return x, ~torch.isfinite(x).flatten(1).all(1)
    s._body = overflowing
    with pytest.raises(NonFiniteError, match=f"{teacher}.*NaN/Inf in 3 of 3 samples"):
        s(*_zl())
    s.check_finite = False
    assert not torch.isfinite(s(*_zl())).all()


@pytest.mark.skipif(not (STUDENTS / "get-n4-fashion-mnist.safetensors").exists(), reason="committed GET student missing")
def test_get_solver_nonfinite_is_an_error_not_noise():
    """The DEQ solvers return the start for a sample whose f turned NaN: finite noise, which must not pass."""
    s = load(str(STUDENTS / "get-n4-fashion-mnist.safetensors"))
    net = s.net
    real_step = net.equilibrium_step
    net.equilibrium_step = lambda z, *offsets: real_step(z, *offsets) * float("nan")
    try:
        with pytest.raises(NonFiniteError, match="fixed-point solve met NaN/Inf"):
            s(torch.randn(2, 1, 28, 28), torch.tensor([0, 1]))
    finally:
        del net.equilibrium_step


def test_run_folder_without_student_export(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"loop": {}, "method": {"method": "get"}}))
    with pytest.raises(ValueError, match=r"'get' training run folder without an exported student.safetensors.*"
                                         r"getfast distill get --resume"):
        load(str(run))


@pytest.mark.skipif(not EMBEDDED["fashion-mnist"].exists(), reason="committed teacher missing")
def test_committed_guided_student_uses_its_own_steps_and_range():
    p = STUDENTS / "guided-2-fashion-mnist.safetensors"
    if not p.exists():
        pytest.skip("committed guided student missing")
    s = load(str(p), cfg_scale=2.0)
    assert (s.kind, s.sampler, s.steps, s.evaluations, s.cfg_scale) == ("guided", "ddim", 2, 2, 2.0)
    assert load(str(p), steps=4).steps == 4
    with pytest.raises(ValueError, match="guidance range"):
        load(str(p), cfg_scale=9.0)
    with pytest.raises(ValueError, match="sampler .*guided student"):
        load(str(p), sampler="heun")


# --- samplers read no device values (so a GPU can capture them) and are unchanged on the CPU ---------

def _heun_reference(D, z, steps, class_labels=None):
    """EDM Algorithm 2 (S_churn = 0) with the σ schedule as tensors: the arithmetic the samplers had before."""
    t = samplers.edm_sigmas(steps, device=z.device)
    x_next = z.to(torch.float64) * t[0]
    for i, (t_cur, t_next) in enumerate(zip(t[:-1], t[1:])):
        x_hat = x_next
        s = torch.full((z.shape[0],), float(t_cur))
        d_cur = (x_hat - D(x_hat.to(z.dtype), s, class_labels).to(torch.float64)) / t_cur
        x_next = x_hat + (t_next - t_cur) * d_cur
        if i < steps - 1 and t_next > 0:
            s = torch.full((z.shape[0],), float(t_next))
            d_prime = (x_next - D(x_next.to(z.dtype), s, class_labels).to(torch.float64)) / t_next
            x_next = x_hat + (t_next - t_cur) * (0.5 * d_cur + 0.5 * d_prime)
    return x_next.to(z.dtype)


def test_heun_on_the_cpu_is_bit_identical_to_the_tensor_schedule():
    D = _denoiser().eval()
    z, labels = _zl()
    for steps in (1, 2, 5):
        assert torch.equal(samplers.heun(D, z, steps=steps, class_labels=labels), _heun_reference(D, z, steps, labels))


@pytest.mark.parametrize("name", ["heun", "euler", "ddim"])
def test_samplers_never_read_device_values(name):
    """On the meta device every host read (``.item()``, ``bool()``, ``float()`` of a tensor) raises."""
    def D(x, sigma, class_labels=None, cfg_scale=None, **kw):
        return 0.5 * x + 0.0 * sigma.reshape(-1, 1, 1, 1)
    z = torch.empty(2, 1, 4, 4, device="meta")
    out = samplers.sample(D, z, name, steps=3)
    assert out.device.type == "meta" and out.shape == z.shape


@pytest.mark.parametrize("name,kw", [("get-n4-fashion-mnist", {}), ("vit-n4-fashion-mnist", {}),
                                     ("sim-fashion-mnist", {}), ("guided-2-fashion-mnist", {"cfg_scale": 2.0}),
                                     ("fashion-mnist", {"steps": 2}), ("fashion-mnist", {"sampler": "ddim", "steps": 2})])
def test_whole_sampling_calls_read_no_device_values(name, kw):
    """What a CUDA graph captures — the sampler's body, the finiteness flags and (GET) the fixed-point solve
    with ``tol=None`` — runs on the meta device, where any host read of a tensor value raises."""
    path = EMBEDDED.get(name, STUDENTS / f"{name}.safetensors")
    if not path.exists():
        pytest.skip(f"{path} missing")
    s = load(str(path), **kw)
    s.net.to("meta")
    z = torch.empty(2, *s.shape, device="meta")
    labels = torch.zeros(2, dtype=torch.int64, device="meta")
    solvers = ("fixed_point", "anderson", "broyden") if name.startswith("get") else (None,)
    for solver in solvers:
        if solver is not None:
            import dataclasses
            s.net.config = dataclasses.replace(s.net.config, solver=solver, tol=None)
        x, bad = s._body(z, labels)
        assert x.shape == z.shape and x.device.type == "meta" and bad.shape == (2,) and bad.dtype == torch.bool


@pytest.mark.parametrize("steps", [0, -2, 1.5, True])
def test_samplers_refuse_bad_steps(steps):
    z = torch.zeros(1, 1, 2, 2)
    for name in ("heun", "euler", "ddim"):
        with pytest.raises(ValueError, match="steps"):
            samplers.sample(lambda x, *a, **k: x, z, name, steps=steps)


# --- the graph cache, with a stand-in capture on the CPU --------------------------------------------

class CPUCapture:
    """Stands in for ``torch.cuda.graph``: "capture" runs fn once on the static inputs; "replay" recomputes
    into the same output tensors (as a graph replay writes its static outputs)."""

    name = "cpu-stand-in"

    def __init__(self, fail=None):
        self.fail, self.captured, self.replayed = fail, [], 0

    def unavailable(self, z):
        return None

    def capture(self, fn, static_z, static_labels):
        if self.fail:
            raise RuntimeError(self.fail)
        out = tuple(fn(static_z, static_labels))
        self.captured.append(static_z.shape)

        def replay():
            self.replayed += 1
            for o, new in zip(out, fn(static_z, static_labels)):
                o.copy_(new)
        return Captured(static_z, static_labels, out, replay)


def _fn(z, labels):
    x = z * 2 + (0 if labels is None else labels.reshape(-1, 1).float())
    return x, ~torch.isfinite(x).all(1)


def test_graph_cache_replays_per_shape_with_static_buffers():
    backend = CPUCapture()
    cache = GraphCache(_fn, backend=backend, max_graphs=2)
    z1, l1 = torch.randn(3, 4), torch.tensor([0, 1, 2])
    out1 = cache(z1, l1)
    assert cache.captures == 1 and cache.replays == 1 and torch.equal(out1[0], _fn(z1, l1)[0])
    z2 = torch.randn(3, 4)
    out2 = cache(z2, l1)  # same signature: new values copied into the static input, replayed
    assert cache.captures == 1 and cache.replays == 2 and torch.equal(out2[0], _fn(z2, l1)[0])
    assert torch.equal(out1[0], _fn(z1, l1)[0])  # results are copies: the replay did not overwrite them
    out1[0].zero_()
    assert torch.equal(cache(z2, l1)[0], _fn(z2, l1)[0])
    cache(torch.randn(5, 4), torch.arange(5))           # new batch size: a second graph
    cache(torch.randn(5, 4), None)                       # no labels: a third signature, the oldest is dropped
    assert cache.captures == 3 and len(cache.graphs) == 2 and not cache.reasons
    assert GraphCache.signature(z1, l1) not in cache.graphs
    assert backend.captured == [(3, 4), (5, 4), (5, 4)]


def test_graph_cache_falls_back_to_eager_with_a_reason():
    cache = GraphCache(_fn, backend=CPUCapture(fail="operation not permitted when stream is capturing"))
    z = torch.randn(2, 3)
    with pytest.warns(RuntimeWarning, match="capture failed .*operation not permitted"):
        out = cache(z, None)
    assert torch.equal(out[0], _fn(z, None)[0]) and cache.captures == 0 and cache.eager_calls == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the reason is reported once per signature
        cache(z, None)
    assert list(cache.reasons.values())[0].startswith("capture failed (RuntimeError")
    lines = []
    cuda = GraphCache(_fn, log=lines.append)  # the real backend on CPU tensors: eager, with the reason
    cuda(z, None)
    assert "CUDA graphs need CUDA tensors" in lines[0] and cuda.eager_calls == 1
    with pytest.raises(ValueError, match="max_graphs"):
        GraphCache(_fn, max_graphs=0)
    with pytest.raises(ValueError, match="warmup"):
        CudaGraphBackend(warmup=0)


def test_sampler_through_the_graph_cache_equals_eager(teacher, student):
    z, labels = _zl()
    for path, kw in ((teacher, dict(steps=2)), (student, {})):
        eager = load(str(path), **kw)
        graphed = load(str(path), graph_backend=CPUCapture(), **kw)
        assert torch.equal(graphed(z, labels), eager(z, labels))
        assert torch.equal(graphed(z[:2], labels[:2]), eager(z[:2], labels[:2]))
        assert graphed.graphs.captures == 2 and graphed.graphs.replays == 2
    bad = load(str(teacher), steps=1, graph_backend=CPUCapture())
    bad.graphs.fn = lambda z, labels: (z * math.inf, torch.ones(z.shape[0], dtype=torch.bool))
    with pytest.raises(NonFiniteError):  # the finiteness flag is an output of the captured call too
        bad(z, labels)


@pytest.mark.slow
def test_cpu_compile_keeps_the_result(student):
    z, labels = _zl()
    assert torch.allclose(load(str(student), compile=True)(z, labels), load(str(student))(z, labels), atol=1e-5)


# --- on a GPU ---------------------------------------------------------------------------------------

def _same_seed(fn, *args):
    torch.manual_seed(123)
    return fn(*args)


@pytest.mark.gpu
@pytest.mark.parametrize("name,kw", [("get-n4-fashion-mnist", {}), ("sim-fashion-mnist", {}),
                                     ("guided-2-fashion-mnist", {"cfg_scale": 2.0}),
                                     ("fashion-mnist", {"steps": 4}), ("fashion-mnist", {"sampler": "ddim", "steps": 3})])
def test_cuda_graph_capture_happens_and_replay_equals_eager(name, kw):
    path = EMBEDDED.get(name, STUDENTS / f"{name}.safetensors")
    if not path.exists():
        pytest.skip(f"{path} missing")
    for bf16 in (False, True):
        eager = load(str(path), device="cuda", bf16=bf16, **kw)
        graphed = load(str(path), device="cuda", bf16=bf16, compile=True, **kw)
        for batch in (1, 5):
            z = torch.randn(batch, *eager.shape, device="cuda")
            labels = torch.arange(batch, device="cuda") % 10
            graphed(z, labels)  # capture (warm-up runs draw random numbers: compare later calls)
            got = _same_seed(graphed, z, labels)  # the same seed: GET's random fixed-point start is the same too
            want = _same_seed(eager, z, labels)
            # The same kernels run in both, so equality is expected; the tolerance only admits a different
            # cuBLAS/cuDNN algorithm choice on the capture stream.
            tol = 2e-2 if bf16 else 1e-5
            torch.testing.assert_close(got, want, rtol=tol, atol=tol)
        assert graphed.graphs.captures == 2 and not graphed.graphs.reasons, graphed.graphs.reasons
        assert graphed.graphs.replays >= 4 and graphed.graphs.eager_calls == 0


def test_graph_mode_drops_a_solver_tolerance():
    """Inside a CUDA graph the fixed-point solve must run its fixed iteration count: no convergence test."""
    import dataclasses

    from getfast.models.get import CONFIGS, GET
    from getfast.sampling.sampler import _zero_sync_solver
    net = GET(8, 1, 0, dataclasses.replace(CONFIGS["GET-N/4"], tol=1e-3))
    _zero_sync_solver(net)
    assert net.config.tol is None and net.config.eval_iters == CONFIGS["GET-N/4"].eval_iters


@pytest.mark.gpu
@pytest.mark.parametrize("solver", ["anderson", "broyden"])
def test_get_with_each_solver_is_captured_on_the_gpu(solver):
    import dataclasses
    path = STUDENTS / "get-n4-fashion-mnist.safetensors"
    if not path.exists():
        pytest.skip("committed GET student missing")
    eager = load(str(path), device="cuda", bf16=False)
    graphed = load(str(path), device="cuda", bf16=False, compile=True)
    for s in (eager, graphed):
        s.net.config = dataclasses.replace(s.net.config, solver=solver, tol=None)
    z = torch.randn(2, 1, 28, 28, device="cuda")
    labels = torch.tensor([0, 1], device="cuda")
    graphed(z, labels)
    torch.testing.assert_close(_same_seed(graphed, z, labels), _same_seed(eager, z, labels), rtol=1e-5, atol=1e-5)
    assert graphed.graphs.captures == 1 and not graphed.graphs.reasons, graphed.graphs.reasons


@pytest.mark.gpu
def test_cuda_defaults_bf16_and_stays_close_to_fp32():
    s = load("fashion-mnist", steps=4, device="cuda")
    f = load("fashion-mnist", steps=4, device="cuda", bf16=False)
    assert s.bf16 and not f.bf16
    z = torch.randn(4, 1, 28, 28, device="cuda")
    labels = torch.arange(4, device="cuda")
    x, y = s(z, labels), f(z, labels)
    assert torch.isfinite(x).all() and (x - y).abs().mean() < 0.1
