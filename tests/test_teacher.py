"""The EDM teacher: ``getfast train-teacher`` → ``teacher.safetensors`` → ``getfast.teacher.load`` → ``getfast sample``.

A tiny class-conditional UNet-XS on 8×8 digits, trained in-process through the CLI entry point; the
bad-path check runs the installed console script in a subprocess to see the exit code and stderr.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from getfast.cli import main
from getfast.diffusion import EDMLoss
from getfast.teacher import TeacherConfig, TeacherMethod, build_denoiser, load
from getfast.train import load_checkpoint
from getfast.train.checkpoint import list_checkpoints
from getfast.train.rng import RunInfo

REPO = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread_module")  # fixture in conftest.py


def train_args(out, *extra):
    return ["train-teacher", "--data", "digits", "--model", "UNet-XS", "--resolution", "8", "--batch", "16",
            "--kimg", "0.16", "--cond", "--label-dropout", "0.3", "--warmup-kimg", "0.05", "--ema-halflife-kimg",
            "0.1", "--log-every", "5", "--ckpt-every", "5", "--grid-every", "0", "--grid-n", "4", "--no-progress",
            "--device", "cpu", "--out", str(out), *extra]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher") / "run"
    assert main(train_args(out)) == 0
    return out


def one_line_error(capsys, *names):
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("getfast ") and ": error: " in err, err
    for n in names:
        assert n in err, (n, err)
    return err


def test_train_teacher_exports_and_load_matches_ema(run):
    path = run / "teacher.safetensors"
    assert path.exists() and (path.stat().st_mode & 0o044) == 0o044  # readable by others: meant to be shared
    assert [p.name for p in list_checkpoints(run)] == ["ckpt-000000010.pt", "ckpt-000000005.pt"]
    assert (run / "grid-0000010.png").exists()
    net = load(str(path))
    assert net.meta == {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10,
                        "label_dropout": 0.3, "data": "digits"}
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    # the EMA of the final checkpoint, rebuilt by hand
    state = load_checkpoint(run / "ckpt-000000010.pt")
    ema = build_denoiser("UNet-XS", 8, 1, 10)
    ema.load_state_dict(state["ema"])
    ema.eval()
    assert not torch.equal(state["ema"]["backbone.enc.8x8_conv.weight"],
                           state["modules"]["net"]["backbone.enc.8x8_conv.weight"])  # the EMA, not the weights
    g = torch.Generator().manual_seed(0)
    x = torch.randn(6, 1, 8, 8, generator=g)
    sigma = torch.tensor([0.01, 0.1, 0.5, 1.0, 10.0, 80.0])
    labels = torch.tensor([0, 3, 9, -1, 5, 2])
    with torch.no_grad():
        ref = ema(x, sigma, labels)
        assert torch.equal(net(x, sigma, labels), ref)
        for other in (load(str(run)), load(str(run / "ckpt-000000010.pt"))):  # a run folder, a checkpoint file
            assert torch.equal(other(x, sigma, labels), ref)
            assert other.meta["num_classes"] == 10
        assert not torch.equal(net(x, sigma, labels), net(x, sigma, None))  # the labels are used
    # a run folder with only the export (checkpoints removed) loads the export
    only = run.parent / "only-export"
    only.mkdir()
    shutil.copy(path, only / "teacher.safetensors")
    with torch.no_grad():
        assert torch.equal(load(str(only))(x, sigma, labels), ref)


def test_sample_writes_png(run, tmp_path):
    from PIL import Image
    out = tmp_path / "x.png"
    assert main(["sample", "--ckpt", str(run / "teacher.safetensors"), "--n", "4", "--steps", "3",
                 "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert im.size == (2 * 9 + 1, 2 * 9 + 1) and im.mode == "L"  # 2x2 grid of 8x8, 1-pixel padding
        first = np.asarray(im).copy()
    # a run folder, another sampler, a fixed class and guidance
    out2 = tmp_path / "y.png"
    assert main(["sample", "--ckpt", str(run), "--n", "3", "--steps", "2", "--sampler", "euler", "--label", "4",
                 "--cfg-scale", "1.5", "--nrow", "3", "--out", str(out2)]) == 0
    with Image.open(out2) as im:
        assert im.size == (3 * 9 + 1, 9 + 1)
    # the seed makes sampling repeatable
    assert main(["sample", "--ckpt", str(run / "teacher.safetensors"), "--n", "4", "--steps", "3",
                 "--out", str(out)]) == 0
    with Image.open(out) as im:
        assert np.array_equal(np.asarray(im), first)


def test_bad_path_is_one_line_error_exit_2(tmp_path):
    exe = REPO / ".venv" / "bin" / "getfast"
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "getfast.cli"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run([*cmd, "sample", "--ckpt", str(tmp_path / "no-such-teacher.safetensors"), "--out",
                        str(tmp_path / "x.png")], capture_output=True, text=True, env=env, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    err = r.stderr.strip()
    assert "\n" not in err and "Traceback" not in err, err
    assert err.startswith("getfast sample: error:") and "no-such-teacher.safetensors" in err
    assert not (tmp_path / "x.png").exists()


def test_bad_teacher_files_are_one_line_errors(run, tmp_path, capsys):
    def sample(ckpt):
        return main(["sample", "--ckpt", str(ckpt), "--n", "1", "--steps", "1", "--out", str(tmp_path / "s.png")])

    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5 + b"not safetensors")
    assert sample(garbage) == 2
    one_line_error(capsys, "garbage.safetensors", "not a readable safetensors")

    torn = tmp_path / "torn.safetensors"
    torn.write_bytes((run / "teacher.safetensors").read_bytes()[:1000])
    assert sample(torn) == 2
    one_line_error(capsys, "torn.safetensors")

    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    assert sample(tmp_path / "foreign.safetensors") == 2
    one_line_error(capsys, "foreign.safetensors", "no 'getfast' metadata")

    (tmp_path / "empty-run").mkdir()
    assert sample(tmp_path / "empty-run") == 2
    one_line_error(capsys, "no readable checkpoint", "empty-run")

    ckpt = tmp_path / "ckpt-000000001.pt"
    ckpt.write_bytes(b"an image, not a checkpoint")
    assert sample(ckpt) == 2
    one_line_error(capsys, "ckpt-000000001.pt", "not a getfast checkpoint")

    corrupt = tmp_path / "corrupt-run"
    shutil.copytree(run, corrupt)
    for p in list_checkpoints(corrupt):
        raw = bytearray(p.read_bytes())
        raw[-100] ^= 1
        p.write_bytes(bytes(raw))
    assert sample(corrupt / "ckpt-000000010.pt") == 2
    one_line_error(capsys, "ckpt-000000010.pt", "corrupt")


def test_cli_resume_with_other_config_refused(run, tmp_path, capsys):
    other = tmp_path / "run"
    shutil.copytree(run, other)
    assert main(train_args(other, "--kimg", "0.24", "--lr", "5e-4", "--resume")) == 2
    one_line_error(capsys, "ckpt-000000010.pt", "different configuration", "'lr'")
    assert main(train_args(other, "--kimg", "0.24", "--seed", "1", "--resume")) == 2
    one_line_error(capsys, "different loop settings", "'seed'")
    assert [p.name for p in list_checkpoints(other)] == ["ckpt-000000010.pt", "ckpt-000000005.pt"]  # untouched
    # the same configuration continues from step 10 to 15
    assert main(train_args(other, "--kimg", "0.24", "--resume")) == 0
    assert "resumed from" in capsys.readouterr().out
    assert list_checkpoints(other)[0].name == "ckpt-000000015.pt"
    steps = [json.loads(x)["step"] for x in (other / "log.jsonl").read_text().splitlines()]
    assert steps == [5, 10, 15]


def test_teacher_step_math_and_label_dropout():
    """The step draws σ, noise and label dropout per sample from the loop's generators; the loss is EDM's
    (Karras et al. 2022, Eq. 2) on exactly those draws, and the network does not drop labels again."""
    m = TeacherMethod(TeacherConfig(data="digits", model="UNet-XS", resolution=8, cond=True, label_dropout=0.5))
    assert m.meta["label_dropout"] == 0.5
    net = m.modules["net"].train()
    x0, sig, lab = torch.randn(64, 1, 8, 8), torch.full((64,), 1.0), torch.arange(64) % 10
    with torch.no_grad():  # in training mode the network itself is a deterministic function of its inputs
        for p in net.parameters():  # (zero-initialised convolutions would hide the label)
            p.add_(0.05 * torch.randn_like(p))
        assert torch.equal(net(x0, sig, lab), net(x0, sig, lab))
        assert not torch.equal(net(x0, sig, lab), net(x0, sig, None))
    m.setup(lambda mod: mod)
    m.run_info = RunInfo(seed=0, batch=16, rank=0, world=1)
    x, y = m.data.batch(torch.arange(16))
    rnd, noise, u = m._draw(x, 3)
    dropped = u < 0.5
    assert 0 < int(dropped.sum()) < 16
    sigma = (rnd * 1.2 - 1.2).exp()
    expected = EDMLoss()(m.net, x, torch.where(dropped, -1, y), sigma=sigma, noise=noise).mean()
    assert m.losses((x, y), 3)["net"] == expected  # bit-identical: same draws, same math
    # the draws have the distributions of EDM's training: ln σ ~ N(-1.2, 1.2²), noise ~ N(0, I), u ~ U[0, 1)
    m.run_info = RunInfo(seed=0, batch=4000, rank=0, world=1)
    rnd, noise, u = m._draw(torch.zeros(4000, 1, 8, 8), 0)
    assert abs(float(rnd.mean())) < 0.05 and abs(float(rnd.std()) - 1) < 0.05
    assert abs(float(noise.mean())) < 0.01 and abs(float(noise.std()) - 1) < 0.01
    assert abs(float((u < 0.3).float().mean()) - 0.3) < 0.03
    # the same method without the loop (no run_info) still trains, from the global RNG
    del m.run_info
    assert torch.isfinite(m.losses((x, y), 0)["net"])


def test_init_is_reproducible():
    cfg = TeacherConfig(data="digits", model="UNet-XS", resolution=8)
    a, b = TeacherMethod(cfg), TeacherMethod(cfg)
    c = TeacherMethod(cfg, seed=1)
    sa, sb, sc = (m.modules["net"].state_dict() for m in (a, b, c))
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert any(not torch.equal(sa[k], sc[k]) for k in sa)


def test_teacher_config_errors(capsys, tmp_path):
    with pytest.raises(ValueError, match="--cond needs labels"):
        np.savez(tmp_path / "nolabels.npz", x=np.zeros((4, 8, 8), np.uint8))
        TeacherMethod(TeacherConfig(data=str(tmp_path / "nolabels.npz"), model="UNet-XS", cond=True))
    assert main(train_args(tmp_path / "r", "--data", str(tmp_path / "missing.npz"))) == 2
    one_line_error(capsys, "missing.npz")
    assert main(train_args(tmp_path / "r", "--log-every", "0")) == 2
    one_line_error(capsys, "log_every")
    assert main(train_args(tmp_path / "r", "--model", "UNet-XXL")) == 2
    one_line_error(capsys, "UNet-XXL")
    assert main(train_args(tmp_path / "r", "--model", "ViT-N/4")) == 2  # a student, not a teacher
    one_line_error(capsys, "ViT-N/4", "one-step student", "UNet-S")
    for flag, value in (("--grad-clip", "-1"), ("--P-mean", "nan"), ("--P-std", "0"), ("--label-dropout", "2"),
                        ("--lr", "inf"), ("--resolution", "-8")):
        try:  # refused by the option parser (argparse exits) or by the config
            rc = main(train_args(tmp_path / "r", flag, value))
        except SystemExit as e:
            rc = e.code
        assert rc == 2
        one_line_error(capsys, flag)
    assert not (tmp_path / "r").exists()  # refused before any folder was made


def test_fresh_run_into_an_earlier_run_folder_refused(run, tmp_path, capsys):
    other = tmp_path / "run"
    shutil.copytree(run, other)
    def files():  # (the lock file records the pid of the last run that took it)
        return {p.name: p.stat().st_mtime_ns for p in other.iterdir() if p.name != ".getfast.lock"}
    before = files()
    assert main(train_args(other, "--seed", "3")) == 2
    one_line_error(capsys, str(other), "--resume", "--overwrite")
    assert files() == before
    assert main(train_args(other, "--seed", "3", "--kimg", "0.08", "--overwrite")) == 0
    assert [p.name for p in list_checkpoints(other)] == ["ckpt-000000005.pt"]
    assert [json.loads(x)["step"] for x in (other / "log.jsonl").read_text().splitlines()] == [5]
