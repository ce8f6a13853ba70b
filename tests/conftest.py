"""Shared pytest set-up.

Triton decides when a kernel is decorated whether it runs compiled or interpreted, so
``TRITON_INTERPRET`` is settled here, at conftest import time, before any test module can import
``getfast.kernels``: the interpreter where no CUDA device is present (Triton kernels then run on
CPU tensors), compiled Triton where one is, and whatever the user set explicitly in either case.
"""
import os


def use_triton_interpreter(environ=os.environ) -> None:
    """Set ``TRITON_INTERPRET=1`` in ``environ`` unless it is set already or CUDA is present."""
    if "TRITON_INTERPRET" in environ:
        return
    import torch  # asks the driver for a device count; creates no CUDA context

    if not torch.cuda.is_available():
        environ["TRITON_INTERPRET"] = "1"


use_triton_interpreter()
os.environ.setdefault("OMP_NUM_THREADS", "2")

import contextlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: slow end-to-end test (still run in CI)")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_backend_env(monkeypatch):
    """Run a test with GETFAST_BACKEND unset."""
    monkeypatch.delenv("GETFAST_BACKEND", raising=False)


@pytest.fixture
def nan_empty():
    """Fresh ``torch.empty*`` tensors hold NaN (PyTorch's deterministic mode fills them), so an
    output element a kernel leaves unwritten shows up as NaN."""
    old = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(old[0], warn_only=old[1])


@pytest.fixture(scope="session")
def nvcc_available():
    return shutil.which("nvcc") is not None


@contextlib.contextmanager
def _torch_threads(n: int):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


@pytest.fixture
def one_thread():
    """Tiny models gain nothing from threads, and on a shared, oversubscribed machine OpenMP's spinning
    threads make them many times slower; the previous setting is restored afterwards."""
    with _torch_threads(1):
        yield


@pytest.fixture(scope="module")
def one_thread_module():
    """``one_thread`` for a whole test module (``pytestmark = pytest.mark.usefixtures(...)``)."""
    with _torch_threads(1):
        yield
