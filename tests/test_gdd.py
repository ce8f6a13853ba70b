"""GDD / GDD-I (Zheng & Yang 2024): freezing rule, discriminator, GAN loss + R1, convergence on a known
answer, CLI, resume after SIGKILL and 2-process DDP."""
import copy
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import toy  # tests/toy.py: the analytic problems with known answers
from getfast.methods.gdd import (DISCRIMINATORS, INNATE_REGEX, FeatureDiscriminator, FeatureNetwork, GDDConfig,
                                 GDDMethod, augment, d_loss, freeze_innate, g_loss, innate_parameters, r1_penalty)
from getfast.train import LoopConfig, load_ema, train

ROOT = Path(__file__).resolve().parents[1]


def _tiny_teacher(attn=()):
    from getfast.teacher import build_denoiser
    torch.manual_seed(0)
    t = build_denoiser("UNet-XS", 8, 1, 10, attn_resolutions=attn)
    torch.nn.init.normal_(t.backbone.out_conv.weight, std=0.1)  # a zero head would make every output c_skip·x
    t.meta = {"model": "UNet-XS", "resolution": 8, "channels": 1, "num_classes": 10, "label_dropout": 0.1,
              "data": "digits", "overrides": {"attn_resolutions": list(attn)}}
    return t.eval().requires_grad_(False)


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory):
    from getfast.teacher import export
    t = _tiny_teacher()
    path = tmp_path_factory.mktemp("teacher") / "teacher.safetensors"
    export(t, t.meta, path)
    return path


# --- GDD-I freezing rule ------------------------------------------------------------------------------

def test_innate_regex_on_ddpmpp_is_the_official_gdd_i_set():
    """EDM's CIFAR-10 DDPM++ (55.7M params): the default pattern freezes exactly the blocks' conv0/conv1 and the
    attention output projections (official ``--freeze=1``): 85.4 % of the parameters; qkv, skips, the stem,
    affine modulations, norms and embeddings stay trainable."""
    from getfast.diffusion import EDMPrecond
    from getfast.models import create
    from getfast.models.onestep import OneStepGenerator
    with torch.device("meta"):
        unet = create("UNet-DDPMpp", 32, 3)
    total = sum(p.numel() for p in unet.parameters())
    assert 55e6 < total < 56.5e6
    names = set(innate_parameters(unet))
    params = dict(unet.named_parameters())
    frac = sum(params[n].numel() for n in names) / total
    assert frac == pytest.approx(0.854, abs=0.0005), frac
    official = re.compile(r"^(enc|dec)\.\d+x\d+_(block\d+|in\d|up|down)\.(conv0|conv1|proj)\.(weight|bias)$")
    assert names == {n for n in params if official.match(n)}
    kinds = {n.split(".")[2] for n in names}
    assert kinds == {"conv0", "conv1", "proj"}
    trainable = set(params) - names
    assert any(".qkv." in n for n in trainable) and any(".skip." in n for n in trainable)
    assert {"enc.32x32_conv.weight", "out_conv.weight", "map_layer0.weight"} <= trainable
    assert not any("affine" in n or "norm" in n for n in names)
    # Wrapped as the GDD generator, the same parameters are found and frozen.
    gen = OneStepGenerator(EDMPrecond(unet), 80.0)
    frac_gen = freeze_innate(gen)
    assert frac_gen == pytest.approx(frac)
    frozen = {n for n, p in gen.named_parameters() if not p.requires_grad}
    assert frozen == {"denoiser.backbone." + n for n in names}


def test_freeze_regex_is_configurable_and_validated():
    from getfast.models import create
    with torch.device("meta"):
        unet = create("UNet-XS", 8, 1)
    only_conv0 = innate_parameters(unet, r"^(enc|dec)\.[^.]+\.conv0\.")
    assert only_conv0 and all(".conv0." in n for n in only_conv0)
    assert set(only_conv0) < set(innate_parameters(unet, INNATE_REGEX))
    with pytest.raises(ValueError, match="freeze_regex"):
        freeze_innate(unet, r"^nothing_matches$")
    with pytest.raises(ValueError, match="freeze_regex"):
        innate_parameters(unet, r"(unclosed")


