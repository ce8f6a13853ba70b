"""Bad input on the command line: one line ``getfast <cmd>: error: ...``, exit 2, before any work.

Each case runs ``getfast.cli.main`` in this process (a few through a subprocess, for the real exit and stderr)
and checks the exit status and that the message names the option or the path at fault.
"""
import argparse
import dataclasses
import errno
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from getfast import cli
from getfast.cli import main
from getfast.teacher import build_denoiser, export

pytestmark = pytest.mark.usefixtures("one_thread_module")
META = {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10, "label_dropout": 0.1}
NO_GPU = not torch.cuda.is_available()


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    torch.manual_seed(0)
    D = build_denoiser("UNet-XS", 8, 1, 10)
    with torch.no_grad():
        for p in D.parameters():
            p.add_(0.05 * torch.randn_like(p))
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    export(D, META, path)
    return str(path)


def _run(capsys, args):
    rc = main(args)
    err = capsys.readouterr().err.strip()
    return rc, err


def _user_error(capsys, args, *names, cmd=None):
    rc, err = _run(capsys, args)
    cmd = cmd or args[0]
    assert rc == 2, (args, rc, err)
    assert err.startswith(f"getfast {cmd}: error: "), err
    assert "\n" not in err and "Traceback" not in err, err
    for n in names:
        assert n in err, (n, err)
    return err


# --- parsing: strict booleans, X | None, finite floats -------------------------------------------------

_PARSER = []


def _parse(args):
    if not _PARSER:  # building the parser is the slow part; parsing does not change it
        _PARSER.append(cli.build_parser())
    return _PARSER[0].parse_args(args)


def test_booleans_accept_exactly_the_boolean_words():
    for word, want in (("true", True), ("1", True), ("yes", True), ("on", True), ("TRUE", True),
                       ("false", False), ("0", False), ("no", False), ("off", False)):
        assert _parse(["train-teacher", "--resume", word]).resume is want, word
        assert _parse(["train-teacher", f"--bf16={word}"]).bf16 is want, word
    assert _parse(["train-teacher", "--resume"]).resume is True
    assert _parse(["train-teacher", "--no-resume"]).resume is False
    assert _parse(["train-teacher"]).bf16 is None
    assert _parse(["train-teacher", "--bf16", "none"]).bf16 is None
    assert _parse(["train-teacher", "--no-bf16"]).bf16 is False


@pytest.mark.parametrize("args,option", [
    (["train-teacher", "--bf16", "maybe"], "--bf16"),
    (["train-teacher", "--bf16", "2"], "--bf16"),
    (["train-teacher", "--resume", "maybe"], "--resume"),
    (["train-teacher", "--resume", "none"], "--resume"),  # not optional: None is not a value
    (["train-teacher", "--no-resume=true"], "--no-resume"),
    (["sample", "--cfg-scale", "abc"], "--cfg-scale"),
    (["sample", "--cfg-scale", "true"], "--cfg-scale"),
    (["sample", "--cfg-scale", "nan"], "--cfg-scale"),
    (["sample", "--cfg-scale", "inf"], "--cfg-scale"),
    (["make-pairs", "--n", "4", "--cfg-scale", "abc"], "--cfg-scale"),
    (["make-pairs", "--n", "4", "--cfg-scale", "true"], "--cfg-scale"),
    (["make-pairs", "--n", "4", "--cfg-scale", "nan"], "--cfg-scale"),
    (["sample", "--steps", "1.5"], "--steps"),
    (["sample", "--label", "x"], "--label"),
    (["make-pairs"], "--n"),
    (["distill", "sim", "--no-such-option", "1"], "--no-such-option"),
])
def test_parse_errors_are_one_line(capsys, args, option):
    with pytest.raises(SystemExit) as info:  # parsing only: an option that parsed by mistake starts no work
        _parse(args)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and "\n" not in err and option in err, err
    assert err.startswith("getfast "), err


