"""Packaging: the wheel carries getfast/_C and the Triton kernels as getfast.kernels."""
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_wheel_contents(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["GETFAST_CUDA"] = "OFF"  # packaging only: skip the nvcc compile (checked by test_framework)
    cmd = [sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q",
           "-w", str(tmp_path / "dist"), "--config-settings=build-dir=" + str(tmp_path / "build"), str(ROOT)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    wheels = list((tmp_path / "dist").glob("getfast-*.whl"))
    assert len(wheels) == 1, wheels
    names = zipfile.ZipFile(wheels[0]).namelist()
    assert any(n.startswith("getfast/_C") and n.endswith(".so") for n in names), names
    for op in ("anderson", "broyden", "flash_attention", "sim"):
        assert f"getfast/ops/{op}/naive.py" in names and f"getfast/ops/{op}/__init__.py" in names
    for kernel in ("__init__", "common", "anderson", "broyden", "attention", "sim_loss"):
        assert f"getfast/kernels/{kernel}.py" in names
    assert "getfast/ops/_framework.py" in names
    assert {"getfast/_cuda_src/sim_loss.cu", "getfast/_cuda_src/common.cuh"} <= set(names)  # the CuPy path
    assert not any(n.startswith(("build/", ".venv/", "tests/")) for n in names)