def _loop(out, steps, batch, **kw):
    base = dict(out=str(out), kimg=steps * batch / 1000, batch=batch, warmup_kimg=0, log_every=steps,
                ckpt_every=steps, grid_every=0, grid_n=4, progress=False, device="cpu")
    return LoopConfig(**{**base, **kw})


def test_gdd_i_step_changes_only_trainable_parameters(one_thread, tmp_path):
    t = _tiny_teacher()
    m = GDDMethod(GDDConfig(freeze_innate=True, lr_g=1e-3), teacher=t, log=None)
    gen = m.modules["generator"]
    before = {n: p.detach().clone() for n, p in gen.named_parameters()}
    opt_params = {id(p) for g in m.optimizers["generator"].param_groups for p in g["params"]}
    assert all((id(p) in opt_params) == p.requires_grad for p in gen.parameters())
    rec = train(m, _loop(tmp_path, 1, 8))
    assert 0.6 < rec["frozen_frac"] < 0.9
    for n, p in gen.named_parameters():
        changed = not torch.equal(p, before[n])
        if not p.requires_grad:
            assert not changed, n
    assert any(not torch.equal(p, before[n]) for n, p in gen.named_parameters() if p.requires_grad)


def test_generator_steps_before_the_discriminator(one_thread):
    """Official order: the generator's update first; the discriminator then judges fakes of the updated one."""
    t = _tiny_teacher()
    m = GDDMethod(GDDConfig(), teacher=t, log=None)
    m.setup(lambda mod: mod)
    phases = list(m.losses(m.data.batch(torch.arange(4)), 0))
    assert len(phases) == 2  # no R1 at the first step (official: batch_idx != 0)
    first, second = phases
    assert "generator" in first and "discriminator" not in first
    assert "discriminator" in second and "generator" not in second and "r1" not in second
    # Lazy R1 is a discriminator step of its own every r1_interval steps (official stage DO_DR1).
    phases = list(m.losses(m.data.batch(torch.arange(4)), 16))
    assert len(phases) == 3 and set(phases[2]) == {"discriminator", "r1"}


def test_discriminator_adam_is_the_official_lazy_r1_setting():
    """Zyriix/GDD training_loop.py: D Adam lr = dlr·16/17, betas (0, 0.99^(16/17)), eps 1e-8; G Adam (0, 0.99)."""
    m = GDDMethod(GDDConfig(lr_d=1e-4), teacher=_tiny_teacher(), log=None)
    d, g = m.optimizers["discriminator"].defaults, m.optimizers["generator"].defaults
    assert d["lr"] == pytest.approx(1e-4 * 16 / 17) and d["eps"] == 1e-8
    assert d["betas"] == pytest.approx((0.0, 0.99 ** (16 / 17)))
    assert g["lr"] == 1e-4 and tuple(g["betas"]) == (0.0, 0.99) and g["eps"] == 1e-8


def test_generator_copy_is_deterministic(one_thread):
    """A teacher trained with label dropout (meta label_dropout 0.1) gives a generator that is a deterministic
    function of (noise, label) in training mode: no sample loses its class at random."""
    t = _tiny_teacher()
    with torch.no_grad():
        for p in t.parameters():  # zero-initialised convolutions would hide the label
            p.add_(0.05 * torch.randn_like(p))
    m = GDDMethod(GDDConfig(), teacher=t, log=None)
    gen = m.modules["generator"]
    assert gen.training
    z, labels = torch.randn(64, 1, 8, 8), torch.arange(64) % 10
    with torch.no_grad():
        assert torch.equal(gen(z, labels), gen(z, labels))
        assert not torch.equal(gen(z, labels), gen(z, None))


# --- Discriminator, losses --------------------------------------------------------------------------------

