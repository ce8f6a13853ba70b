"""Guided distillation (Meng et al. 2023): w-conditioned student (stage 1), progressive distillation (stage 2),
on analytic class-conditional Gaussian teachers, plus the CLI's multi-stage run and guided sampling."""
import copy
import json

import pytest
import torch

from getfast.diffusion import ddim, ddim_step, vp_alpha_sigma, vp_denoise
import toy  # tests/toy.py: the analytic problems with known answers
from getfast.methods.guided import GuidedConfig, GuidedMethod, make_w_student, pd_target, snr_weight
from getfast.train import LoopConfig, load_ema, train

SHAPE = (2, 1, 1)
CLASS_MEANS = torch.tensor([[1.0, 0.5], [-1.0, 0.5], [0.0, -1.0]]).reshape(3, *SHAPE)
STD = torch.tensor([0.5, 0.3]).reshape(SHAPE)


def _gauss_teacher():
    return toy.GaussianDenoiser(torch.zeros(SHAPE), STD, class_means=CLASS_MEANS)


def _data():
    return toy.gaussian_samples(4096, torch.zeros(SHAPE), STD, class_means=CLASS_MEANS, seed=1)


def _train(method, student, steps, out, batch=256):
    rec = train(method, LoopConfig(out=str(out), kimg=steps * batch / 1000, batch=batch, warmup_kimg=0, log_every=steps,
                                   ckpt_every=steps, grid_every=0, grid_n=0, progress=False, device="cpu"))
    assert rec["loss"] > 0
    ema = copy.deepcopy(student)
    ema.load_state_dict(load_ema(out)[0])
    return ema


def _tiny_teacher(cond=True):
    from getfast.teacher import build_denoiser
    torch.manual_seed(0)
    t = build_denoiser("UNet-XS", 8, 1, 10 if cond else 0)
    torch.nn.init.normal_(t.backbone.out_conv.weight, std=0.1)  # a zero head would make every output c_skip·x
    t.meta = {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10 if cond else 0,
              "label_dropout": 0.1 if cond else 0.0, "data": "digits"}
    return t.eval().requires_grad_(False)


# --- building blocks ---------------------------------------------------------------------------------------

def test_w_student_starts_as_the_conditional_teacher():
    t = _tiny_teacher()
    s = make_w_student(t).eval()
    assert s.backbone.map_w is not None and float(s.backbone.map_w.weight.detach().abs().sum()) == 0
    x, sigma, labels = torch.randn(4, 1, 8, 8), torch.tensor([0.1, 1.0, 10.0, 80.0]), torch.tensor([0, 3, -1, 9])
    with torch.no_grad():
        torch.testing.assert_close(s(x, sigma, labels, w=torch.tensor([0.0, 1.0, 2.5, 4.0])), t(x, sigma, labels))
    with pytest.raises(ValueError, match="class-conditional"):
        GuidedMethod(GuidedConfig(stage="cfg"), teacher=_tiny_teacher(cond=False))


def test_pd_target_makes_one_step_land_on_two_teacher_steps():
    """One DDIM step t → t−1/N with x̂ = x̃ reproduces the teacher's two half steps (Salimans & Ho 2022, Alg. 2)."""
    teacher = toy.WGuided(_gauss_teacher())
    g = torch.Generator().manual_seed(0)
    for steps in (1, 2, 4):
        z = torch.randn(64, *SHAPE, generator=g, dtype=torch.float64)
        t = torch.randint(1, steps + 1, (64,), generator=g).double() / steps
        labels, w = torch.randint(0, 3, (64,), generator=g), 4 * torch.rand(64, generator=g)
        kw = {"w": w}
        xt = pd_target(teacher, z, t, steps, labels, w=w)
        t1, t2 = t - 0.5 / steps, t - 1 / steps
        z1 = ddim_step(vp_denoise(teacher, z, t, labels, **kw), z, t, t1)
        z2 = ddim_step(vp_denoise(teacher, z1, t1, labels, **kw), z1, t1, t2)
        torch.testing.assert_close(ddim_step(xt, z, t, t2), z2, rtol=1e-9, atol=1e-9)
    assert torch.allclose(snr_weight(torch.tensor([1.0, 0.5, 0.25])), torch.tensor([1.0, 1.0, 1 / 0.41421356**2]))


