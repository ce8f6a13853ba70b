"""The op layer's one mechanism: define_op's validation and dispatch, the measured defaults,
describe(), the _C build, the CuPy guard and the Triton interpreter rule."""
import os
import shutil
import sys
import types

import pytest
import torch

from getfast.ops import _cupy
from getfast.ops import _framework as F
from getfast.ops.anderson import ANDERSON_STEP
from getfast.ops.broyden import BROYDEN_STEP
from getfast.ops.flash_attention import ATTENTION
from getfast.ops.sim import SIM_LOSS

CPU, CUDA = torch.device("cpu"), torch.device("cuda")

# A toy op: ``out = x * w`` with a per-row weight, declared like every real op.
TOY = F.define_op(F.OpSpec(
    schema="_toy_scale(Tensor x, Tensor w, Tensor idx, float eps) -> Tensor",
    args={"x": "B * state", "w": "B acc", "idx": "3 B int32"},
    launchers={"reference": lambda x, w, idx, eps: x * w.view(-1, *([1] * (x.dim() - 1))).to(x.dtype)},
    fake=lambda x, w, idx, eps: torch.empty_like(x),
    check=lambda dims, *args: F.check_real("eps", args[-1], positive=True),
))


def test_load_C_and_build_info():
    info = F.build_info()
    for key in ("cuda_compiled", "cuda_archs", "openmp", "version", "families"):
        assert key in info
    assert all(isinstance(x, int) for x in info["cuda_archs"])
    assert info["openmp"] is True
    assert {"anderson", "broyden", "sim_loss"} <= set(info["families"])
    if not torch.cuda.is_available():
        assert F.load_C().cuda_device_count() == 0


def test_cuda_compiled_whenever_nvcc_on_path():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    info = F.build_info()
    assert info["cuda_compiled"] is True and info["cuda_archs"] == [80, 90]
    C = F.load_C()
    for sym in ("sim_loss_fwd_cuda", "sim_loss_bwd_cuda", "anderson_step_cuda", "broyden_step_cuda"):
        assert hasattr(C, sym), sym


def test_kernels_package_importable():
    import getfast.kernels.common as kc
    import getfast.kernels.sim_loss as ks

    assert hasattr(ks, "sim_loss_fwd") and hasattr(ks, "sim_loss_bwd") and hasattr(kc, "scalar")


def test_validation_messages_name_the_argument():
    x, w, idx = torch.zeros(2, 3), torch.ones(2), torch.zeros(3, 2, dtype=torch.int32)
    assert TOY.validate(x, w, idx, 1.0) == {"B": 2, "*": (3,)}
    cases = [
        ((x.long(), w, idx, 1.0), r"^x must be float32/float64/float16/bfloat16, got torch.int64"),
        ((x, w.double(), idx, 1.0), r"^w must have dtype torch.float32, got torch.float64"),
        ((x.double(), w, idx, 1.0), r"^w must have dtype torch.float64"),
        ((x, torch.ones(3), idx, 1.0), r"^w must have shape \(B=2\), got \(3,\)"),
        ((x, w, idx[:2], 1.0), r"^idx must have shape \(3, B=2\), got \(2, 2\)"),
        ((x, w, idx.float(), 1.0), r"^idx must have dtype torch.int32"),
        ((x.t(), torch.ones(3), idx[:, :1].expand(3, 3).contiguous(), 1.0), r"^x must be contiguous"),
        ((torch.zeros(0, 3), torch.ones(0), torch.zeros(3, 0, dtype=torch.int32), 1.0), r"^x must not be empty"),
        ((x, w.to("meta"), idx, 1.0), r"^w is on meta but x is on cpu"),
        (([0.0], w, idx, 1.0), r"^x must be a torch.Tensor, got list"),
        ((x, w, idx, 0.0), r"^eps must be a finite number > 0"),
        ((x, w, idx, torch.tensor(1.0)), r"^eps must be a finite number, got tensor"),
    ]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            TOY.validate(*args)
    with pytest.raises(ValueError, match="^w must have shape"):  # the torch.library op validates too
        torch.ops.getfast._toy_scale(x, torch.ones(3), idx, 1.0)
    torch.testing.assert_close(TOY(x + 1, w * 2, idx, 1.0), 2 * (x + 1))
    res = torch.library.opcheck(torch.ops.getfast._toy_scale.default, (x.requires_grad_(False), w, idx, 1.0))
    assert all(v == "SUCCESS" for v in res.values()), res


