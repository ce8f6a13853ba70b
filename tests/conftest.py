"""Shared pytest set-up.

TRITON_INTERPRET must be set before anything imports getfast.kernels (Triton reads it when a
kernel is decorated), so it is set here, at conftest import time, before any test module.
"""
import os

os.environ["TRITON_INTERPRET"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "2")

import contextlib  # noqa: E402
import shutil  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: slow end-to-end test (still run in CI)")


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if has_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def no_backend_env(monkeypatch):
    """Run a test with GETFAST_BACKEND unset."""
    monkeypatch.delenv("GETFAST_BACKEND", raising=False)


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
