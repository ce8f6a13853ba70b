"""The GPU benchmarks' code paths, run on tiny inputs: on CPU tensors everywhere (what a CPU-only machine
can check — the numbers are meaningless and never recorded), and on CUDA tensors in the `gpu` tests."""
import pytest
import torch

from getfast.bench import attention as gpu_attention
from getfast.bench import common
from getfast.bench import deq as gpu_deq
from getfast.bench import sampling as gpu_sampling
from getfast.bench import sim_loss as gpu_sim_loss
from getfast.bench import train as gpu_train

pytestmark = pytest.mark.usefixtures("one_thread_module")  # tiny ops: one thread avoids OpenMP contention on a busy machine

CPU = torch.device("cpu")
TINY_SAMPLING = {"student": "GET-N/4", "teacher": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10,
                 "batches": (2,), "heun_steps": 2, "student_iters": 2, "teacher_iters": 1}
TINY_TRAIN = {"student": "GET-N/4", "teacher": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10,
              "batch": 4, "bf16": False, "compile": False}


def _no_errors(obj, path="res"):
    """Every ``error`` field in a benchmark result is empty (the CPU-only ``needs a CUDA device`` and an absent
    optional torchdeq excepted)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if "error" in k and v and v != "needs a CUDA device" and not str(v).startswith("torchdeq not installed"):
                if not (isinstance(v, dict) and all(str(e).startswith("torchdeq not installed") for e in v.values())):
                    pytest.fail(f"{path}.{k}: {v}")
            _no_errors(v, f"{path}.{k}")
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            _no_errors(v, f"{path}[{i}]")


def test_sdpa_backend_is_named():
    q = torch.randn(1, 2, 8, 4)
    assert gpu_attention.sdpa_backend(q, q, q) in {"flash (CPU)", "math", "efficient", "flash", "cuDNN"}


def test_attention_plan_covers_the_issue_shapes():
    full, quick = gpu_attention.plan(False), gpu_attention.plan(True)
    shapes = {s for s, _ in full}
    assert {(128, 12, 256, 64), (4, 16, 4096, 64), (4, 16, 4096, 128)} <= shapes
    assert any(s[2] == 1024 for s in shapes)
    assert {d for _, d in full} == {torch.bfloat16, torch.float16} and len(quick) < len(full)


def test_attention_rows_on_cpu():
    """Triton under the interpreter vs SDPA, fwd and fwd+bwd, on a tiny shape."""
    res = gpu_attention.run(CPU, True, common.Budget(None), cases=[((1, 2, 16, 8), torch.float32)])
    _no_errors(res)
    row = res["rows"][0]
    assert row["default_backend"] == "reference" and row["max_abs_diff_vs_sdpa"] < 1e-5
    for mode in ("fwd", "fwd+bwd"):
        assert row[f"{mode}_triton_ms"] > 0 and row[f"{mode}_sdpa_ms"] > 0 and row[f"{mode}_ratio"] > 0
    assert "| 1·2·16·8 | float32 |" in gpu_attention.report(res)


def test_attention_budget_skips_are_reported():
    b = common.Budget(1e-9)
    res = gpu_attention.run(CPU, True, b, cases=[((1, 1, 4, 4), torch.float32)])
    assert res["rows"] == [] and res["skipped"][0].startswith("1·1·4·4 float32 (skipped: time budget")


def test_sim_loss_rows_on_cpu():
    """The GPU rows' code on CPU tensors, and the CPU rows (torch threads given: CPU time and peak memory)."""
    res = gpu_sim_loss.run(CPU, True, common.Budget(None), peak_bw=1e11,
                           cases=[((3, 1, 5, 7), torch.float32, None), ((2, 3, 4), torch.bfloat16, None),
                                  ((4, 1, 4, 4), torch.float32, 1)])
    _no_errors(res)
    for row in res["rows"]:
        assert set(row["impls"]) == {"eager", "cpp"} and row["default_backend"] == "cpp"  # the default is a cpp row
        numel, itemsize = torch.Size(row["shape"]).numel(), 4 if row["dtype"] == "float32" else 2
        assert row["model_bytes"] == 9 * numel * itemsize
        for e in row["impls"].values():
            assert e["ms"] > 0 and e["bw_share"] is not None and e["speedup_vs_eager"] > 0
            assert (e.get("cpu_ms", 0) > 0 and e["peak_bytes"] > 0) == (row["threads"] == 1)
    text = gpu_sim_loss.report(res)
    assert "fused, cpp" in text and "CPU ms, 1 thread" in text and "| 4×1×4×4 | float32 | 1 |" in text


