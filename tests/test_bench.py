"""getfast.bench: configuration and argument handling, the work models, formatting and the RESULTS.md
writer — everything of the benchmarks that runs without measuring anything."""
import json
import math
import sys
import types

import pytest
import torch

import getfast.bench as bench
from getfast.bench import common, runner
from getfast.bench.common import PAST_GPU_SECTION


@pytest.fixture
def bench_out(tmp_path):
    """Send the benchmarks' JSON and RESULTS.md to a temporary folder (seeded from the checkout's RESULTS.md)."""
    common.set_output(tmp_path)
    yield tmp_path
    common._output.clear()


# --- configuration -------------------------------------------------------------------------------

def test_config_defaults_are_the_cpu_benchmarks():
    cfg = bench.BenchConfig()
    assert (cfg.device, cfg.quick, cfg.only, cfg.out, cfg.budget_s) == ("cpu", False, (), "", 0.0)
    assert cfg.chosen() == ["deq", "overhead", "pairs", "sampling", "sim_loss", "train"]
    assert bench.names("cuda") == ["sampling", "deq", "train", "sim_loss", "attention"]  # gpu_check.sh's order
    assert bench.BenchConfig(device="cuda:1", only="deq").only == ("deq",)


@pytest.mark.parametrize("kw, word", [
    ({"device": "gpu"}, "device"),
    ({"device": "cuda:x"}, "device"),
    ({"only": ("nope",)}, "only"),
    ({"device": "cuda", "only": ("overhead",)}, "only"),  # a CPU-only benchmark asked of the GPU set
    ({"budget_s": -1.0}, "budget_s"),
    ({"budget_s": math.inf}, "budget_s"),
    ({"quick": "yes"}, "quick"),
])
def test_config_rejects_bad_values_naming_the_field(kw, word):
    with pytest.raises(ValueError, match=word):
        bench.BenchConfig(**kw)


