"""What only a GPU can show, and the CPU-checkable parts of it: zero host syncs on the hot paths, CUDA-graph
capture of every solver on every GPU backend, the ``--compile`` training step, CUDA's grid limits refused by
the op spec before any launch, and tests/conftest.py leaving Triton compiled where CUDA is present.
The `gpu` tests are skipped without a CUDA device (tests/conftest.py)."""
import pytest
import torch

import getfast.deq as deq
from getfast.ops import anderson as A
from getfast.ops import attention, sim_loss
from getfast.ops import broyden as BR
from getfast.ops._framework import MAX_GRID_Y, OPS, triton_interpreting
from getfast.ops.flash_attention import ATTENTION, ATTENTION_BWD

SOLVERS = ("anderson", "fixed_point", "broyden")
GPU_BACKENDS = ("triton", "cuda")


def _contraction(B, D, device, seed=0):
    g = torch.Generator(device=device).manual_seed(seed)
    x = torch.randn(B, D, generator=g, device=device)
    a = 0.5 + 0.45 * torch.rand(B, D, generator=g, device=device)
    return x, (lambda z: torch.addcmul(x, a, torch.tanh(z)))


# --- grid limits: declared in the spec, refused before any launch (runs on CPU) -----------------------------

def test_grid_limits_are_declared_and_checked_by_the_spec():
    """CUDA launches at most 65535 blocks along grid y: the ops whose GPU kernels put the batch (attention: batch ×
    heads) there declare it, and their GPU backends refuse more with a ValueError naming the limit."""
    assert MAX_GRID_Y == 65535
    assert OPS["anderson_step"].spec.grid_y == ("B",) and OPS["broyden_step"].spec.grid_y == ("B",)
    assert ATTENTION.spec.grid_y == ATTENTION_BWD.spec.grid_y == ("B", "H")
    for op, dims in ((OPS["anderson_step"], {"B": MAX_GRID_Y + 1}), (ATTENTION, {"B": 4097, "H": 16})):
        for backend in GPU_BACKENDS:
            with pytest.raises(ValueError, match=r"above CUDA's limit of 65535.*backend 'reference'"):
                op.check_grid(backend, dims)
        op.check_grid("reference", dims)  # the built-in has no such limit
        op.check_grid("cpp", dims)
    OPS["anderson_step"].check_grid("triton", {"B": MAX_GRID_Y})  # the limit itself is allowed
    ATTENTION.check_grid("triton", {"B": 4095, "H": 16})  # 65520 blocks


@pytest.mark.skipif(not triton_interpreting(), reason="the triton backend runs on CPU tensors only interpreted")
def test_grid_limits_refuse_before_launching_on_cpu_tensors(monkeypatch):
    """End to end through the public calls (the Triton interpreter itself has no limit: the spec must say no)."""
    z = torch.zeros(MAX_GRID_Y + 1, 1)
    for state, step in ((A.AndersonState.new(z, 1, 2), A.anderson_step), (BR.BroydenState.new(z, 1, 2), BR.broyden_step)):
        with pytest.raises(ValueError, match="B = 65536 blocks along grid axis y"):
            step(state, torch.tanh(z), 0, backend="triton")
        step(state, torch.tanh(z), 0, backend="cpp")  # no limit on the CPU
    q = torch.randn(4097, 16, 1, 16)
    monkeypatch.setenv("GETFAST_BACKEND", "triton")
    with pytest.raises(ValueError, match="B·H = 65552 blocks"):
        attention(q, q, q)
    monkeypatch.setenv("GETFAST_BACKEND", "reference")
    assert attention(q, q, q).shape == q.shape


def test_conftest_leaves_triton_compiled_where_cuda_is_present(monkeypatch):
    import conftest

    env = {}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    conftest.use_triton_interpreter(env)
    assert env == {}  # compiled Triton: the gpu tests test the real kernels
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    conftest.use_triton_interpreter(env)
    assert env == {"TRITON_INTERPRET": "1"}
    env = {"TRITON_INTERPRET": "0"}
    conftest.use_triton_interpreter(env)
    assert env == {"TRITON_INTERPRET": "0"}  # an explicit setting wins