def test_optional_values_parse_to_the_type_or_none():
    ns = _parse(["sample", "--steps", "none", "--cfg-scale", "2.5", "--label", "3"])
    assert ns.steps is None and ns.cfg_scale == 2.5 and ns.label == 3
    assert _parse(["sample", "--cfg-scale", "None"]).cfg_scale is None


def test_unsupported_field_types_fail_when_the_parser_is_built():
    @dataclasses.dataclass
    class C:
        table: dict = dataclasses.field(default_factory=dict)   # no command-line form
    with pytest.raises(TypeError, match="C.table"):
        cli.add_config(argparse.ArgumentParser(), C)


def test_every_subcommand_builds_from_dataclasses_and_has_tf32():
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    for name, p in sub.choices.items():
        if name == "distill":
            continue
        text = p.format_help()
        assert "--tf32" in text and "--no-tf32" in text, name
    assert "--quick" in sub.choices["bench"].format_help() and "--device" in sub.choices["bench"].format_help()


# --- checks before any work ----------------------------------------------------------------------------

def test_invalid_options_fail_before_any_work(capsys, tmp_path, teacher, monkeypatch):
    import getfast.train.loop as loop
    monkeypatch.setattr(loop, "fit", lambda *a, **k: pytest.fail("work started before the options were checked"))
    out = tmp_path / "run"
    _user_error(capsys, ["distill", "get", "--solver", "bogus", "--out", str(out)], "solver", cmd="distill get")
    _user_error(capsys, ["distill", "get", "--loss", "bogus", "--out", str(out)], "loss", cmd="distill get")
    _user_error(capsys, ["distill", "get", "--huber-c", "-1", "--out", str(out)], "huber_c", cmd="distill get")
    _user_error(capsys, ["distill", "sim", "--teacher", teacher, "--lr-g", "-1", "--out", str(out)], "lr_g",
                cmd="distill sim")
    _user_error(capsys, ["train-teacher", "--grad-clip", "-1", "--out", str(out)], "grad_clip", cmd="train-teacher")
    assert not out.exists()


def test_warm_start_of_another_network_is_one_line_before_any_work(capsys, tmp_path, teacher):
    out = tmp_path / "run"
    get_student = Path(__file__).resolve().parents[1] / "getfast/assets/students/get-n2-fashion-mnist.safetensors"
    _user_error(capsys, ["distill", "sim", "--teacher", teacher, "--warm-start", str(get_student), "--out", str(out),
                         "--device", "cpu", "--no-progress"],
                "get-n2-fashion-mnist.safetensors", "do not fit the student this run trains", cmd="distill sim")
    _user_error(capsys, ["distill", "gdd", "--teacher", teacher, "--warm-start", str(tmp_path / "nope.safetensors"),
                         "--data", "digits", "--out", str(out), "--device", "cpu", "--no-progress"],
                "--warm-start", "is not a file", cmd="distill gdd")
    assert not out.exists()


def test_fid_with_a_missing_gen_fails_at_once(capsys, tmp_path, monkeypatch):
    import getfast.metrics.fid as fid
    monkeypatch.setattr(fid, "reference_stats", lambda *a, **k: pytest.fail("reference statistics computed"))
    monkeypatch.setattr(fid, "get_extractor", lambda *a, **k: pytest.fail("Inception loaded"))
    t0 = time.perf_counter()
    _user_error(capsys, ["fid", "--gen", str(tmp_path / "missing"), "--n", "8"], "--gen", str(tmp_path / "missing"))
    assert time.perf_counter() - t0 < 5.0


def test_fid_with_a_folder_of_non_images(capsys, tmp_path, monkeypatch):
    import getfast.metrics.fid as fid
    monkeypatch.setattr(fid, "reference_stats", lambda *a, **k: pytest.fail("reference statistics computed"))
    monkeypatch.setattr(fid, "_resolve_extractor", lambda *a, **k: pytest.fail("Inception loaded"))
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("not an image")
    _user_error(capsys, ["fid", "--gen", str(junk), "--n", "8"], str(junk), "holds no images")
    (junk / "fake.png").write_text("not a png either")
    _user_error(capsys, ["fid", "--gen", str(junk), "--n", "8"], "fake.png", "not a readable image")
    _user_error(capsys, ["fid", "--gen", str(junk), "--steps", "4"], "--steps", "checkpoints")
    _user_error(capsys, ["fid", "--gen", str(junk), "--ref", str(tmp_path / "noref")], "--ref")