def test_sim_loss_flags_a_wrong_backend(monkeypatch):
    """A backend whose gradient disagrees with the float64 reference is reported, not timed."""
    real = gpu_sim_loss.fused

    def wrong(a, f, x, sigma, w, backend=None):
        return tuple(2 * g for g in real(a, f, x, sigma, w, backend))

    monkeypatch.setattr(gpu_sim_loss, "fused", wrong)
    row = gpu_sim_loss.measure((2, 3, 4), torch.float32, CPU, True, None)
    assert row["impls"]["cpp"]["error"].startswith("wrong result") and "ms" not in row["impls"]["cpp"]
    assert row["impls"]["eager"]["error"] is None


def test_deq_rows_on_cpu():
    res = gpu_deq.run(CPU, True, common.Budget(None), peak_bw=1e11, batch=2, dim=64,
                      dtypes=(torch.float32,), solvers=("anderson",))
    _no_errors(res)
    row = res["per_iteration"][0]
    assert row["model_bytes"] == (3 * 6 + 4) * 2 * 64 * 4
    assert {"getfast cpp", "getfast reference", "torchdeq"} <= set(row["impls"])
    assert any(label.startswith("getfast default (") for label in row["impls"])
    tol = res["to_tolerance"][0]
    if gpu_deq.torchdeq_missing() is None:
        assert tol["f_calls"]["ours"] == tol["f_calls"]["theirs"] and tol["wall_s"]["theirs"] > 0
        assert max(tol["final_max_rel_residual"].values()) < gpu_deq.TOL and tol["converged"]
    assert "Time to tolerance" in gpu_deq.report(res)


def test_deq_without_torchdeq_still_measures_getfast(monkeypatch):
    monkeypatch.setattr(gpu_deq, "torchdeq_missing", lambda: "torchdeq not installed (test)")
    row = gpu_deq.per_iteration("fixed_point", torch.float32, CPU, True, 2, 16, ("cpp",))
    assert row["impls"]["torchdeq"] == {"error": "torchdeq not installed (test)"}
    assert "ms_per_iter" in row["impls"]["getfast cpp"] and row["model_bytes"] == 7 * 2 * 16 * 4
    tol = gpu_deq.to_tolerance("fixed_point", CPU, 2, 16, repeats=1)
    assert tol["errors"] == {"theirs": "torchdeq not installed (test)"} and tol["f_calls"]["ours"] > 1
    assert set(tol["wall_s"]) == {"ours"} and "ratio_wall" not in tol
    assert [r["solver"] for r in gpu_deq.op_counts(2, 8)][-2:] == ["getfast fixed_point (cpp), tol=None",
                                                                  "getfast broyden (cpp), tol=None"]
    assert "not installed (test)" in gpu_deq.report({**gpu_deq.run(CPU, True, common.Budget(None), batch=2, dim=16,
                                                                         dtypes=(), solvers=("fixed_point",))})


def test_sampling_rows_on_cpu_through_the_sampler():
    res = gpu_sampling.run(CPU, True, common.Budget(None), plan=TINY_SAMPLING)
    _no_errors(res)
    assert res["params_M"]["student"] > 0 and res["nfe_teacher"] == 3 and [r["model"] for r in res["rows"]] == ["student", "teacher"]
    student = res["rows"][0]["variants"]
    assert student["CUDA graph bf16"] == {"skipped": "needs a CUDA device"} and res["skipped"]
    assert student["eager bf16"] == {"skipped": "CPU: fp32 only"}
    assert student["eager fp32"]["ms"] > 0 and student["eager fp32"]["speedup_vs_teacher"] > 0
    assert "GET-N/4 one step" in gpu_sampling.report(res)