# --- on a GPU --------------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_conftest_did_not_force_the_interpreter():
    assert not triton_interpreting(), "TRITON_INTERPRET is set on a CUDA machine: the gpu tests would not compile"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_grid_limit_boundary_on_the_gpu(backend):
    """B = 65535 runs on the GPU kernels and matches the reference step; one more is refused before launching."""
    z = torch.randn(MAX_GRID_Y, 4, device="cuda") * 0.1
    ref, got = (A.AndersonState.new(z, 2, 4) for _ in range(2))
    for state, b in ((ref, "reference"), (got, backend)):
        A.anderson_step(state, torch.tanh(state.X[0]), 0, backend=b)
    torch.testing.assert_close(got.X, ref.X, rtol=1e-5, atol=1e-6)
    big = torch.zeros(MAX_GRID_Y + 1, 4, device="cuda")
    with pytest.raises(ValueError, match="above CUDA's limit"):
        A.anderson_step(A.AndersonState.new(big, 2, 4), torch.tanh(big), 0, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_zero_host_syncs(backend):
    """Every solver with tol=None, the fused SIM loss fwd+bwd and (triton) attention fwd+bwd never wait for the
    device: torch.cuda.set_sync_debug_mode("error") turns any synchronising call into an error."""
    _, f = _contraction(8, 4096, "cuda")
    z0 = torch.zeros(8, 4096, device="cuda")
    a, fk, x = (torch.randn(4, 3, 16, 16, device="cuda", requires_grad=True) for _ in range(3))
    sigma = torch.rand(4, device="cuda") + 0.5
    q, k, v = (torch.randn(2, 4, 128, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))

    def work():
        for solver in SOLVERS:
            deq.solve(f, z0, solver=solver, max_iter=6, tol=None, backend=backend)
        torch.autograd.grad(sim_loss(a, fk, x, sigma, 0.5).sum(), (a, fk, x))
        if backend == "triton":
            torch.autograd.grad(attention(q, k, v).sum(), (q, k, v))

    import os
    old = os.environ.get("GETFAST_BACKEND")
    os.environ["GETFAST_BACKEND"] = backend
    try:
        work()  # warm-up: compilation, caches, allocations
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            work()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    finally:
        os.environ.pop("GETFAST_BACKEND") if old is None else os.environ.__setitem__("GETFAST_BACKEND", old)
    torch.cuda.synchronize()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("solver", SOLVERS)
def test_cuda_graph_capture_per_solver_and_backend(solver, backend):
    """The whole solve (tol=None) is captured in one CUDA graph; replays equal eager solves, also after the
    input changes in place."""
    x, f = _contraction(4, 3000, "cuda")
    z0 = torch.zeros(4, 3000, device="cuda")

    def solve():
        return deq.solve(f, z0, solver=solver, max_iter=8, tol=None, backend=backend)[0]

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up on a side stream, as PyTorch's CUDA-graph notes ask
        solve()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = solve()
    for _ in range(2):
        graph.replay()
        torch.testing.assert_close(out, solve(), rtol=1e-5, atol=1e-6)
        x.mul_(0.5)  # new input, same memory: the replay must see it


@pytest.mark.gpu
def test_compile_training_step_on_the_gpu(tmp_path):
    """``--compile`` on CUDA: the shared loop compiles the step (dynamo builds graphs), trains with finite
    losses and moves the weights."""
    import json

    from getfast.bench.train import RandomPairs
    from getfast.methods.get_distill import GETDistillConfig, GETDistillMethod
    from getfast.train import LoopConfig, train
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    method = GETDistillMethod(GETDistillConfig(model="GET-N/4", lr=1e-3), data=RandomPairs(32, (1, 8, 8)))
    before = [p.detach().clone() for p in method.modules["student"].parameters()]
    cfg = LoopConfig(out=str(tmp_path / "run"), kimg=6 * 8 / 1000, batch=8, log_every=3, ckpt_every=10**9, grid_every=0,
                     grid_n=1, warmup_kimg=0.0, compile=True, bf16=True, device="cuda", progress=False)
    train(method, cfg)
    assert counters["stats"]["unique_graphs"] >= 1, dict(counters["stats"])
    records = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines() if line.strip()]
    assert records and all(torch.isfinite(torch.tensor(v)).all() for r in records for k, v in r.items()
                           if k.startswith("loss"))
    after = list(method.modules["student"].parameters())
    assert any(not torch.equal(a.detach().cpu(), b.cpu()) for a, b in zip(after, before))
    torch._dynamo.reset()
