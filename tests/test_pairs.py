"""Noise/image pairs: seeded noise, teacher agreement, SIGKILL-resume, corruption, torchrun, PairDataset."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from getfast.cli import main as cli_main
from getfast.data import PairDataError, PairDataset, noise_batch, sample_noise
from getfast.data.pairs import dequantize, quantize, sample_label
from getfast.diffusion import heun
from getfast.sampling import NonFiniteError, PairsConfig, make_pairs
from getfast.teacher import build_denoiser, export, load

REPO = Path(__file__).resolve().parents[1]
STEPS = 3
# A small, many-shard set: 8 shards of 8, batches of 4 (so shards hold several batches).
COMMON = dict(n=60, shard_size=8, batch=4, steps=STEPS, seed=3, cond=True, progress=False, device="cpu")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Two cores are shared with other work: one thread is faster, and results do not depend on it."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    D = build_denoiser("UNet-XS", 8, 1, 10)
    with torch.no_grad():  # the output conv is zero-initialised: perturb so the sampler output is non-trivial
        for p in D.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    export(D, {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10, "label_dropout": 0.1}, path)
    return path


@pytest.fixture(scope="module")
def reference(teacher, tmp_path_factory):
    """An uninterrupted single-process run with stored noise (the comparison target for resume/torchrun)."""
    out = tmp_path_factory.mktemp("ref") / "pairs"
    make_pairs(PairsConfig(teacher=str(teacher), out=str(out), store_noise=True, **COMMON))
    return out


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def _cli_args(teacher, out, **over):
    kw = {**COMMON, "store_noise": True, **over}
    args = ["make-pairs", "--teacher", str(teacher), "--out", str(out)]
    for k, v in kw.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            args.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            args += [flag, str(v)]
    return args


def _assert_same_set(a: Path, b: Path):
    """Same files, byte-identical shards, manifests equal apart from timing."""
    names_a = sorted(p.name for p in a.iterdir())
    names_b = sorted(p.name for p in b.iterdir())
    assert names_a == names_b, (names_a, names_b)
    for name in names_a:
        if name == "manifest.json":
            ma, mb = (json.loads((d / name).read_text()) for d in (a, b))
            ma.pop("timing"), mb.pop("timing")
            assert ma == mb
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


# --- noise, labels, teacher agreement ------------------------------------------------------------

def test_regenerated_noise_equals_stored_noise(teacher, reference, tmp_path):
    ds = PairDataset(reference)
    assert ds.store_noise and len(ds) == 60
    idx = torch.arange(60)
    stored, _, _ = ds.batch(idx)
    assert torch.equal(stored, noise_batch(3, range(60), (1, 8, 8)))
    assert torch.equal(stored[17], sample_noise(3, 17, (1, 8, 8)))
    # The same set without stored noise: regenerated at load time, bit-exact, and the images identical.
    out = tmp_path / "seeded"
    make_pairs(PairsConfig(teacher=str(teacher), out=str(out), store_noise=False, **COMMON))
    seeded = PairDataset(out)
    assert not seeded.store_noise and not list(out.glob("*.noise.npy"))
    perm = torch.randperm(60, generator=torch.Generator().manual_seed(1))
    n1, x1, y1 = seeded.batch(perm)
    n2, x2, y2 = ds.batch(perm)
    assert n1.dtype == torch.float32 and torch.equal(n1, n2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)


def test_images_equal_teacher_sampler_output(teacher, reference):
    D = load(str(teacher))
    ds = PairDataset(reference)
    for b0 in (8, 12, 56):  # batches exactly as make-pairs cut them (shard 1, shard 7 = the 4 last)
        idx = torch.arange(b0, min(b0 + 4, 60))
        z, img, y = ds.batch(idx)
        assert torch.equal(y, idx % 10)  # balanced labels
        x = heun(D, z, steps=STEPS, class_labels=y)
        assert x.abs().max() > 0.1  # non-trivial teacher
        k = b0 // 8
        assert np.array_equal(quantize(x, "uint8"), np.load(reference / f"shard-{k:05d}.images.npy")[idx - k * 8])
        assert torch.equal(img, dequantize(quantize(x, "uint8")))
        assert (img - x.clamp(-1, 1)).abs().max() <= 1 / 127.5 + 1e-6


def test_fp16_random_labels_cfg(teacher, tmp_path):
    out = tmp_path / "fp16"
    cfg = PairsConfig(teacher=str(teacher), out=str(out), n=6, shard_size=4, batch=4, steps=2, seed=5, cond=True,
                      labels="random", cfg_scale=1.5, image_dtype="fp16", progress=False, device="cpu")
    make_pairs(cfg)
    ds = PairDataset(out)
    assert np.load(out / "shard-00000.images.npy").dtype == np.float16
    z, img, y = ds.batch(torch.arange(4))
    assert torch.equal(y, torch.tensor([sample_label(5, i, (1, 8, 8), 10, "random") for i in range(4)]))
    x = heun(load(str(teacher)), z, steps=2, class_labels=y, cfg_scale=1.5)
    assert torch.equal(img, x.half().float())


# --- resume --------------------------------------------------------------------------------------

def test_sigkill_resume_gives_identical_dataset(teacher, reference, tmp_path):
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "getfast.cli", *_cli_args(teacher, out)]
    proc = subprocess.Popen(cmd, env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not (out / "shard-00001.json").exists():
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no shard appeared within 120 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = sorted(p.name for p in out.glob("shard-*.json"))
    assert "manifest.json" not in os.listdir(out) and len(done) < 8, f"run finished before the kill: {done}"
    with pytest.raises(PairDataError, match="manifest.json is missing.*unfinished"):
        PairDataset(out)
    # Also leave behind what a kill in the middle of writing shard 5 looks like: a torn temp file, and its
    # images file renamed into place but no JSON yet (so the shard counts as incomplete).
    (out / ".shard-00005.images.npy.tmp999").write_bytes(b"\x93NUMPY torn")
    (out / "shard-00005.images.npy").write_bytes(b"\x93NUMPY half-written")
    mtimes = {p.name: p.stat().st_mtime_ns for p in out.glob("shard-*.json")}
    # Re-run (in this process: a second interpreter start costs ~10 s here; the CLI path is the torchrun test's).
    make_pairs(PairsConfig(teacher=str(teacher), out=str(out), store_noise=True, **COMMON))
    for name, t in mtimes.items():  # complete shards were kept, not regenerated
        assert (out / name).stat().st_mtime_ns == t, name
    _assert_same_set(out, reference)
    assert len(PairDataset(out)) == 60


def test_corrupt_shard_is_detected_and_regenerated(teacher, reference, tmp_path, capsys):
    out = tmp_path / "corrupt"
    shutil.copytree(reference, out)
    bad = out / "shard-00002.images.npy"
    raw = bytearray(bad.read_bytes())
    raw[-1] ^= 0xFF
    bad.write_bytes(bytes(raw))
    with pytest.raises(PairDataError, match="checksum mismatch: .*shard-00002.images.npy"):
        PairDataset(out)
    PairDataset(out, verify=False)  # opening without verification is allowed
    make_pairs(PairsConfig(teacher=str(teacher), out=str(out), store_noise=True, **COMMON), log=print)
    assert "regenerating shard-00002: shard-00002.images.npy fails its sha256" in capsys.readouterr().out
    _assert_same_set(out, reference)
    # An edited shard JSON (labels) is caught through the manifest's sha256 of it.
    js = out / "shard-00003.json"
    js.write_text(js.read_text().replace('"first": 24', '"first":  24'))
    with pytest.raises(PairDataError, match="checksum mismatch: .*shard-00003.json"):
        PairDataset(out)


def test_rerun_with_other_settings_is_refused(teacher, reference, tmp_path):
    out = tmp_path / "other"
    shutil.copytree(reference, out)
    with pytest.raises(PairDataError, match="different settings.*'seed': \\(3, 4\\)"):
        make_pairs(PairsConfig(teacher=str(teacher), out=str(out), store_noise=True, **{**COMMON, "seed": 4}))


@pytest.mark.slow
def test_torchrun_two_processes_equal_one(teacher, reference, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "getfast.cli", "--", *_cli_args(teacher, out)]  # "--": torchrun's parser would take --n as its own
    r = subprocess.run(cmd, env=_env(), cwd=tmp_path, capture_output=True, timeout=300)
    assert r.returncode == 0, r.stderr.decode()[-3000:]
    _assert_same_set(out, reference)
    assert json.loads((out / "manifest.json").read_text())["timing"]["world"] == 2


# --- PairDataset ---------------------------------------------------------------------------------

def test_pair_dataset_api(reference):
    ds = PairDataset(reference)
    assert (len(ds), ds.channels, ds.resolution, ds.num_classes) == (60, 1, 8, 10)
    z, x, y = ds.batch(torch.tensor([59, 0, 8, 8, 31]))  # unsorted, repeated, across shards
    assert z.shape == x.shape == (5, 1, 8, 8) and x.dtype == z.dtype == torch.float32
    assert y.dtype == torch.int64 and y.tolist() == [9, 0, 8, 8, 1]
    assert x.min() >= -1 and x.max() <= 1
    assert isinstance(ds._array(0, "images"), np.memmap)  # memory-mapped, not loaded
    z1, x1, y1 = ds[31]
    assert torch.equal(z1, z[4]) and torch.equal(x1, x[4]) and y1 == 1
    assert torch.equal(ds[-1][1], x[0])
    parts = [ds.rank_indices(r, 3) for r in range(3)]
    assert torch.equal(torch.cat(parts), torch.arange(60)) and {len(p) for p in parts} == {20}
    assert sum(len(ds.rank_indices(r, 7)) for r in range(7)) == 60
    with pytest.raises(ValueError, match="rank"):
        ds.rank_indices(2, 2)
    with pytest.raises(IndexError):
        ds.batch(torch.tensor([60]))
    # Works as the training loop's ``method.data`` and in a DataLoader (workers re-open their maps).
    from getfast.train.rng import data_indices
    idx = data_indices(len(ds), 16, 50, seed=0)
    assert [t.shape[0] for t in ds.batch(idx)] == [16, 16, 16]
    loader = torch.utils.data.DataLoader(ds, batch_size=20, num_workers=0)
    assert sum(b[0].shape[0] for b in loader) == 60


def test_pair_dataset_errors(teacher, reference, tmp_path):
    with pytest.raises(PairDataError, match="manifest.json is missing"):
        PairDataset(tmp_path)
    out = tmp_path / "broken"
    shutil.copytree(reference, out)
    (out / "shard-00004.noise.npy").unlink()
    with pytest.raises(PairDataError, match="shard file .*shard-00004.noise.npy is missing"):
        PairDataset(out)
    shutil.copy(reference / "shard-00004.noise.npy", out)
    (out / "shard-00006.json").unlink()
    with pytest.raises(PairDataError, match="shard file .*shard-00006.json is missing"):
        PairDataset(out, verify=False)
    (out / "manifest.json").write_text("{not json")
    with pytest.raises(PairDataError, match="manifest.json is not valid JSON"):
        PairDataset(out)
    # Unconditional set: labels are None, __getitem__ gives -1.
    unc = tmp_path / "unc"
    make_pairs(PairsConfig(teacher=str(teacher), out=str(unc), **{**COMMON, "n": 3, "cond": False}))
    ds = PairDataset(unc)
    assert ds.batch(torch.arange(3))[2] is None and ds[0][2] == -1


def test_cli_errors(teacher, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:  # --n is required
        cli_main(["make-pairs", "--teacher", str(teacher), "--out", str(tmp_path / "a")])
    assert info.value.code == 2 and "--n" in capsys.readouterr().err
    assert cli_main(["make-pairs", "--teacher", str(teacher), "--n", "0", "--out", str(tmp_path / "a")]) == 2
    assert "n (--n) must be a positive number" in capsys.readouterr().err
    assert cli_main(["make-pairs", "--teacher", str(teacher), "--n", "4", "--cfg-scale", "2",
                     "--out", str(tmp_path / "b")]) == 2
    assert "needs --cond" in capsys.readouterr().err
    assert cli_main(["make-pairs", "--teacher", str(tmp_path / "nope.safetensors"), "--n", "4",
                     "--out", str(tmp_path / "c")]) == 2
    assert "nope.safetensors" in capsys.readouterr().err and not (tmp_path / "c").exists()
    assert cli_main(["make-pairs", "--teacher", str(teacher), "--n", "4", "--image-dtype", "bf16",
                     "--out", str(tmp_path / "d")]) == 2
    assert "image_dtype (--image-dtype) must be one of" in capsys.readouterr().err
    assert not any((tmp_path / x).exists() for x in "abcd")
    with pytest.raises(ValueError, match="n .*must be a positive"):
        PairsConfig(n=-1)
    with pytest.raises(ValueError, match="cfg_scale .*finite"):
        PairsConfig(n=4, cond=True, cfg_scale=float("nan"))
    with pytest.raises(ValueError, match="device"):
        PairsConfig(n=4, device="bogus")


def test_nonfinite_teacher_output_is_an_error_naming_the_shard(tmp_path):
    """A teacher whose activations overflow (finite weights) must not write a shard of zeros."""
    torch.manual_seed(0)
    D = build_denoiser("UNet-XS", 8, 1, 10)
    with torch.no_grad():
        for p in D.parameters():
            p.add_(0.05 * torch.randn_like(p)).mul_(1e4)
    path = tmp_path / "big.safetensors"
    export(D, {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10, "label_dropout": 0.1}, path)
    out = tmp_path / "pairs"
    with pytest.raises(NonFiniteError, match="shard-00000, samples \\[0, 4\\).*NaN/Inf"):
        make_pairs(PairsConfig(teacher=str(path), out=str(out), **{**COMMON, "n": 4}))
    assert not list(out.glob("shard-*"))


def test_fingerprint_changes_when_the_set_grows(teacher, tmp_path):
    out = tmp_path / "p"
    make_pairs(PairsConfig(teacher=str(teacher), out=str(out), **{**COMMON, "n": 8}))
    fp = PairDataset(out).fingerprint()
    assert fp == PairDataset(out, verify=False).fingerprint() and fp["pairs"] == 8
    make_pairs(PairsConfig(teacher=str(teacher), out=str(out), **{**COMMON, "n": 12}))  # grown in place
    grown = PairDataset(out).fingerprint()
    assert grown["pairs"] == 12 and grown["sha256"] != fp["sha256"]


def test_a_pair_shard_holding_nan_is_refused_by_name(tmp_path):
    """Issue 27: a float shard with NaN (fp16 images, stored noise) is refused when the set is opened, naming the
    file, instead of surfacing as a divergence blamed on the learning rate."""
    from getfast.data.pairs import PairDataError, _check_finite
    f = tmp_path / "images-00000.npy"
    a = np.zeros((5, 1, 4, 4), np.float16)
    np.save(f, a)
    _check_finite(f)
    a[3, 0, 1, 2] = np.nan
    np.save(f, a)
    with pytest.raises(PairDataError, match=r"images-00000\.npy: 1 values are NaN"):
        _check_finite(f)
    np.save(f, np.full((5, 1, 4, 4), 255, np.uint8))  # integer images cannot hold NaN
    _check_finite(f)
