"""The op contract: backend selection, validation helpers, _C loading, the CuPy guard."""
import shutil
import sys
import types

import pytest
import torch

from getfast.ops import _cupy
from getfast.ops import _framework as F


def test_load_C_and_build_info():
    C = F.load_C()
    info = C.build_info()
    for key in ("cuda_compiled", "cuda_archs", "openmp", "version"):
        assert key in info
    assert isinstance(info["cuda_archs"], list) and all(isinstance(x, int) for x in info["cuda_archs"])
    assert info["openmp"] is True
    assert "sim_loss" in info["families"]
    if not torch.cuda.is_available():
        assert C.cuda_device_count() == 0


def test_cuda_compiled_whenever_nvcc_on_path():
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    info = F.load_C().build_info()
    assert info["cuda_compiled"] is True
    assert info["cuda_archs"], "CUDA compiled with no architectures"
    assert hasattr(F.load_C(), "sim_loss_fwd_cuda")


def test_kernels_package_importable():
    import getfast.kernels
    import getfast.kernels.sim_loss as ks

    assert hasattr(ks, "sim_loss_fwd") and hasattr(ks, "sim_loss_bwd")


def test_select_backend_rules(monkeypatch):
    F.register_op("_test_op", backends=("reference", "cpp"))
    monkeypatch.delenv("GETFAST_BACKEND", raising=False)
    assert F.select_backend("_test_op", "cpu") == "cpp"
    assert F.available_backends("_test_op", "cpu") == ["reference", "cpp"]
    monkeypatch.setenv("GETFAST_BACKEND", "reference")
    assert F.select_backend("_test_op", torch.zeros(1)) == "reference"
    monkeypatch.setenv("GETFAST_BACKEND", "triton")
    with pytest.raises(RuntimeError, match="has no 'triton' backend"):
        F.select_backend("_test_op", "cpu")
    monkeypatch.setenv("GETFAST_BACKEND", "cpp")
    with pytest.raises(RuntimeError, match="CPU tensors only"):
        F.select_backend("_test_op", "meta")
    # reference-only op: default falls back to reference (with a one-time warning)
    F.register_op("_test_ref_only", backends=("reference",))
    monkeypatch.delenv("GETFAST_BACKEND")
    assert F.select_backend("_test_ref_only", "cpu") == "reference"


def test_triton_on_cpu_requires_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    why = F.backend_unavailable_reason("sim_loss", "triton", "cpu")
    assert why is not None and "TRITON_INTERPRET=1" in why
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert F.backend_unavailable_reason("sim_loss", "triton", "cpu") is None


def test_check_tensor_messages():
    t = torch.zeros(2, 3)
    assert F.check_tensor("x", t, dtypes=(torch.float32,), shape=(2, None)) is t
    with pytest.raises(ValueError, match=r"^x must have dtype"):
        F.check_tensor("x", t, dtypes=(torch.float64,))
    with pytest.raises(ValueError, match=r"^x must have shape \(2, 4\)"):
        F.check_tensor("x", t, shape=(2, 4))
    with pytest.raises(ValueError, match=r"^x must have at least 3"):
        F.check_tensor("x", t, ndim_min=3)
    with pytest.raises(ValueError, match=r"^x must be contiguous"):
        F.check_tensor("x", t.t())
    with pytest.raises(ValueError, match=r"^x must not be empty"):
        F.check_tensor("x", torch.zeros(0, 3))
    with pytest.raises(ValueError, match=r"^x must be on device meta"):
        F.check_tensor("x", t, device="meta")
    with pytest.raises(ValueError, match=r"^x must be a torch.Tensor"):
        F.check_tensor("x", [1.0])
    with pytest.raises(ValueError, match="y is on meta"):
        F.check_same_device(x=t, y=torch.zeros(2, device="meta"))
    with pytest.raises(ValueError, match="y has shape"):
        F.check_same_shape(x=t, y=torch.zeros(3, 2))
    with pytest.raises(ValueError, match="eps must be > 0"):
        F.check_scalar("eps", 0.0, positive=True)
    with pytest.raises(ValueError, match="eps must be a real number"):
        F.check_scalar("eps", "1")
    assert F.check_scalar("eps", torch.tensor(2.0)) == 2.0


def test_stream_and_dtype_helpers():
    assert F.current_stream_ptr("cpu") == 0
    assert F.dtype_code(torch.float32) == 0 and F.dtype_code(torch.bfloat16) == 3
    with pytest.raises(ValueError):
        F.dtype_code(torch.int8)
    assert F.acc_dtype(torch.bfloat16) == torch.float32 and F.acc_dtype(torch.float64) == torch.float64


# ---- CuPy JIT path ---------------------------------------------------------------------
def test_cupy_source_found():
    assert _cupy.source_path("sim_loss").name == "sim_loss.cu"
    with pytest.raises(RuntimeError, match="not found"):
        _cupy.source_path("no_such_family")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU error path")
def test_cupy_path_clear_error_without_gpu():
    why = _cupy.unavailable_reason()
    assert why is not None
    with pytest.raises(RuntimeError, match="CuPy JIT path .* unavailable"):
        _cupy.get_kernel("sim_loss", "sim_loss_fwd_f32")


def test_cupy_guard_with_driverless_cupy(monkeypatch):
    """A cupy that imports but whose runtime raises (no driver) must give a clear error."""
    fake = types.ModuleType("cupy")

    class CUDARuntimeError(RuntimeError):
        pass

    def get_device_count():
        raise CUDARuntimeError("cudaErrorInsufficientDriver: CUDA driver version is insufficient")

    fake.cuda = types.SimpleNamespace(runtime=types.SimpleNamespace(getDeviceCount=get_device_count))
    monkeypatch.setitem(sys.modules, "cupy", fake)
    why = _cupy.unavailable_reason()
    assert "no CUDA driver" in why and "cudaErrorInsufficientDriver" in why
    with pytest.raises(RuntimeError, match="no CUDA driver"):
        _cupy.get_kernel("sim_loss", "sim_loss_fwd_f32")


def test_cupy_broken_import_is_guarded(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def broken(name, *a, **k):
        if name == "cupy":
            raise OSError("libcuda.so.1: cannot open shared object file")
        return real_import(name, *a, **k)

    monkeypatch.delitem(sys.modules, "cupy", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    monkeypatch.setattr("importlib.import_module", lambda n, *a: broken(n))
    assert "cupy is not importable" in _cupy.unavailable_reason()


def test_conftest_interpreter_only_without_cuda(monkeypatch):
    import os

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