def test_teacher_encoder_discriminator_is_frozen_features_plus_heads(one_thread):
    t = _tiny_teacher(attn=(4,))
    cfg = GDDConfig()
    disc = DISCRIMINATORS["teacher-encoder"](t, cfg, 10, (1, 8, 8))
    assert isinstance(disc, FeatureDiscriminator)
    assert disc.features.levels == (8, 4) and disc.features.channels == [16, 32]
    teacher_ids = {id(p) for p in t.parameters()}
    assert not any(id(p) in teacher_ids for p in disc.parameters())
    assert all(k.startswith("heads.") for k in disc.state_dict())
    x = torch.randn(5, 1, 8, 8, requires_grad=True)
    logits = disc(x, torch.tensor([0, 1, 2, -1, 9]))
    assert logits.shape == (5, 2) and torch.isfinite(logits).all()
    # R1 needs a double backward through the frozen encoder (attention included).
    r1 = r1_penalty(logits, x)
    r1.backward()
    # Every head parameter but the final bias (which does not change ∇_x D) gets an R1 gradient.
    assert all((p.grad is not None) != n.endswith("out.bias") for n, p in disc.named_parameters())
    assert not any(p.grad is not None for p in t.parameters())
    lv = GDDConfig(disc_levels=("4",))
    assert DISCRIMINATORS["teacher-encoder"](t, lv, 0, (1, 8, 8)).features.levels == (4,)
    with pytest.raises(ValueError, match="disc_levels"):
        DISCRIMINATORS["teacher-encoder"](t, GDDConfig(disc_levels=(5,)), 0, (1, 8, 8))
    with pytest.raises(ValueError, match="disc"):
        GDDConfig(disc="nope")
    disc.double()
    assert next(disc.features.parameters()).dtype == torch.float64  # moved with the discriminator


def test_gan_losses_and_r1_values():
    lr, lf = torch.tensor([[0.0], [2.0]]), torch.tensor([[0.0], [-1.0]])
    sp = torch.nn.functional.softplus
    assert float(d_loss(lr, lf)) == pytest.approx(float(sp(-lr).mean() + sp(lf).mean()))
    assert float(g_loss(lf)) == pytest.approx(float(sp(-lf).mean()))
    # D(x) = a·x: ∇_x D = a for every sample, so E‖∇D‖² = ‖a‖².
    a = torch.tensor([0.5, -2.0, 1.0], requires_grad=True)
    x = torch.randn(4, 3, requires_grad=True)
    pen = r1_penalty((x * a).sum(1, keepdim=True), x)
    assert float(pen.detach()) == pytest.approx(float(a.detach().square().sum()))
    pen.backward()  # differentiable w.r.t. the discriminator's parameters: d‖a‖²/da = 2a
    torch.testing.assert_close(a.grad, 2 * a.detach())


def test_config_validation():
    for bad in (dict(r1_interval=0), dict(r1_gamma=-1.0), dict(r1_gamma=float("nan")), dict(aug_p=1.5),
                dict(lr_d=0.0), dict(sigma_init=-80.0), dict(disc_sigma=0.0), dict(grad_clip=-1.0),
                dict(betas=(1.0, 0.99)), dict(freeze_regex="(unclosed"), dict(disc_levels=("a",))):
        with pytest.raises(ValueError, match=next(iter(bad))):
            GDDConfig(**bad)
    with pytest.raises(ValueError, match="--disc-network"):
        GDDConfig(disc="torchscript")
    with pytest.raises(TypeError):
        GDDConfig(bogus=1)
    cfg = GDDConfig()  # the official recipe's defaults
    assert (cfg.lr_g, cfg.lr_d, cfg.aug_p, cfg.r1_gamma, cfg.r1_interval) == (1e-4, 1e-4, 0.0, 1e-4, 16)


# --- Augmentation ----------------------------------------------------------------------------------------

