"""The hot paths of the fused ops and the solvers never read tensor values on the host (no
``.item()``, ``bool(tensor)``, ``.tolist()``: each is a device sync on a GPU), and a fused op
dispatches a fraction of the ATen ops of the eager composition it replaces."""

import pytest
import torch
from getfast.bench.common import OpCounter

import getfast.deq as deq
from getfast.ops import attention, sim_loss, sim_loss_reference

READS = ("item", "tolist", "numpy", "__bool__", "__float__", "__int__")


@pytest.fixture
def no_host_reads(monkeypatch):
    def forbid(name):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} called on a hot path")
        return read

    for name in READS:
        monkeypatch.setattr(torch.Tensor, name, forbid(name))


def _sim_inputs():
    g = torch.Generator().manual_seed(0)
    a, f, x = (torch.randn(3, 2, 5, 7, generator=g).requires_grad_() for _ in range(3))
    return a, f, x, torch.rand(3, generator=g) + 0.5


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
def test_sim_loss_hot_path_reads_nothing(backend, monkeypatch, no_host_reads):
    monkeypatch.setenv("GETFAST_BACKEND", backend)
    a, f, x, sigma = _sim_inputs()
    torch.autograd.grad(sim_loss(a, f, x, sigma, 0.5).sum(), (a, f, x))
    sim_loss(a.detach(), f.detach(), x.detach(), 0.7, 0.5)  # a number as sigma, no autograd


@pytest.mark.parametrize("backend", [None, "triton"])
def test_attention_hot_path_reads_nothing(backend, monkeypatch, no_host_reads):
    if backend:
        monkeypatch.setenv("GETFAST_BACKEND", backend)
    q, k, v = (torch.randn(1, 2, 9, 16, requires_grad=True) for _ in range(3))
    torch.autograd.grad(attention(q, k, v).sum(), (q, k, v))


@pytest.mark.parametrize("backend", ["reference", "cpp", "triton"])
@pytest.mark.parametrize("name", ["fixed_point", "anderson", "broyden"])
def test_solver_hot_path_reads_nothing(name, backend, no_host_reads):
    x = torch.linspace(-1, 1, 2 * 11).view(2, 11)
    z, stats = deq.solve(lambda z: torch.tanh(0.5 * z + x), torch.zeros(2, 11), solver=name, max_iter=7, tol=None,
                         backend=backend)
    assert z.shape == (2, 11) and stats["abs_trace"].shape == (2, 7)


def test_fused_sim_loss_dispatches_a_fraction_of_the_eager_ops(monkeypatch):
    """A device-independent proxy for host cost: fwd + bwd of the fused op vs the composition."""
    monkeypatch.setenv("GETFAST_BACKEND", "cpp")
    a, f, x, sigma = _sim_inputs()
    totals = {}
    for label, fn in (("eager", sim_loss_reference), ("fused", sim_loss)):
        fn(a, f, x, sigma, 0.5)
        with OpCounter() as counter:
            torch.autograd.grad(fn(a, f, x, sigma, 0.5).sum(), (a, f, x))
        totals[label] = counter.total()
    assert totals["fused"] * 4 <= totals["eager"], totals