@pytest.mark.skipif(not NO_GPU, reason="this machine has a GPU")
@pytest.mark.parametrize("args", [["sample"], ["make-pairs", "--n", "4"], ["train-teacher"], ["fid", "--gen", "fashion-mnist"],
                                  ["distill", "sim"]])
def test_device_cuda_without_a_gpu(capsys, tmp_path, args):
    args = args + ["--device", "cuda"]
    if args[0] == "sample":
        args += ["--out", str(tmp_path / "x.png")]
    elif args[0] != "fid":
        args += ["--out", str(tmp_path / "o")]
    cmd = "distill sim" if args[0] == "distill" else args[0]
    _user_error(capsys, args, "--device cuda", "no CUDA device", cmd=cmd)
    assert not (tmp_path / "o").exists()


def test_make_pairs_bad_device_and_bad_teacher_leave_nothing(capsys, tmp_path, teacher):
    out = tmp_path / "pairs"
    _user_error(capsys, ["make-pairs", "--n", "4", "--teacher", teacher, "--device", "bogus", "--out", str(out)],
                "device", "bogus")
    _user_error(capsys, ["make-pairs", "--n", "4", "--teacher", str(tmp_path / "nope.safetensors"), "--out", str(out)],
                "nope.safetensors")
    assert not out.exists()


def test_unwritable_out(capsys, tmp_path, teacher):
    f = tmp_path / "file"
    f.write_text("x")
    for args in (["sample", "--ckpt", teacher, "--out", str(f / "x.png")],
                 ["make-pairs", "--n", "4", "--teacher", teacher, "--out", str(f / "pairs")],
                 ["train-teacher", "--out", str(f / "run")],
                 ["distill", "sim", "--teacher", teacher, "--out", str(f / "run")],
                 ["demo", "--out", str(f / "demo")]):
        cmd = "distill sim" if args[0] == "distill" else args[0]
        _user_error(capsys, args, "--out", str(f), cmd=cmd)
    _user_error(capsys, ["sample", "--ckpt", teacher, "--out", str(tmp_path)], "--out", str(tmp_path))
    _user_error(capsys, ["sample", "--ckpt", teacher, "--out", str(tmp_path / "x.jpg")], "--out", "png")


def test_disk_full_is_one_line(capsys, tmp_path, teacher, monkeypatch):
    import getfast.io as gio

    def full(*a):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(gio.os, "write", full)
    out = tmp_path / "x.png"
    _user_error(capsys, ["sample", "--ckpt", teacher, "--steps", "1", "--n", "2", "--out", str(out)],
                str(out), "No space left on device", "disk is full")
    assert not out.exists() and list(tmp_path.iterdir()) == []


# --- sampling --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,names", [
    (["--steps", "0"], ["steps (--steps)", "0"]),
    (["--steps", "-2"], ["steps (--steps)", "-2"]),
    (["--n", "0"], ["n (--n)"]),
    (["--label", "99"], ["label (--label)", "99"]),
    (["--label", "-1"], ["label (--label)"]),
    (["--sampler", "bogus"], ["sampler (--sampler)"]),
])
def test_sample_bad_values(capsys, tmp_path, teacher, args, names):
    out = tmp_path / "x.png"
    _user_error(capsys, ["sample", "--ckpt", teacher, "--out", str(out), "--steps", "1"] + args, *names)
    assert not out.exists()


def test_sample_options_that_do_not_apply(capsys, tmp_path):
    from getfast.teacher import ASSETS
    p = ASSETS / "students" / "sim-fashion-mnist.safetensors"
    if not p.exists():
        pytest.skip("committed SIM student missing")
    for args, name in ((["--steps", "18"], "steps"), (["--sampler", "heun"], "sampler"), (["--cfg-scale", "2"], "cfg_scale")):
        _user_error(capsys, ["sample", "--ckpt", str(p), "--out", str(tmp_path / "x.png")] + args, name,
                    "does not apply", "one-step")