def test_forced_backend_rules(monkeypatch):
    x, w, idx = torch.zeros(2, 3), torch.ones(2), torch.zeros(3, 2, dtype=torch.int32)
    monkeypatch.setenv("GETFAST_BACKEND", "reference")
    assert TOY.choose(CPU, torch.float32) == "reference"
    monkeypatch.setenv("GETFAST_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="has no 'cpp' backend"):
        TOY(x, w, idx, 1.0)
    monkeypatch.setenv("GETFAST_BACKEND", "bogus")
    with pytest.raises(RuntimeError, match="'bogus' is not a backend"):
        TOY(x, w, idx, 1.0)
    monkeypatch.delenv("GETFAST_BACKEND")
    with pytest.raises(RuntimeError, match="the cpp backend runs on CPU tensors only"):
        SIM_LOSS.choose(torch.device("meta"), torch.float32, "cpp")
    assert TOY.choose(CPU, torch.float32) == "reference"  # no DEFAULTS entry: the built-in


def test_builtin_runs_on_the_reference_backend_and_traces_as_itself(monkeypatch):
    """An op's declared built-in (SDPA, the eager SIM composition) is what ``op(...)`` runs on ``reference``
    (``op.run("reference", ...)`` still reaches the naive launcher, the tests' ground truth); under
    torch.compile the built-in is traced, not the custom op."""
    calls = []
    op = F.define_op(F.OpSpec(
        schema="_toy_builtin(Tensor x, float a) -> (Tensor, Tensor)", args={"x": "B * state"},
        launchers={"reference": lambda x, a: (x * a, x.new_zeros(x.shape[0]))},
        fake=lambda x, a: (torch.empty_like(x), x.new_empty(x.shape[0])),
        builtin=lambda x, a: calls.append("builtin") or (torch.mul(x, a), None)))
    x = torch.randn(3, 5, dtype=torch.float64)
    monkeypatch.delenv("GETFAST_BACKEND", raising=False)
    out, aux = op(x, 2.0)
    assert calls == ["builtin"] and aux is None and torch.equal(out, x * 2)
    with pytest.raises(ValueError, match="x must be a torch.Tensor"):  # validated before the built-in runs
        op([1.0], 2.0)
    compiled = torch.compile(lambda x: op(x, 3.0)[0], fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), x * 3)
    assert calls[-1] == "builtin"  # traced through the built-in (the custom op would not append)
    n = len(calls)
    torch.testing.assert_close(op.run("reference", x, 2.0)[0], x * 2)
    assert len(calls) == n
    for name in ("attention_fwd", "sim_loss"):
        assert F.OPS[name].spec.builtin is not None  # the PyTorch built-in each fused kernel must beat


