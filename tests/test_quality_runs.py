"""docs/quality_runs.sh: stages train each run to K kimg, resume once a run has checkpoints, then add a curve point."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "docs" / "quality_runs.sh"

# Stand-ins for the CLI and for Python: record the call; "training" leaves a checkpoint in --out.
FAKE_CLI = """#!/bin/sh
echo "getfast $*" >> "$CALLS"
out=""; prev=""
for a in "$@"; do [ "$prev" = "--out" ] && out="$a"; prev="$a"; done
[ -n "$out" ] && mkdir -p "$out" && touch "$out/ckpt-000000001.pt" "$out/student.safetensors"
exit 0
"""
FAKE_PY = """#!/bin/sh
shift; echo "curve $*" >> "$CALLS"
"""


def run(tmp_path, *args, **env_extra):
    for name, body in (("getfast", FAKE_CLI), ("py", FAKE_PY)):
        p = tmp_path / name
        p.write_text(body)
        p.chmod(0o755)
    env = dict(os.environ, RUNS=str(tmp_path / "runs"), GETFAST=str(tmp_path / "getfast"), PY=str(tmp_path / "py"),
               CALLS=str(tmp_path / "calls"), **env_extra)
    res = subprocess.run(["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True)
    calls = (tmp_path / "calls").read_text().splitlines() if (tmp_path / "calls").exists() else []
    return res, calls


@pytest.mark.skipif(sys.platform == "win32", reason="bash script")
def test_stages_resume_and_add_curve_points(tmp_path):
    res, calls = run(tmp_path, "get-vit", "5")
    assert res.returncode == 2 and "no complete pair set" in res.stderr and calls == []
    (tmp_path / "runs" / "pairs-fmnist").mkdir(parents=True)
    (tmp_path / "runs" / "pairs-fmnist" / "manifest.json").write_text("{}")
    res, calls = run(tmp_path, "get-vit", "5", "10")
    assert res.returncode == 0, res.stderr
    trains = [c for c in calls if c.startswith("getfast")]
    curves = [c for c in calls if c.startswith("curve")]
    assert len(trains) == 6 and len(curves) == 6
    models = [c.split("--model ")[1].split()[0] for c in trains]
    assert models == ["GET-N/2", "ViT-N6/2", "ViT-N5x/2"] * 2
    assert [c.split("--kimg ")[1].split()[0] for c in trains] == ["5"] * 3 + ["10"] * 3
    assert ["--resume" in c for c in trains] == [False] * 3 + [True] * 3  # the second stage continues each run
    assert curves[0].endswith("runs/get-n-2 --n 1000") and curves[2].endswith("runs/vit-n5x-2 --n 1000")
    # each stage keeps its student for the curve
    assert sorted(p.name for p in (tmp_path / "runs" / "get-n-2").glob("student-*")) == [
        "student-10kimg.safetensors", "student-5kimg.safetensors"]


def test_curve_off_keeps_stage_students_only(tmp_path):
    res, calls = run(tmp_path, "sim", "2.5", CURVE="0")
    assert res.returncode == 0, res.stderr
    assert [c.split("--kimg ")[1].split()[0] for c in calls] == ["2.5"] and not any(c.startswith("curve") for c in calls)
    assert (tmp_path / "runs" / "sim" / "student-2.5kimg.safetensors").exists()


def test_bad_stage_and_unknown_command(tmp_path):
    res, calls = run(tmp_path, "sim", "ten")
    assert res.returncode == 2 and "stage 'ten' is not a number" in res.stderr and calls == []
    res, _ = run(tmp_path, "bogus")
    assert res.returncode == 2 and "resumable stages" in res.stdout


def test_models_splits_get_vit_across_processes(tmp_path):
    (tmp_path / "runs" / "pairs-fmnist").mkdir(parents=True)
    (tmp_path / "runs" / "pairs-fmnist" / "manifest.json").write_text("{}")
    res, calls = run(tmp_path, "get-vit", "5", MODELS="ViT-N6/2 ViT-N5x/2")
    assert res.returncode == 0, res.stderr
    assert [c.split("--model ")[1].split()[0] for c in calls if c.startswith("getfast")] == ["ViT-N6/2", "ViT-N5x/2"]


def test_models_plus_x_is_get_started_at_its_injection_tokens(tmp_path):
    (tmp_path / "runs" / "pairs-fmnist").mkdir(parents=True)
    (tmp_path / "runs" / "pairs-fmnist" / "manifest.json").write_text("{}")
    res, calls = run(tmp_path, "get-vit", "5", MODELS="GET-N/2+x GET-N/2")
    assert res.returncode == 0, res.stderr
    trains = [c for c in calls if c.startswith("getfast")]
    assert [c.split("--model ")[1].split()[0] for c in trains] == ["GET-N/2", "GET-N/2"]
    assert ["--z-init input" in c for c in trains] == [True, False]
    assert trains[0].split("--out ")[1].split()[0].endswith("runs/get-n-2-zx")
    assert trains[1].split("--out ")[1].split()[0].endswith("runs/get-n-2")


def test_gdd_stages_alternate_gdd_and_gddi(tmp_path):
    res, calls = run(tmp_path, "gdd", "5", "10")
    assert res.returncode == 0, res.stderr
    trains = [c for c in calls if c.startswith("getfast")]
    assert ["--freeze-innate" in c for c in trains] == [False, True, False, True]
    assert ["--resume" in c for c in trains] == [False, False, True, True]
    assert [c for c in calls if c.startswith("curve")][-1].endswith("runs/gddi --n 1000")


def test_variants_split_gdd_across_processes(tmp_path):
    res, calls = run(tmp_path, "gdd", "5", VARIANTS="gddi")
    assert res.returncode == 0, res.stderr
    trains = [c for c in calls if c.startswith("getfast")]
    assert len(trains) == 1 and "--freeze-innate" in trains[0] and trains[0].endswith("runs/gddi")
    res, calls = run(tmp_path, "gdd", "5", VARIANTS="gdd gdd-i")
    assert res.returncode == 2 and "'gdd-i' is not gdd or gddi" in res.stderr


def test_warm_continues_a_committed_student_in_total_kimg(tmp_path):
    """WARM=1: a new run from the committed weights, stage K trains K minus the card's kimg, curve on the same name."""
    res, calls = run(tmp_path, "sim", "70", "90", WARM="1")
    assert res.returncode == 0, res.stderr
    trains = [c for c in calls if c.startswith("getfast")]
    base = json.loads((SCRIPT.parent.parent / "getfast/assets/students/sim-fashion-mnist.json").read_text())["kimg"]
    assert 60 <= base < 61 and [float(c.split("--kimg ")[1].split()[0]) for c in trains] == pytest.approx(
        [70 - base, 90 - base], abs=1e-3)  # the committed SIM saw 60.032 kimg (938 steps of 64)
    assert all("--warm-start" in c and c.split("--warm-start ")[1].split()[0].endswith(
        "getfast/assets/students/sim-fashion-mnist.safetensors") for c in trains)
    assert ["--resume" in c for c in trains] == [False, True]
    assert [c for c in calls if c.startswith("curve")][-1].endswith("runs/sim-warm --n 1000 --name sim")
    assert (tmp_path / "runs" / "sim-warm" / "student-90kimg.safetensors").exists()
    res, calls = run(tmp_path, "gdd", "60", WARM="1", VARIANTS="gddi")  # the committed GDD-I has 80 kimg
    assert res.returncode == 2 and "not past the committed gddi-fashion-mnist's 80.0 kimg" in res.stderr