def test_sample_student_with_nan_weights(capsys, tmp_path):
    from getfast.methods import save_student
    from getfast.models.onestep import OneStepGenerator
    G = OneStepGenerator(build_denoiser("UNet-XS", 8, 1, 10), 2.5)
    with torch.no_grad():
        next(G.parameters()).fill_(float("nan"))
    p = tmp_path / "student.safetensors"
    save_student(G, {"method": "sim", "config": {"method": "sim", "sigma_init": 2.5}, "shape": [1, 8, 8],
                     "num_classes": 10, "teacher_meta": META}, p)
    _user_error(capsys, ["sample", "--ckpt", str(p), "--out", str(tmp_path / "x.png")], str(p), "NaN")
    assert not (tmp_path / "x.png").exists()


def test_sample_run_folder_without_student(capsys, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"loop": {}, "method": {"method": "get"}}))
    _user_error(capsys, ["sample", "--ckpt", str(run), "--out", str(tmp_path / "x.png")],
                str(run), "student.safetensors", "getfast distill get --resume")


def test_sample_writes_a_grid(capsys, tmp_path, teacher):
    out = tmp_path / "deep" / "x.png"
    assert main(["sample", "--ckpt", teacher, "--steps", "1", "--n", "3", "--label", "2", "--out", str(out)]) == 0
    assert out.exists() and "wrote" in capsys.readouterr().out


# --- interrupts and internal errors --------------------------------------------------------------------

def test_ctrl_c_says_how_to_resume(capsys, tmp_path, teacher, monkeypatch):
    import getfast.sampling as sampling
    import getfast.train.loop as loop

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(loop, "fit", interrupted)
    out = tmp_path / "run"
    args = ["distill", "sim", "--teacher", teacher, "--kimg", "0.01", "--out", str(out)]
    rc, err = _run(capsys, args)
    assert rc == 130 and "interrupted" in err and f"--out {out}" in err and err.endswith("--resume"), err
    assert "Traceback" not in err
    rc, err = _run(capsys, args + ["--resume", "no", "--overwrite"])  # the hint replaces both with --resume
    assert rc == 130 and err.endswith(f"--kimg 0.01 --out {out} --resume") and "--overwrite" not in err, err
    monkeypatch.setattr(sampling, "make_pairs", interrupted)
    rc, err = _run(capsys, ["make-pairs", "--n", "4", "--teacher", teacher, "--out", str(tmp_path / "p")])
    assert rc == 130 and "same command again" in err and str(tmp_path / "p") in err
    monkeypatch.setattr(sampling, "sample_grid", interrupted)
    rc, err = _run(capsys, ["sample", "--out", str(tmp_path / "x.png")])
    assert rc == 130 and err == "getfast sample: interrupted"


def test_internal_errors_keep_their_traceback(tmp_path, monkeypatch):
    import getfast.sampling as sampling

    def bug(*a, **k):
        raise RuntimeError("an internal bug")
    monkeypatch.setattr(sampling, "sample_grid", bug)
    with pytest.raises(RuntimeError, match="an internal bug"):
        main(["sample", "--out", str(tmp_path / "x.png")])