def test_measured_defaults_are_the_rule():
    """On CUDA the defaults follow the GPU measurements (benchmarks/RESULTS.md: H100 for sim_loss and the
    solver steps, H200 for attention); without one a fused backend is never the default; on this CPU the
    fused C++ kernels measured faster than the built-ins."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("GETFAST_BACKEND", raising=False)
        assert ATTENTION._resolve("", CUDA, torch.bfloat16) == "reference"  # SDPA
        assert F.DEFAULTS[("sim_loss", "cuda")][0] == "cuda"  # the only backend faster than eager at every shape
        assert ANDERSON_STEP._resolve("", CUDA, torch.float32) == "triton"
        assert BROYDEN_STEP._resolve("", CUDA, torch.float32) == "triton"
        for op in (SIM_LOSS, ANDERSON_STEP, BROYDEN_STEP):
            assert op._resolve("", CPU, torch.float32) == "cpp"
        assert ATTENTION._resolve("", CPU, torch.float32) == "reference"
    for (name, device), (backend, why) in F.DEFAULTS.items():
        assert backend in F.OPS[name].spec.launchers and why
        assert backend == "reference" or "measured" in why, (name, device)


def test_unavailable_default_falls_back_to_the_reference_with_a_warning(monkeypatch):
    monkeypatch.delenv("GETFAST_BACKEND", raising=False)
    monkeypatch.setitem(F.DEFAULTS, ("_toy_scale", "cpu"), ("cpp", "pretend it was measured"))
    F._warned.discard(("_toy_scale", "cpu"))
    with pytest.warns(RuntimeWarning, match="default backend 'cpp' is unavailable"):
        assert TOY._resolve("", CPU, torch.float32) == "reference"


def test_describe_lists_every_op_and_why():
    text = F.describe(print_it=False)
    for name in ("attention_fwd", "sim_loss", "anderson_step", "broyden_step"):
        assert f"getfast::{name} " in text
    assert "SDPA: the Triton kernel measured 0.30-0.77x SDPA on H200" in text
    assert "sim_loss_backward" not in text  # backward ops follow their forward
    assert "runnable here: reference, triton, cpp" in text


def test_choice_is_cached_per_env_value(monkeypatch):
    monkeypatch.setenv("GETFAST_BACKEND", "reference")
    assert SIM_LOSS.choose(CPU, torch.float64) == "reference"
    monkeypatch.setenv("GETFAST_BACKEND", "cpp")
    assert SIM_LOSS.choose(CPU, torch.float64) == "cpp"


def test_triton_on_cpu_requires_the_interpreter(monkeypatch):
    monkeypatch.setattr(F, "triton_interpreting", lambda: False)
    why = SIM_LOSS.unavailable("triton", CPU)
    assert why is not None and "TRITON_INTERPRET=1" in why


def test_conftest_interpreter_only_without_cuda(monkeypatch):
    import conftest
    import getfast.kernels.common as kc

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    env = {}
    conftest.use_triton_interpreter(env)
    assert env == {"TRITON_INTERPRET": "1"}
    env = {"TRITON_INTERPRET": "0"}  # a user's choice wins
    conftest.use_triton_interpreter(env)
    assert env == {"TRITON_INTERPRET": "0"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    env = {}
    conftest.use_triton_interpreter(env)
    assert env == {}  # compiled Triton on a GPU machine
    assert kc.INTERPRET == (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


# ---- CuPy JIT path ---------------------------------------------------------------------
def test_cupy_source_found():
    assert _cupy.source_path("sim_loss").name == "sim_loss.cu"
    with pytest.raises(RuntimeError, match="not found"):
        _cupy.source_path("no_such_family")


def test_cupy_path_only_for_ops_that_have_one(monkeypatch):
    """With _C lacking CUDA, a working CuPy makes `cuda` available for sim_loss only."""
    monkeypatch.setattr(_cupy, "unavailable_reason", lambda: None)
    monkeypatch.setattr(F, "load_C", lambda required=True: None)
    assert SIM_LOSS.unavailable("cuda", CUDA) is None
    for op in (ANDERSON_STEP, BROYDEN_STEP):
        assert "no CuPy path" in op.unavailable("cuda", CUDA)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cupy_path_clear_error_without_gpu():
    assert _cupy.unavailable_reason() is not None
    with pytest.raises(RuntimeError, match="CuPy JIT path .* unavailable"):
        _cupy.launch("sim_loss", "getfast::sim_loss_fwd<float, float>", (1,), (256,), (), device=CUDA)


def test_cupy_guard_with_driverless_cupy(monkeypatch):
    """A cupy that imports but whose runtime raises (no driver) must give a clear error."""
    fake = types.ModuleType("cupy")

    def get_device_count():
        raise RuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    why = _cupy.unavailable_reason()
    assert "no CUDA driver" in why and "cudaErrorInsufficientDriver" in why


def test_cupy_broken_import_is_guarded(monkeypatch):
    def broken(name, *a):
        raise OSError("libcuda.so.1: cannot open shared object file")

    monkeypatch.setattr("importlib.import_module", broken)
    assert "cupy is not importable" in _cupy.unavailable_reason()
