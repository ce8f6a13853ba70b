"""benchmarks/gpu_check.sh: valid bash; without a CUDA device it stops at once with "no CUDA device" (exit 2) and
its dry run walks every step (environment, test collection, the benchmarks' refusal) leaving the summary."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")


def _run(tmp_path, *args):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("TRITON_INTERPRET", None)
    env.pop("GPU_CHECK_DRY_RUN", None)
    r = subprocess.run(["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=600)
    return r, (tmp_path / "gpu_check.log").read_text(), (tmp_path / "summary.txt").read_text()


def test_script_parses_and_refuses_unknown_arguments(tmp_path):
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0
    r = subprocess.run(["bash", str(SCRIPT), "--bogus"], capture_output=True, text=True, env={**os.environ, "OUT": str(tmp_path)})
    assert r.returncode == 2 and "unknown argument --bogus" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the stop on a machine without CUDA")
def test_without_cuda_it_stops_before_building(tmp_path):
    r, log, summary = _run(tmp_path)
    assert r.returncode == 2, log[-2000:]
    assert "no CUDA device: torch" in log and "build getfast._C" not in log
    assert summary.strip().startswith("gpu check") and "skipped: no CUDA device" in summary
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu_check.log", "summary.txt"]


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run's refusal check expects a machine without CUDA")
def test_dry_run_walks_every_step_in_order(tmp_path):
    r, log, summary = _run(tmp_path, "--dry-run")
    assert r.stdout == log  # everything printed also went to the log
    assert r.returncode == 0, log[-3000:]
    lines = [line.split()[:2] for line in summary.splitlines()]
    areas = [w[1] for w in lines if w[0] == "tests"]
    assert areas == ["sampling", "deq", "train", "sim_loss", "attention"]  # the order
    assert "build              skipped: dry run" in summary and "ok" not in summary.replace("bench refusal      ok", "")
    assert "bench refusal      ok (exit 2, one line)" in summary
    assert "python -m benchmarks: error: device cuda: torch sees no CUDA device" in log
    assert log.rstrip().endswith("no CUDA device: dry run complete")
    assert len(list(tmp_path.iterdir())) <= 8
