"""Packaging: half-precision committed weights that load as float32, the extras, and a plain (non-editable)
install whose ``getfast bench`` works."""
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from getfast.teacher import ASSETS

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = sorted(ASSETS.glob("*.safetensors")) + sorted((ASSETS / "students").glob("*.safetensors"))

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


@pytest.mark.skipif(not WEIGHTS, reason="no committed weights in this checkout")
def test_committed_weights_are_float16_on_disk():
    for p in WEIGHTS:
        with safe_open(str(p), "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        assert dtypes == {"F16"}, f"{p.name}: {dtypes}"


@pytest.mark.skipif(not WEIGHTS, reason="no committed weights in this checkout")
def test_half_weights_load_as_float32_with_the_same_values():
    from safetensors.torch import load_file

    from getfast.methods import is_student, load_student
    from getfast.teacher import load
    for p in WEIGHTS:
        net = load_student(str(p)) if is_student(p) else load(str(p))
        disk = load_file(str(p))
        state = net.state_dict()
        for k, v in disk.items():
            assert state[k].dtype == torch.float32, f"{p.name}:{k} loaded as {state[k].dtype}"
            assert torch.equal(state[k], v.float()), f"{p.name}:{k} changed in the upcast"


def test_extras_match_the_cuda_build_and_offer_diffusers():
    extras = _pyproject()["project"]["optional-dependencies"]
    assert extras["cuda"] == extras["cuda13"] == ["cupy-cuda13x"]  # the build uses nvcc 13
    assert extras["cuda12"] == ["cupy-cuda12x"]
    assert any(r.startswith("diffusers") for r in extras["diffusers"])
    assert any(r.startswith("diffusers") for r in extras["test"])  # so `make test` runs the diffusers tests


@pytest.mark.slow
def test_non_editable_wheel_install_runs_bench(tmp_path):
    """Build the wheel, install it (not editable) into a fresh venv that borrows this interpreter's
    dependencies through a .pth file, and run the installed ``getfast`` from outside the checkout."""
    wheels = tmp_path / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-build-isolation", "--no-deps", "-q", str(ROOT),
                    "-w", str(wheels)], check=True, cwd=tmp_path)
    (whl,) = wheels.glob("getfast-*.whl")
    names = zipfile.ZipFile(whl).namelist()
    assert "getfast/bench/__init__.py" in names and "getfast/importers/edm.py" in names
    assert "getfast/assets/teacher-fashion-mnist.safetensors" in names
    assert not [n for n in names if n.endswith(".png") or "__pycache__" in n]

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], check=True,
                          capture_output=True, text=True).stdout.strip()
    # torch, pip, ... from the running interpreter; .pth files there (e.g. an editable getfast) are not run
    Path(site, "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(whl)], check=True, cwd=tmp_path)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(py), "-c", "import getfast, getfast.bench; print(getfast.__file__)"], check=True,
                           capture_output=True, text=True, cwd=tmp_path, env=env).stdout
    assert where.startswith(str(venv)), where
    out = subprocess.run([str(venv / "bin" / "getfast"), "bench", "--help"], capture_output=True, text=True,
                         cwd=tmp_path, env=env)
    assert out.returncode == 0 and "--quick" in out.stdout, out.stderr
    probe = ("from getfast.teacher import load; n = load('fashion-mnist'); "
             "print({p.dtype for p in n.parameters()})")
    out = subprocess.run([str(py), "-c", probe], capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0 and "torch.float32" in out.stdout, out.stderr


def _make(*args, **env):
    return subprocess.run(["make", "--no-print-directory", "-C", str(ROOT), *args], capture_output=True, text=True,
                          env={**os.environ, **env})


@pytest.mark.skipif(not shutil.which("make"), reason="make is not installed")
def test_make_test_and_demo_set_up_the_data_first(tmp_path):
    for target in ("test", "demo"):
        out = _make("-n", target, "STAMPS=" + str(tmp_path / "stamps"))  # -n: print, run nothing
        assert out.returncode == 0, out.stderr
        recipe = out.stdout
        assert "apt-get install -y -qq dataset-fashion-mnist" in recipe
        run = "-m pytest -q tests" if target == "test" else "bin/getfast demo"
        assert recipe.rindex("dataset-fashion-mnist") < recipe.rindex(run)
    # data already present: nothing to do, nothing printed
    (tmp_path / "train-images-idx3-ubyte.gz").write_bytes(b"")
    out = _make("data", f"FMNIST_DIR={tmp_path}")
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