class _StandInCapture:
    """Stands in for the CUDA capture of getfast.sampling.graphs on CPU tensors: "capture" runs fn on the static
    inputs, "replay" recomputes into the same outputs; ``fail`` makes the capture raise (the sampler then runs
    eagerly and records why)."""

    name = "cpu-stand-in"

    def __init__(self, fail: str | None = None):
        self.fail = fail

    def unavailable(self, z):
        return None

    def capture(self, fn, static_z, static_labels):
        from getfast.sampling.graphs import Captured
        if self.fail:
            raise RuntimeError(self.fail)
        out = tuple(fn(static_z, static_labels))

        def replay():
            for o, new in zip(out, fn(static_z, static_labels)):
                o.copy_(new)
        return Captured(static_z, static_labels, out, replay)


def test_graph_row_replays_through_the_library_capture(tmp_path):
    """The graph row of the teacher (a deterministic Heun call) through the sampler's own capture machinery."""
    _, teacher_ckpt, _ = gpu_sampling.export_checkpoints(TINY_SAMPLING, tmp_path)
    out = gpu_sampling.sampler_variants(teacher_ckpt, torch.randn(2, 1, 8, 8), torch.tensor([1, 2]), CPU, iters=2,
                                        warmup=1, steps=2, graph_backend=_StandInCapture())
    _no_errors(out)
    row = out["CUDA graph bf16"]
    assert row["ms"] > 0 and row["captures"] == 1 and row["replays"] >= 3 and row["eager_calls"] == 0
    assert row["max_abs_diff_vs_eager_bf16"] == 0.0  # the replay recomputes the same deterministic Heun call


def test_a_graph_row_that_fell_back_to_eager_is_an_error(tmp_path):
    student_ckpt, _, _ = gpu_sampling.export_checkpoints(TINY_SAMPLING, tmp_path)
    for backend, ok in ((_StandInCapture("no graphs"), False), (_StandInCapture(), True)):
        out = gpu_sampling.sampler_variants(student_ckpt, torch.randn(1, 1, 8, 8), None, CPU, 1, 0,
                                            graph_backend=backend)
        row = out["CUDA graph bf16"]
        assert out["eager bf16"]["ms"] > 0
        if ok:
            assert row["ms"] > 0 and row["captures"] == 1 and row["eager_calls"] == 0, row
        else:
            assert "ms" not in row and row["error"].startswith("replayed eagerly, not from a CUDA graph")
            assert "no graphs" in row["error"]
    assert gpu_sampling.graph_entry(None).endswith("no graph captured")


@pytest.mark.slow
def test_train_rows_on_cpu_through_the_loop():
    res = gpu_train.run(CPU, True, common.Budget(None), plan=TINY_TRAIN, log_every=1, intervals=1)
    _no_errors(res)
    assert [r["model"] for r in res["rows"]] == ["GET-N/4 distillation", "UNet-XS EDM teacher step"]
    for r in res["rows"]:
        assert r["eager"]["img_s"] > 0 and r["eager"]["steps"] == 2 and "compiled" not in r
    assert "GET-N/4 distillation" in gpu_train.report(res)


# --- on a GPU ---------------------------------------------------------------------------------------

@pytest.mark.gpu
def test_gpu_sampling_rows_capture_a_graph():
    plan = {**TINY_SAMPLING, "student_iters": 3, "teacher_iters": 2}
    res = gpu_sampling.run(torch.device("cuda"), True, common.Budget(None), plan=plan)
    _no_errors(res)
    for row in res["rows"]:
        graph = row["variants"]["CUDA graph bf16"]
        assert graph["ms"] > 0 and graph["captures"] == 1 and graph["eager_calls"] == 0


@pytest.mark.gpu
def test_gpu_kernel_rows_run_compiled():
    dev = torch.device("cuda")
    b = common.Budget(None)
    att = gpu_attention.run(dev, True, b, cases=[((2, 2, 64, 32), torch.bfloat16)])
    _no_errors(att)
    assert att["rows"][0]["max_abs_diff_vs_sdpa"] < 3e-2
    _no_errors(gpu_sim_loss.run(dev, True, b, cases=[((3, 1, 5, 7), torch.float32, None)]))
    dq = gpu_deq.run(dev, True, b, batch=2, dim=256, dtypes=(torch.float32,), solvers=("anderson",))
    _no_errors(dq)