def test_shim_entry_point_lists_and_rejects():
    import benchmarks.__main__ as shim
    assert set(shim.names()) >= {"deq", "sampling", "pairs", "sim_loss", "train"}
    with pytest.raises(SystemExit) as e:
        shim.main(["--only", "no-such-benchmark"])
    assert e.value.code == 2


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        runner.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--device", "--quick", "--only", "--out", "--budget-s"):
        assert flag in out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_without_a_gpu_fails_at_once_with_one_line(monkeypatch, capsys, bench_out):
    monkeypatch.setattr(runner, "load_module", lambda *a: pytest.fail("no benchmark may start"))
    with pytest.raises(SystemExit) as e:
        runner.main(["--device", "cuda", "--quick"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m benchmarks: error: device cuda: ")
    assert "torch.cuda.is_available() is False" in err
    with pytest.raises(ValueError, match="no CUDA device"):
        bench.run(bench.BenchConfig(device="cuda"))
    assert not (bench_out / "gpu_all.json").exists()


def test_cuda_refuses_the_triton_interpreter(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        runner.check_device(bench.BenchConfig(device="cuda"))
    with pytest.raises(ValueError, match="only 1 CUDA device"):
        runner.check_device(bench.BenchConfig(device="cuda:3"))
    runner.check_device(bench.BenchConfig(device="cpu"))  # the CPU set needs nothing


# --- the CPU runner --------------------------------------------------------------------------------

def _fake(kind):
    mod = types.SimpleNamespace(TITLES={"cpu": f"fake {kind}"})

    def run(device, quick, budget, peak_bw=None):
        if kind == "fail":
            raise RuntimeError("boom")
        return {"value": 1.5, "quick": quick} if kind == "ok" else {"value": 2.5, "skipped": ["part B (no time)"]}

    mod.run = run
    mod.report = lambda res: f"value {res['value']}"
    return mod


def test_cpu_runner_writes_results_and_keeps_going(monkeypatch, bench_out, capsys):
    kinds = {"train": "ok", "pairs": "fail", "sim_loss": "partial"}
    monkeypatch.setattr(runner, "load_module", lambda name: _fake(kinds[name]))
    rc = bench.run(bench.BenchConfig(only=("train", "pairs", "sim_loss"), quick=True, out=str(bench_out)))
    assert rc == 1  # pairs failed; the others still ran
    assert json.loads((bench_out / "train.json").read_text())["value"] == 1.5
    summary = json.loads((bench_out / "all.json").read_text())
    assert summary["sim_loss"]["skipped"] == ["part B (no time)"] and "boom" in summary["pairs"]["error"]
    assert summary["status"] == {"train": "ok", "pairs": "FAILED: RuntimeError: boom",
                                 "sim_loss": "partial (skipped: part B (no time))"}  # never "ok" when a part was skipped
    md = (bench_out / "RESULTS.md").read_text()
    assert "<!-- BEGIN train -->\n## fake ok\n\nvalue 1.5\n<!-- END train -->" in md
    assert "sim_loss: partial (skipped: part B" in capsys.readouterr().out


def test_cpu_runner_with_only_keeps_the_other_results(monkeypatch, bench_out):
    """``--only X`` updates X in all.json and keeps what earlier runs recorded for the others."""
    monkeypatch.setattr(runner, "load_module", lambda name: _fake("ok"))
    assert bench.run(bench.BenchConfig(only=("train",), quick=True, out=str(bench_out))) == 0
    assert bench.run(bench.BenchConfig(only=("deq",), quick=False, out=str(bench_out))) == 0
    summary = json.loads((bench_out / "all.json").read_text())
    assert summary["train"]["quick"] is True and summary["deq"]["quick"] is False
    assert summary["status"] == {"train": "ok", "deq": "ok"}


def test_every_benchmark_is_one_package_module_taking_the_device():
    """Each benchmark is getfast.bench.<name> (so it ships in the wheel) with a title per device it runs on,
    run(device, quick, budget, peak_bw) and report; a benchmark of both sets is one module."""
    import importlib
    import inspect
    for name in {*bench.CPU_BENCHMARKS, *bench.GPU_BENCHMARKS}:
        mod = importlib.import_module(f"getfast.bench.{name}")
        want = {d for d, names in (("cpu", bench.CPU_BENCHMARKS), ("cuda", bench.GPU_BENCHMARKS)) if name in names}
        assert set(mod.TITLES) == want and callable(mod.report)
        assert list(inspect.signature(mod.run).parameters)[:4] == ["device", "quick", "budget", "peak_bw"]
    root = common.source_checkout()
    if root is not None:  # the checkout keeps only the entry point, no per-benchmark shims
        assert not list((root / "benchmarks").glob("bench_*.py"))


def test_cpu_reports_render_from_the_committed_results():
    """Each CPU benchmark's report() renders the JSON its last real run left in benchmarks/results; a result written
    before its benchmark's schema changed (deq, sim_loss: one measurement for CPU and GPU) is a record whose section
    stays as written."""
    root = common.source_checkout()
    if root is None:
        pytest.skip("needs the source checkout")
    import importlib
    records = {"sim_loss": "rows", "deq": "per_iteration"}  # benchmark -> a key of its current schema
    for name in bench.CPU_BENCHMARKS:
        path = root / "benchmarks" / "results" / f"{name}.json"
        res = json.loads(path.read_text()) if path.exists() else None
        if res is None:  # no CPU run recorded yet (sampling, train: until 2026-12 the `models` benchmark)
            continue
        if name in records and records[name] not in res:
            assert f"<!-- BEGIN {name} -->" in (root / "benchmarks" / "RESULTS.md").read_text()
            continue
        text = importlib.import_module(f"getfast.bench.{name}").report(res)
        assert "| --- |" in text and "Machine:" in text


# --- output and RESULTS.md ---------------------------------------------------------------------------

def test_set_output_defaults_to_the_checkout_and_seeds_a_new_folder(tmp_path):
    try:
        folder, md = common.set_output(None)
        root = common.source_checkout()
        if root is not None:
            assert (folder, md) == (root / "benchmarks" / "results", root / "benchmarks" / "RESULTS.md")
            folder, md = common.set_output(tmp_path / "new")
            assert md.read_text() == (root / "benchmarks" / "RESULTS.md").read_text()
    finally:
        common._output.clear()


def test_installed_package_writes_under_the_working_directory(monkeypatch, tmp_path):
    monkeypatch.setattr(common, "source_checkout", lambda: None)
    monkeypatch.chdir(tmp_path)
    try:
        folder, md = common.set_output("")
        assert folder == tmp_path / "getfast-bench" and md == folder / "RESULTS.md"
        common.write_json("x", {"a": 1})
        assert json.loads((folder / "x.json").read_text()) == {"a": 1}
        common.update_results_md("x", "body")
        assert md.read_text().startswith("# Benchmark results")
    finally:
        common._output.clear()


def test_sections_are_replaced_and_ordered_gpu_first(bench_out):
    md = bench_out / "RESULTS.md"
    md.write_text("# Benchmark results\n\nheader text\n")
    for name in ("sim_loss", PAST_GPU_SECTION, "gpu-train", "deq", "gpu", "gpu-attention"):
        common.update_results_md(name, f"body of {name}")
    common.update_results_md("gpu-train", "new body")
    text = md.read_text()
    order = [line.split()[2] for line in text.splitlines() if line.startswith("<!-- BEGIN ")]
    assert order == ["gpu", "gpu-attention", "gpu-train", PAST_GPU_SECTION, "deq", "sim_loss"]
    assert text.startswith("# Benchmark results\n\nheader text\n")
    assert "new body" in text and "body of gpu-train" not in text and text.count("BEGIN gpu-train") == 1


def test_committed_results_state_that_no_gpu_run_happened_unless_one_did():
    root = common.source_checkout()
    if root is None:
        pytest.skip("needs the source checkout")
    text = (root / "benchmarks" / "RESULTS.md").read_text()
    gpu = text[text.index("<!-- BEGIN gpu -->"):text.index("<!-- END gpu -->")]
    past = text[text.index(f"<!-- BEGIN {PAST_GPU_SECTION} -->"):text.index(f"<!-- END {PAST_GPU_SECTION} -->")]
    if "Last GPU run:" not in gpu:  # no GPU run written yet: no measured gpu-* section may exist
        assert "No GPU run has happened yet" in gpu
        assert not [s for s in ("attention", "sim_loss", "deq", "sampling", "train") if f"BEGIN gpu-{s} -->" in text]
    assert "2026-11-22" in past and "H200" in past and "torch 2.11.0+cu130" in past and "triton 3.6.0" in past


# --- models of work, device facts, formatting -------------------------------------------------------

def test_attention_flops_reproduce_the_quoted_h200_rates():
    fwd = common.attention_flops(128, 12, 256, 64, "fwd")
    assert fwd == 4 * 128 * 12 * 256 * 256 * 64
    assert common.attention_flops(128, 12, 256, 64, "fwd+bwd") == 3.5 * fwd
    assert common.rate(fwd, 0.281) / 1e12 == pytest.approx(92, rel=0.01)  # 92 TFLOP/s at 0.281 ms
    assert common.rate(3.5 * fwd, 1.20) / 1e12 == pytest.approx(75, rel=0.01)
    with pytest.raises(ValueError, match="mode"):
        common.attention_flops(1, 1, 1, 1, "bwd")


def test_bytes_models():
    n = 256 * 3 * 64 * 64
    assert common.sim_loss_bytes(n, 4) == 9 * n * 4
    assert common.rate(common.sim_loss_bytes(n, 4), 0.718) / 1e9 == pytest.approx(158, rel=0.01)
    b = common.anderson_bytes(6, 128, 256 * 768, 4)
    assert b == 22 * 128 * 256 * 768 * 4 and b / 1e9 == pytest.approx(2.21, rel=0.01)
    assert common.share(common.rate(b, 0.547), 4.8e12) == pytest.approx(0.84, abs=0.01)
    assert common.anderson_bytes(1, 2, 3, 2) == 7 * 2 * 3 * 2  # fixed point: m = 1
    assert common.rate(None, 1.0) is None and common.share(1.0, None) is None


@pytest.mark.parametrize("name, tbs", [
    ("NVIDIA H100 80GB HBM3", 3.35), ("NVIDIA H100 PCIe", 2.0), ("NVIDIA H100 NVL", 3.9), ("NVIDIA H200", 4.8),
    ("NVIDIA A100-SXM4-80GB", 2.039), ("NVIDIA A100 80GB PCIe", 1.935), ("NVIDIA A100-SXM4-40GB", 1.555),
])
def test_spec_sheet_bandwidth(name, tbs):
    value, label = common.spec_sheet_bandwidth(name)
    assert value == pytest.approx(tbs * 1e12)
    assert common.peak_bandwidth(name)["source"].startswith("data sheet")


def test_unknown_gpu_uses_clock_times_bus_width():
    assert common.spec_sheet_bandwidth("NVIDIA L4") is None
    pb = common.peak_bandwidth("NVIDIA L4", memory_clock_khz=2619000, bus_width_bits=5120)
    assert pb["bytes_per_s"] == pytest.approx(3.352e12, rel=1e-3) and "bus width" in pb["source"]
    assert common.peak_bandwidth("NVIDIA L4")["bytes_per_s"] is None


def test_device_info_and_header_on_cpu():
    info = common.device_info(torch.device("cpu"))
    assert info["torch"] == torch.__version__ and info["peak_bandwidth"]["bytes_per_s"] is None
    fake = {"name": "NVIDIA H100 80GB HBM3", "capability": "9.0", "total_memory_gib": 79.1, "torch": "2.11.0+cu130",
            "torch_cuda": "13.0", "triton": "3.6.0", "matmul_bf16_tflops": 700.4, "tf32_matmul": False,
            "peak_bandwidth": common.peak_bandwidth("NVIDIA H100 80GB HBM3")}
    line = common.device_line(fake)
    for part in ("NVIDIA H100 80GB HBM3", "3.35 TB/s", "torch 2.11.0+cu130", "triton 3.6.0", "700 TFLOP/s"):
        assert part in line
    header = runner.gpu_header({"device": fake, "machine": common.machine_info()}, quick=True, budget_s=330)
    assert header.startswith("Last GPU run: NVIDIA H100") and "quick run; time budget 330 s" in header


def test_budget_and_attempt():
    assert common.Budget(None).allows(1e9) and common.Budget(0).left() == math.inf
    b = common.Budget(5)
    assert b.allows(1) and not b.allows(60) and b.skip_note(60).startswith("skipped: time budget")
    assert common.attempt(lambda: 3) == (3, None)
    value, err = common.attempt(lambda: 1 / 0)
    assert value is None and err.startswith("ZeroDivisionError: ")


def test_forced_backend_restores_the_environment(monkeypatch):
    monkeypatch.setenv("GETFAST_BACKEND", "cpp")
    with common.forced_backend("reference"):
        assert common.os.environ["GETFAST_BACKEND"] == "reference"
    with common.forced_backend(None):
        assert "GETFAST_BACKEND" not in common.os.environ
    assert common.os.environ["GETFAST_BACKEND"] == "cpp"


def test_contention_note_only_on_an_oversubscribed_machine():
    assert common.contention_note({"load_avg_1m": 1.5, "cpu_count": 2}) == ""
    assert common.contention_note({"load_avg_1m": None, "cpu_count": 2}) == ""
    note = common.contention_note({"load_avg_1m": 8.4, "cpu_count": 2}, "quote ratios")
    assert "load average 8.4 on 2 cores" in note and note.endswith("quote ratios.")


def test_cell_formatting():
    assert common.fmt(None) == "–" and common.fmt("err") == "err" and common.fmt(0.12345, ".2f") == "0.12"
    assert common.fmt_pct(0.843) == "84 %" and common.fmt_ratio(0.3) == "**0.30×**"
    assert common.markdown_safe("a|b\nc") == "a/b c" and common.markdown_safe(None) == "–"
    assert common.dtype_name(torch.bfloat16) == "bfloat16"


def test_gpu_reports_render_errors_and_skips_as_cells():
    from getfast.bench import attention as gpu_attention
    from getfast.bench import deq as gpu_deq
    from getfast.bench import sampling as gpu_sampling
    from getfast.bench import sim_loss as gpu_sim_loss
    from getfast.bench import train as gpu_train
    att = {"flops_model": "m", "skipped": ["1·2·3·4 float16 (skipped: time budget)"],
           "rows": [{"shape": [1, 2, 3, 4], "dtype": "bfloat16", "sdpa_backend": "flash", "default_backend": "reference",
                     "triton_error": "RuntimeError: x|y", "fwd_sdpa_ms": 0.5, "fwd_sdpa_tflops": 100.0,
                     "fwd+bwd_sdpa_ms": 1.0, "fwd+bwd_sdpa_tflops": 200.0}]}
    text = gpu_attention.report(att)
    assert "RuntimeError: x/y" in text and "100 (0.500 ms)" in text and "Not measured: 1·2·3·4 float16" in text
    sl = {"c": 0.5, "bytes_model": "m", "skipped": [], "rows": [{"shape": [2, 3], "dtype": "float32", "impls": {
        "eager": {"ms": 1.0, "gb_s": 10.0, "bw_share": 0.5, "speedup_vs_eager": 1.0, "error": None},
        "triton": {"error": "wrong result: max relative difference 1 > 0.0001"}}}]}
    assert "wrong result" in gpu_sim_loss.report(sl) and "50 %" in gpu_sim_loss.report(sl)
    dq = {"m": 6, "lam": 1e-4, "n1": 5, "n2": 15, "torchdeq": "torchdeq not installed (x)", "bytes_model": "m",
          "skipped": ["broyden bf16 per iteration (skipped: time budget)"], "to_tolerance": [],
          "per_iteration": [{"solver": "anderson", "dtype": "float32", "B": 2, "D": 3, "impls": {
              "getfast triton": {"ms_per_iter": 0.5, "gb_s": 4000.0, "bw_share": 0.84},
              "torchdeq": {"error": "torchdeq not installed (x)"}}}]}
    text = gpu_deq.report(dq)
    assert "84 %" in text and "torchdeq not installed" in text and "Not measured: broyden bf16" in text
    sp = {"plan": dict(gpu_sampling.DEFAULT_PLAN), "nfe_teacher": 35, "params_M": {"student": 62.2, "teacher": 55.7},
          "skipped": [], "rows": [{"model": "student", "batch": 1, "variants": {
              "eager fp32": {"ms": 9.4}, "eager bf16": {"ms": 9.0},
              "CUDA graph bf16": {"ms": 2.0, "speedup_vs_teacher": 100.0}}}]}
    text = gpu_sampling.report(sp)
    assert "**4.50×**" in text and "**100.00×**" in text
    tr = {"plan": dict(gpu_train.DEFAULT_PLAN), "intervals": 2, "log_every": 5, "skipped": ["x compiled (budget)"],
          "rows": [{"model": "GET-B/2 distillation", "batch": 128, "eager": {"img_s": 700.0, "peak_bytes": 2**30},
                    "compiled": {"error": "RuntimeError: boom"}, "compile_speedup": None}]}
    text = gpu_train.report(tr)
    assert "700" in text and "RuntimeError: boom" in text and "1.0 GiB" in text


def test_config_imports_no_benchmark_module():
    """Importing getfast.bench (what `getfast bench --help` does) stays light: no benchmark module loads."""
    modules = [f"getfast.bench.{n}" for n in {*bench.CPU_BENCHMARKS, *bench.GPU_BENCHMARKS}]
    for name in modules + ["getfast.bench.runner"]:
        sys.modules.pop(name, None)
    bench.names("cpu")
    bench.BenchConfig(device="cuda")
    assert not any(name in sys.modules for name in modules)