def test_augment_is_differentiable_per_image_and_off_at_p0():
    x = torch.randn(2000, 1, 8, 8, requires_grad=True)
    assert augment(x, 0.0) is x
    torch.manual_seed(0)
    y = augment(x, 0.12)
    assert y.shape == x.shape and torch.isfinite(y).all()
    unchanged = float((y.detach() == x.detach()).flatten(1).all(1).float().mean())
    assert 0.45 < unchanged < 0.7, unchanged  # five independent coins at p = 0.12 per image
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and float(x.grad.abs().sum()) > 0
    # the geometric transforms move pixels without changing them: with colour changes aside, a flipped,
    # rotated or translated image holds values of the original image only
    torch.manual_seed(1)
    img = torch.arange(64.0).reshape(1, 1, 8, 8).expand(500, 1, 8, 8).contiguous()
    out = augment(img, 1.0)
    rgb = augment(torch.rand(16, 3, 8, 8) * 2 - 1, 1.0)  # saturation applies to RGB
    assert rgb.shape == (16, 3, 8, 8) and torch.isfinite(rgb).all() and out.shape == img.shape


# --- A discriminator on a frozen network the user supplies --------------------------------------------------

class _TinyFeatures(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Conv2d(3, 4, 3, stride=2, padding=1)
        self.b = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)

    def forward(self, x):
        h = torch.relu(self.a(x))
        return [h, torch.relu(self.b(h)).mean((2, 3))]


def test_torchscript_feature_network_discriminator(tmp_path, one_thread):
    torch.manual_seed(0)
    path = tmp_path / "features.pt"
    torch.jit.script(_TinyFeatures()).save(str(path))
    t = _tiny_teacher()
    cfg = GDDConfig(disc="torchscript", disc_network=str(path), disc_input=16, disc_hidden=8)
    m = GDDMethod(cfg, teacher=t, log=None)
    disc = m.modules["discriminator"]
    assert isinstance(disc, FeatureDiscriminator) and isinstance(disc.features, FeatureNetwork)
    assert all(k.startswith("heads.") for k in disc.state_dict())  # the frozen network is not trained or saved
    x = torch.randn(3, 1, 8, 8, requires_grad=True)  # grey 8×8 -> 3 channels at 16×16, ImageNet-normalised
    logits = disc(x, torch.tensor([0, 1, 2]))
    assert logits.shape == (3, 2)
    r1_penalty(logits, x).backward()
    assert not any(p.grad is not None for p in disc.features.parameters())
    with pytest.raises(FileNotFoundError, match="disc-network"):
        GDDMethod(GDDConfig(disc="torchscript", disc_network=str(tmp_path / "missing.pt")), teacher=t, log=None)


# --- Convergence on a known answer ------------------------------------------------------------------------

MEAN = torch.tensor([1.0, -0.5]).reshape(2, 1, 1)
STD = torch.tensor([0.5, 0.25]).reshape(2, 1, 1)


def test_gdd_gan_converges_on_2d_gaussian(one_thread, tmp_path):
    """A tiny MLP generator, trained by GDDMethod on the shared loop (non-saturating loss + lazy R1) against
    samples of N((1, −0.5), diag(0.5², 0.25²)), lands on the target; untrained: mean err ≈ 0.9, MMD² ≈ 2.7."""
    torch.manual_seed(0)
    shape = (2, 1, 1)
    data = toy.gaussian_samples(4096, MEAN, STD, seed=100)
    G, D = toy.MLPGenerator(shape, 32), toy.MLPDiscriminator(shape, 64)
    cfg = GDDConfig(lr_g=1e-3, lr_d=2e-3, betas=(0.5, 0.99), r1_gamma=0.05, r1_interval=4, aug_p=0.0)
    m = GDDMethod(cfg, generator=G, discriminator=D, data=data, shape=shape, num_classes=0)
    ref = toy.gaussian_samples(2000, MEAN, STD, seed=999).x
    z = torch.randn(2000, *shape, generator=torch.Generator().manual_seed(5))

    def within(net):
        with torch.no_grad():
            x = net(z)
        dm, ds = toy.moments_distance(x, MEAN, STD)
        mmd = toy.mmd_rbf(x, ref)
        return dm < 0.08 and ds < 0.08 and mmd < 0.03, (dm, ds, mmd)

    ok, stats = within(G)
    assert not ok, f"the untrained generator already passes: {stats}"
    rec = train(m, _loop(tmp_path, 300, 256, ema_rampup=0.1, grid_n=0))
    assert {"r1", "loss_generator", "loss_discriminator", "d_real", "d_fake"} <= set(rec)  # r1: its lazy steps' mean
    ema = copy.deepcopy(G)
    ema.load_state_dict(load_ema(tmp_path)[0])
    ok, stats = within(ema)
    assert ok, stats