def test_subprocess_user_error_is_one_line(tmp_path):
    r = subprocess.run([sys.executable, "-m", "getfast.cli", "sample", "--steps", "0", "--out", str(tmp_path / "x.png")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    # the last line is the whole report (a library warning printed on import may precede it)
    assert r.stderr.strip().splitlines()[-1] == "getfast sample: error: steps (--steps) must be an integer >= 1, got 0"


def test_every_command_runs_inside_the_tf32_context_of_its_device(tmp_path, monkeypatch):
    # the flags themselves (CUDA only, restored afterwards): test_loop_compile's test of distributed.tf32
    import contextlib

    import getfast.sampling as sampling
    from getfast.train import distributed
    seen = []

    @contextlib.contextmanager
    def recorder(device, on):
        seen.append((device.type, on))
        try:
            yield
        finally:
            seen.append("restored")
    monkeypatch.setattr(distributed, "tf32", recorder)

    def job(*a, **k):
        seen.append("job")
        raise RuntimeError("stop here")
    monkeypatch.setattr(sampling, "sample_grid", job)
    for flags, on in (([], True), (["--no-tf32"], False)):
        seen.clear()
        with pytest.raises(RuntimeError, match="stop here"):
            main(["sample", "--device", "cpu", "--out", str(tmp_path / "x.png")] + flags)
        assert seen == [("cpu", on), "job", "restored"]
    assert _parse(["sample", "--no-tf32"]).tf32 is False and _parse(["make-pairs", "--n", "1"]).tf32 is True


# --- issue 27: hostile and careless inputs -----------------------------------------------------------------

def _student(path, meta_change=None, drop=()):
    from getfast.methods import save_student
    from getfast.models.onestep import OneStepGenerator
    torch.manual_seed(0)
    G = OneStepGenerator(build_denoiser("UNet-XS", 8, 1, 10), 2.5)
    meta = {"method": "sim", "config": {"method": "sim", "sigma_init": 2.5}, "shape": [1, 8, 8],
            "num_classes": 10, "teacher_meta": dict(META)}
    for k in drop:
        del meta[k]
    if meta_change:
        meta_change(meta)
    save_student(G, meta, path)
    return path


def _flip_weight_byte(src, dst, offset=1000):
    raw = bytearray(open(src, "rb").read())
    n = int.from_bytes(raw[:8], "little")
    raw[8 + n + offset] ^= 0x01
    open(dst, "wb").write(raw)
    return dst


def test_exported_weights_carry_a_checksum_that_loading_verifies(capsys, tmp_path, teacher):
    from getfast.teacher import ASSETS
    from getfast.weights import CHECKSUM_KEY, read_weights
    good = _student(tmp_path / "student.safetensors")
    assert CHECKSUM_KEY in read_weights(good)[1] and CHECKSUM_KEY in read_weights(teacher)[1]
    assert main(["sample", "--ckpt", str(good), "--n", "2", "--out", str(tmp_path / "ok.png")]) == 0
    for src in (good, Path(teacher), ASSETS / "students" / "sim-fashion-mnist.safetensors"):  # the last predates it
        bad = _flip_weight_byte(src, tmp_path / f"flipped-{src.name}")
        _user_error(capsys, ["sample", "--ckpt", str(bad), "--n", "2", "--steps", "1", "--out", str(tmp_path / "x.png")],
                    str(bad), "damaged or was altered")
    assert not (tmp_path / "x.png").exists()


def test_every_committed_product_passes_its_checksum():
    from getfast.teacher import ASSETS
    from getfast.weights import read_weights
    files = sorted(ASSETS.rglob("*.safetensors"))
    assert files
    for f in files:
        read_weights(f)  # raises on a mismatch


def test_fid_refuses_fewer_images_than_n_unless_allowed(capsys, tmp_path, monkeypatch):
    import numpy as np

    import getfast.metrics.fid as fid
    from getfast.io import save_images
    monkeypatch.setattr(fid, "reference_stats", lambda *a, **k: pytest.fail("reference statistics computed"))
    save_images(np.zeros((5, 8, 8), np.uint8), tmp_path / "five")
    np.savez(tmp_path / "five.npz", x=np.zeros((5, 8, 8), np.uint8))
    for gen in (tmp_path / "five", tmp_path / "five.npz"):
        _user_error(capsys, ["fid", "--gen", str(gen), "--n", "8"], str(gen), "5 images", "--n", "--allow-fewer")
    with pytest.raises(pytest.fail.Exception, match="reference statistics"):  # allowed: it goes on to the work
        main(["fid", "--gen", str(tmp_path / "five"), "--n", "8", "--allow-fewer"])
    _user_error(capsys, ["fid", "--gen", "fashion-mnist", "--allow-fewer"], "--allow-fewer")


def test_gdd_refuses_data_unlike_the_teachers_images(capsys, tmp_path, teacher):
    import numpy as np
    cases = {"7x7.npz": dict(x=np.zeros((20, 7, 7), np.uint8), y=np.arange(20) % 10),
             "rgb.npz": dict(x=np.zeros((20, 8, 8, 3), np.uint8), y=np.arange(20) % 10),
             "unlabelled.npz": dict(x=np.zeros((20, 8, 8), np.uint8)),
             "20classes.npz": dict(x=np.zeros((20, 8, 8), np.uint8), y=np.arange(20))}
    words = {"7x7.npz": "1x7x7", "rgb.npz": "3x8x8", "unlabelled.npz": "no class labels", "20classes.npz": "10 classes"}
    out = tmp_path / "run"
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
        _user_error(capsys, ["distill", "gdd", "--teacher", teacher, "--data", str(tmp_path / name), "--out", str(out)],
                    "--data", name, words[name], cmd="distill gdd")
    assert not out.exists()


@pytest.mark.parametrize("args,names", [
    (["train-teacher", "--resolution", "100000"], ["resolution (--resolution)", "4096"]),
    (["train-teacher", "--data", "digits", "--resolution", "4096"], ["resolution (--resolution)", "memory"]),
    (["sample", "--n", "1000000000"], ["n (--n)", "memory"]),
    (["sample", "--seed", str(2**70)], ["seed (--seed)"]),
    (["fid", "--gen", "fashion-mnist", "--seed", str(2**70)], ["seed (--seed)"]),
    (["train-teacher", "--lr", "-1e-3"], ["lr (--lr)", "> 0"]),
    (["train-teacher", "--lr", "-1E+2"], ["lr (--lr)"]),
    (["distill", "gdd", "--betas", "-0.1", "0.9"], ["betas (--betas)"]),
    (["train-teacher", "--P-mean", "80"], ["P_mean (--P-mean)"]),
    (["train-teacher", "--data", "digits", "--model", "UNet-XS", "--batch", "100000000"], ["batch (--batch)", "memory"]),
    (["train-teacher", "--seed", str(2**70)], ["seed (--seed)"]),
])
def test_sizes_seeds_and_negative_numbers(capsys, tmp_path, teacher, monkeypatch, args, names):
    import getfast.limits as limits
    monkeypatch.setattr(limits, "available_memory", lambda device="cpu": 2 * 10**9)  # the same on every machine
    if args[0] == "sample":
        args = args + ["--ckpt", teacher, "--out", str(tmp_path / "x.png")]
    elif args[0] != "fid":
        args = args + ["--out", str(tmp_path / "run")]
    cmd = "distill gdd" if args[0] == "distill" else args[0]
    _user_error(capsys, args, *names, cmd=cmd)
    assert not (tmp_path / "run").exists() and not (tmp_path / "x.png").exists()


def test_malformed_metadata_is_one_line_naming_the_file(capsys, tmp_path, teacher):
    import json as _json

    from safetensors.torch import load_file, save_file
    state = load_file(teacher)
    cases = {"list.safetensors": ("getfast", "[]", "must be a JSON object"),
             "empty.safetensors": ("getfast", "{}", "'model'"),
             "badres.safetensors": ("getfast", _json.dumps({**META, "resolution": "eight"}), "'resolution'"),
             "notjson.safetensors": ("getfast", "{oops", "not valid JSON"),
             "slist.safetensors": ("getfast_student", "[]", "must be a JSON object"),
             "sempty.safetensors": ("getfast_student", "{}", "'method'")}
    for name, (key, text, word) in cases.items():
        save_file(state if key == "getfast" else load_file(_student(tmp_path / "s.safetensors")),
                  str(tmp_path / name), {key: text})
        _user_error(capsys, ["sample", "--ckpt", str(tmp_path / name), "--steps", "1", "--n", "1",
                             "--out", str(tmp_path / "x.png")], name, word)
    noconfig = _student(tmp_path / "noconfig.safetensors", drop=("config",))
    _user_error(capsys, ["sample", "--ckpt", str(noconfig), "--out", str(tmp_path / "x.png")], "noconfig", "'config'")
    other = _student(tmp_path / "other.safetensors", meta_change=lambda m: m["teacher_meta"].update(model="UNet-S"))
    err = _user_error(capsys, ["sample", "--ckpt", str(other), "--out", str(tmp_path / "x.png")], "other.safetensors",
                      "do not fit")
    assert len(err) < 400, err
    huge = _student(tmp_path / "huge.safetensors", meta_change=lambda m: m.update(shape=[1, 100000, 100000]))
    _user_error(capsys, ["sample", "--ckpt", str(huge), "--out", str(tmp_path / "x.png")], "huge", "'shape'")
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text("[1]")
    _user_error(capsys, ["sample", "--ckpt", str(run), "--out", str(tmp_path / "x.png")], "config.json", "JSON object")
    assert not (tmp_path / "x.png").exists()


def test_hostile_npz_and_pt_files_are_one_line(capsys, tmp_path):
    import hashlib
    import io
    import os

    import numpy as np
    (tmp_path / "garbage.npz").write_bytes(os.urandom(1000))
    np.savez(tmp_path / "objects.npz", x=np.array([object()] * 4, dtype=object))
    np.savez(tmp_path / "biglabel.npz", x=np.zeros((4, 8, 8), np.uint8), y=np.array([0, 1, 2, 2**62]))
    for name, word in (("garbage.npz", "not an .npz archive"), ("objects.npz", "Python objects"),
                       ("biglabel.npz", "label 4611686018427387904")):
        err = _user_error(capsys, ["train-teacher", "--data", str(tmp_path / name), "--cond", "--model", "UNet-XS",
                                   "--out", str(tmp_path / "run")], name, word)
        assert "allow_pickle" not in err
    assert not (tmp_path / "run").exists()

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'PWNED'}",))
    buf = io.BytesIO()
    torch.save({"format": "getfast-train-v1", "x": Evil()}, buf)
    payload = buf.getvalue()
    pt = tmp_path / "ckpt-000000010.pt"
    pt.write_bytes(b"GETFAST-CKPT v1 " + hashlib.sha256(payload).hexdigest().encode() + b"\n" + payload)
    err = _user_error(capsys, ["sample", "--ckpt", str(pt), "--out", str(tmp_path / "x.png")], str(pt), "refused")
    assert "weights_only" not in err and not (tmp_path / "PWNED").exists()


def test_sigterm_exits_143_with_the_resume_hint(capsys, tmp_path, teacher, monkeypatch):
    import os
    import signal

    import getfast.train.loop as loop

    def killed(*a, **k):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)
        pytest.fail("SIGTERM did not stop the command")
    monkeypatch.setattr(loop, "fit", killed)
    out = tmp_path / "run"
    before = signal.getsignal(signal.SIGTERM)
    rc, err = _run(capsys, ["distill", "sim", "--teacher", teacher, "--kimg", "0.01", "--out", str(out)])
    assert rc == 143 and "terminated (SIGTERM)" in err and err.endswith(f"--out {out} --resume"), err
    assert signal.getsignal(signal.SIGTERM) is before  # the command's handler is gone again


def test_a_nan_teacher_is_blamed_by_name(capsys, tmp_path):
    D = build_denoiser("UNet-XS", 8, 1, 10)
    with torch.no_grad():
        next(D.parameters()).fill_(float("nan"))
    bad = tmp_path / "nan-teacher.safetensors"
    export(D, META, bad)
    for method in ("sim", "gdd", "guided"):
        err = _user_error(capsys, ["distill", method, "--teacher", str(bad), "--out", str(tmp_path / "run")],
                          str(bad), "NaN", cmd=f"distill {method}")
        assert "learning rate" not in err
    _user_error(capsys, ["make-pairs", "--n", "4", "--teacher", str(bad), "--out", str(tmp_path / "p")], "NaN")
    assert not (tmp_path / "run").exists() and not (tmp_path / "p").exists()