def test_config_validation():
    assert GuidedConfig().pd_start == 256  # the paper starts progressive distillation at 256 (latent) / 1024 steps
    for bad in (dict(w_max=float("inf")), dict(lr=0.0), dict(lr_pd=-1.0), dict(t_min=0.0), dict(grad_clip=-1.0),
                dict(pd_kimg=float("nan")), dict(grid_w=float("nan"))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GuidedConfig(**bad)
    with pytest.raises(ValueError, match="power of two"):
        GuidedConfig(pd_start=12)
    with pytest.raises(ValueError, match="stage"):
        GuidedConfig(stage="bogus")
    with pytest.raises(ValueError, match="--steps"):
        GuidedConfig(stage="pd")
    with pytest.raises(ValueError, match="w_min"):
        GuidedConfig(w_min=3, w_max=1)
    with pytest.raises(TypeError):
        GuidedConfig(bogus=1)


# --- convergence on analytic teachers ------------------------------------------------------------------------

def test_stage1_student_matches_the_guided_teacher_on_held_out_inputs(one_thread, tmp_path):
    """Stage 1 on the analytic class-conditional Gaussian: the w-conditioned student (teacher + zero-initialised
    MLP correction) must reproduce (1+w)·x̂_c − w·x̂_u at held-out (x, class, t ~ U[0.001, 1], w ~ U[0, 4]).
    Bound: RMSE < 0.06 (measured 0.0098 after 500 steps); the untrained student (= the conditional teacher,
    w ignored) has RMSE 1.37."""
    torch.manual_seed(0)
    teacher = _gauss_teacher()
    student = toy.ResidualDenoiser(copy.deepcopy(teacher), SHAPE, 128, num_classes=3, w_cond=True)
    m = GuidedMethod(GuidedConfig(stage="cfg", lr=5e-3), teacher=teacher, student=student, data=_data(),
                     shape=SHAPE, num_classes=3)
    held = toy.gaussian_samples(2000, torch.zeros(SHAPE), STD, class_means=CLASS_MEANS, seed=7)
    g = torch.Generator().manual_seed(123)
    t = 0.001 + 0.999 * torch.rand(2000, generator=g)
    w = 4 * torch.rand(2000, generator=g)
    a, s = vp_alpha_sigma(t)
    z = a.reshape(-1, 1, 1, 1) * held.x + s.reshape(-1, 1, 1, 1) * torch.randn(2000, *SHAPE, generator=g)
    with torch.no_grad():
        target = vp_denoise(teacher, z, t, held.labels, cfg_scale=w.reshape(-1, 1, 1, 1))

    def rmse(net):
        with torch.no_grad():
            return float((vp_denoise(net, z, t, held.labels, w=w) - target).pow(2).mean().sqrt())

    assert rmse(student) > 0.06 * 10
    ema = _train(m, student, 500, tmp_path)
    assert rmse(ema) < 0.06, rmse(ema)


def test_progressive_round_halves_the_steps(one_thread, tmp_path):
    """One round 2 → 1 step on the analytic guided Gaussian teacher: the 1-step student's DDIM samples match the
    teacher's 2-step samples in distribution (max mean/std error over 3 classes × w ∈ {0, 2, 4} < 0.02; measured
    0.006 after 200 steps) and pointwise; the untrained student (the teacher at 1 step) is 0.20 off."""
    torch.manual_seed(0)
    teacher = toy.WGuided(_gauss_teacher())
    student = toy.ResidualDenoiser(copy.deepcopy(teacher), SHAPE, 128, num_classes=3, w_cond=True)
    cfg = GuidedConfig(stage="pd", steps=1, init="analytic", lr_pd=5e-3, pd_start=2)
    m = GuidedMethod(cfg, teacher=teacher, student=student, data=_data(), shape=SHAPE, num_classes=3)
    z = torch.randn(3000, *SHAPE, generator=torch.Generator().manual_seed(9))

    def worst(net):
        moments, rmse = 0.0, 0.0
        for c in range(3):
            for wv in (0.0, 2.0, 4.0):
                labels, w = torch.full((3000,), c), torch.full((3000,), wv)
                ref = ddim(teacher, z, 2, labels, w=w)
                got = ddim(net, z, 1, labels, w=w)
                moments = max(moments, *toy.moments_distance(got, ref.mean(0), ref.std(0)))
                rmse = max(rmse, float((got - ref).pow(2).mean().sqrt()))
        return moments, rmse

    before = worst(student)
    assert before[0] > 0.02, before
    ema = _train(m, student, 200, tmp_path)
    after = worst(ema)
    assert after[0] < 0.02 and after[1] < 0.02, after


# --- the real UNet path: CLI, stages, resume, sampling ---------------------------------------------------------

@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    from getfast.teacher import export
    t = _tiny_teacher()
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    export(t, t.meta, path)
    return path


def _args(teacher_file, out, extra=()):
    return ["distill", "guided", "--teacher", str(teacher_file), "--data", "digits", "--out", str(out),
            "--kimg", "0.016", "--pd-kimg", "0.008", "--pd-start", "4", "--batch", "8", "--ckpt-every", "1",
            "--grid-every", "0", "--grid-n", "4", "--log-every", "1", "--no-progress", *extra]


def test_cli_guided_all_stages_resume_and_sample(teacher_file, tmp_path, one_thread, capsys):
    from safetensors.torch import load_file

    from getfast.cli import main
    from getfast.methods import load_student
    out = tmp_path / "guided"
    assert main(_args(teacher_file, out)) == 0
    for name, steps, n_log in (("stage1", 4, 2), ("pd-2", 2, 1), ("pd-1", 1, 1)):
        st = load_student(out / name)
        assert st.meta["method"] == "guided" and st.meta["steps"] == steps and st.meta["sampler"] == "ddim"
        assert st.backbone.map_w is not None
        log = [json.loads(line) for line in (out / name / "log.jsonl").read_text().splitlines()]
        assert len(log) == n_log and all(0 < rec["loss"] < float("inf") for rec in log)
        assert json.loads((out / name / "config.json").read_text())["method"]["stage"] == ("cfg" if steps == 4 else "pd")
    final = load_file(str(out / "student.safetensors"))
    last = load_file(str(out / "pd-1" / "student.safetensors"))
    assert all(torch.equal(final[k], last[k]) for k in final)
    # A rerun with --resume finds every stage done and retrains nothing.
    mtime = (out / "pd-2" / "student.safetensors").stat().st_mtime_ns
    capsys.readouterr()
    assert main(_args(teacher_file, out, ["--resume"])) == 0
    assert capsys.readouterr().out.count("already trained, skipping") == 3
    assert (out / "pd-2" / "student.safetensors").stat().st_mtime_ns == mtime
    # --resume with a longer --kimg trains stage 1 further; the rounds it taught are then stale: a clear error.
    assert main(_args(teacher_file, out, ["--resume", "--kimg", "0.024"])) == 2
    assert "pd-2 was distilled from the earlier round" in capsys.readouterr().err
    log = [json.loads(line) for line in (out / "stage1" / "log.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in log] == [1, 2, 3]
    # Sampling a guided student: DDIM with its own step count, at weight w.
    for steps in ("1", "2"):
        png = tmp_path / f"s{steps}.png"
        assert main(["sample", "--ckpt", str(out), "--cfg-scale", "2", "--steps", steps, "--n", "4",
                     "--out", str(png)]) == 0
        assert png.exists()
    st = load_student(out)
    z, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    x0 = ddim(st, z, 1, labels, w=torch.zeros(3))
    x4 = ddim(st, z, 1, labels, w=torch.full((3,), 4.0))
    assert torch.isfinite(x4).all() and x0.shape == (3, 1, 8, 8)


def test_cli_guided_round_resume_refuses_a_changed_init(teacher_file, tmp_path, one_thread, capsys):
    """A round reads its teacher (--init) again on --resume: a file overwritten since (a newer export of the
    previous round) is refused with one line naming --init, instead of a run taught by two teachers."""
    import shutil

    from getfast.cli import main
    assert main(_args(teacher_file, tmp_path / "a", ["--stage", "cfg"])) == 0
    assert main(_args(teacher_file, tmp_path / "b", ["--stage", "cfg", "--seed", "1"])) == 0
    init = tmp_path / "init.safetensors"
    shutil.copy(tmp_path / "a" / "student.safetensors", init)
    rnd = ["--stage", "pd", "--steps", "2", "--init", str(init), "--kimg", "0.008"]
    assert main(_args(teacher_file, tmp_path / "r", rnd)) == 0
    shutil.copy(tmp_path / "b" / "student.safetensors", init)  # same path, other weights
    capsys.readouterr()
    assert main(_args(teacher_file, tmp_path / "r", rnd[:-1] + ["0.016", "--resume"])) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "init (--init)" in err and "refusing to resume" in err, err
    shutil.copy(tmp_path / "a" / "student.safetensors", init)  # the original weights: the resume goes on
    assert main(_args(teacher_file, tmp_path / "r", rnd[:-1] + ["0.016", "--resume"])) == 0


def test_cli_guided_single_round_checks_its_teacher(teacher_file, tmp_path, one_thread):
    from getfast.cli import main
    assert main(_args(teacher_file, tmp_path / "s1", ["--stage", "cfg"])) == 0
    # stage 1 exported a 4-step student; a round to 1 step needs a 2-step teacher.
    bad = _args(teacher_file, tmp_path / "r", ["--stage", "pd", "--steps", "1", "--init", str(tmp_path / "s1")])
    assert main(bad) == 2
    good = _args(teacher_file, tmp_path / "r", ["--stage", "pd", "--steps", "2", "--init", str(tmp_path / "s1")])
    assert main(good) == 0