# --- CLI, resume, DDP -----------------------------------------------------------------------------------------

def _cli_args(teacher_file, out, kimg, extra=()):
    return ["distill", "gdd", "--teacher", str(teacher_file), "--data", "digits", "--out", str(out),
            "--kimg", str(kimg), "--batch", "8", "--ckpt-every", "2", "--grid-every", "0", "--grid-n", "4",
            "--log-every", "1", "--r1-interval", "2", "--no-progress", *extra]


def test_cli_gdd_and_gdd_i_smoke(teacher_file, tmp_path, one_thread, capsys):
    from getfast.cli import main
    from getfast.methods import load_student
    for name, extra in (("gdd", []), ("gddi", ["--freeze-innate"])):
        out = tmp_path / name
        assert main(_cli_args(teacher_file, out, 0.024, extra)) == 0
        student = load_student(out)
        assert student.meta["method"] == "gdd" and student.meta["config"]["freeze_innate"] == bool(extra)
        lines = (out / "log.jsonl").read_text().splitlines()
        assert len(lines) == 3 and "loss_generator" in lines[-1] and "r1" in lines[2]  # R1 at step 2 (interval 2)
        if extra:
            assert "frozen_frac" in lines[-1]
            assert "GDD-I: froze" in capsys.readouterr().out
        with torch.no_grad():
            x = student(torch.randn(4, 1, 8, 8), torch.arange(4))
        assert x.shape == (4, 1, 8, 8) and torch.isfinite(x).all()
    assert main(["sample", "--ckpt", str(tmp_path / "gddi"), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").exists()


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    return env


@pytest.mark.slow
def test_resume_after_sigkill_reaches_the_same_weights(teacher_file, tmp_path, one_thread):
    """Kill -9 a run right after its second checkpoint, resume it: the exported student equals the one of an
    uninterrupted run (in this process, also one thread) bit for bit."""
    from safetensors.torch import load_file

    from getfast.cli import main
    kimg = 0.064  # 8 steps of 8; checkpoints every 2 steps, R1 every 2 steps
    cmd = [sys.executable, "-m", "getfast.cli"]
    assert main(_cli_args(teacher_file, tmp_path / "full", kimg)) == 0
    out = tmp_path / "killed"
    proc = subprocess.Popen(cmd + _cli_args(teacher_file, out, kimg), env=_env(), cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 600
        while not (out / "ckpt-000000004.pt").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "student.safetensors").exists()
    res = subprocess.run(cmd + _cli_args(teacher_file, out, kimg, ["--resume"]), env=_env(), cwd=ROOT,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout
    a, b = load_file(str(tmp_path / "full" / "student.safetensors")), load_file(str(out / "student.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [int(line.split('"step": ')[1].split(",")[0]) for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))


@pytest.mark.slow
def test_ddp_two_process_gloo_smoke(teacher_file, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "getfast.cli", *_cli_args(teacher_file, out, 0.032, ["--freeze-innate", "--device", "cpu"])]
    res = subprocess.run(cmd, env=_env(), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-3000:])
    assert (out / "student.safetensors").exists()
    from getfast.train.checkpoint import load_checkpoint
    ck = load_checkpoint(out / "ckpt-000000004.pt")
    assert ck["loop"]["world"] == 2 and len(ck["rng"]) == 2
    assert len((out / "log.jsonl").read_text().splitlines()) == 4
