"""benchmarks/gpu_check.sh: valid bash, and its dry run (every step but building and GPU work) on this machine."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def test_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    r = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run's benchmark check expects a machine without CUDA")
def test_dry_run_leaves_a_log_and_refuses_cuda(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRY_RUN": "1", "OUT": str(tmp_path), "PYTHON": sys.executable,
           "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}"}
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, env=env, timeout=600)
    log = (tmp_path / "gpu_check.log").read_text()
    assert r.stdout == log  # everything printed also went to the log
    summary = log[log.index("] summary ==="):]
    assert "build        skipped (dry run)" in summary
    assert "tests        collected (dry run)" in summary, log[-3000:]
    assert "bench        refused as expected without a GPU (dry run)" in summary
    assert "triton_mode  interpreter (no CUDA device here" in summary
    assert "python -m benchmarks: error: device cuda: torch sees no CUDA device" in log
    assert r.returncode == 0, log[-3000:]
