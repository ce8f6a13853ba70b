"""diffusers UNet2DModel pipelines as EDM-style teachers, checked against diffusers' own DDIM scheduler."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers", reason="diffusers teachers need the optional extra getfast[diffusers]")

from getfast.importers import ConvertConfig, convert, is_diffusers_dir  # noqa: E402
from getfast.teacher import load  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread_module")


def _pipeline(tmp_path, prediction_type="epsilon", classes=0, flat=False):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=3, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8,
                                 num_class_embeds=classes or None)
    with torch.no_grad():  # a random model whose output depends strongly on its inputs
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", prediction_type=prediction_type)
    folder = tmp_path / f"pipe-{prediction_type}-{classes}-{int(flat)}"
    if flat:  # the layout of single-model repos: config.json + weights + scheduler_config.json side by side
        unet.save_pretrained(folder)
        sched.save_pretrained(folder)
    else:
        diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    return folder, unet.eval(), sched


def _diffusers_ddim(unet, sched_config, z, steps, labels=None):
    ddim = diffusers.DDIMScheduler.from_config(sched_config, clip_sample=False)  # D is the raw denoiser
    ddim.set_timesteps(steps)
    x = z
    for t in ddim.timesteps:
        out = unet(x, t, class_labels=labels).sample
        x = ddim.step(out, t, x, eta=0.0).prev_sample
    return x, ddim


def _getfast_ddim(D, ddim, z, labels=None):
    """DDIM (η = 0) = Euler's method on D over the scheduler's σ_t (Karras et al. 2022, Sec. 3)."""
    abar = ddim.alphas_cumprod.double()
    ts = [int(t) for t in ddim.timesteps]
    step = ddim.config.num_train_timesteps // len(ts)
    sig = lambda t: float(((1 - abar[t]) / abar[t]).sqrt()) if t >= 0 else 0.0  # noqa: E731
    x = z.double() * (1 + sig(ts[0]) ** 2) ** 0.5  # z_T / √ᾱ_T
    for t in ts:
        s, s_next = sig(t), sig(t - step)
        d = (x - D(x.float(), torch.full((z.shape[0],), s), labels).double()) / s
        x = x + (s_next - s) * d
    return x.float()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_ddim_matches_diffusers(tmp_path, prediction_type):
    folder, unet, sched = _pipeline(tmp_path, prediction_type)
    assert is_diffusers_dir(folder)
    D = load(str(folder))  # through getfast.teacher.load, as --teacher does
    assert D.meta["diffusers"]["prediction_type"] == prediction_type
    assert (D.meta["resolution"], D.meta["channels"], D.meta["num_classes"]) == (8, 3, 0)
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, ddim = _diffusers_ddim(unet, sched.config, z, steps=10)
        got = _getfast_ddim(D, ddim, z)
    err = ((got - want).abs().max() / want.abs().max()).item()
    assert err < 1e-4, f"relative error {err:.2e}"


def test_sigma_to_timestep_mapping(tmp_path):
    folder, _, sched = _pipeline(tmp_path)
    D = load(str(folder))
    abar = sched.alphas_cumprod.double()
    sig = ((1 - abar) / abar).sqrt().float()
    t = D.sigma_to_t(sig)
    torch.testing.assert_close(t, torch.arange(1000, dtype=torch.float32), rtol=0, atol=1e-3)
    mid = (sig[10].log() + sig[11].log()).div(2).exp()  # halfway in log σ -> halfway in t
    assert abs(D.sigma_to_t(mid.reshape(1)).item() - 10.5) < 1e-3
    assert D.sigma_to_t(torch.tensor([1e-5, 1e5])).tolist() == [0.0, 999.0]  # clamped to the trained range


def test_class_conditional_flat_folder_and_convert(tmp_path):
    folder, unet, sched = _pipeline(tmp_path, classes=4, flat=True)
    D = load(str(folder))
    assert D.meta["num_classes"] == 4
    x, s, labels = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0]), torch.tensor([1, 3])
    with torch.no_grad():
        ref = D(x, s, labels)
        assert torch.equal(D(x, s, torch.nn.functional.one_hot(labels, 4).float()), ref)
        with pytest.raises(ValueError, match="class_labels"):
            D(x, s, None)
        out = convert(ConvertConfig(src=str(folder), out=str(tmp_path / "t.safetensors")))
        D2 = load(str(out))
        torch.testing.assert_close(D2(x, s, labels), ref, rtol=0, atol=0)


def test_not_a_pipeline(tmp_path):
    (tmp_path / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    assert is_diffusers_dir(tmp_path)
    with pytest.raises(ValueError, match="scheduler_config.json"):
        load(str(tmp_path))
    assert not is_diffusers_dir(tmp_path / "nope")


def test_sim_distils_from_a_diffusers_teacher(tmp_path, monkeypatch):
    from getfast.methods.sim import SIMConfig, SIMMethod
    monkeypatch.setenv("GETFAST_BACKEND", "reference")
    folder, _, _ = _pipeline(tmp_path)
    m = SIMMethod(SIMConfig(), teacher=load(str(folder)))
    m.setup(lambda mod: mod)
    seen = set()
    for group in m.losses(2, 0):
        for name, loss in group.items():
            m.optimizers[name].zero_grad(set_to_none=True)
            loss.backward()
            assert all(torch.isfinite(p.grad).all() for p in m.modules[name].parameters() if p.grad is not None)
            seen.add(name)
    assert seen == {"fake", "generator"}


# --- `--sampler ddim` reproduces DDIMPipeline ------------------------------------------------------------------

def _unet(out_channels=3):
    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(sample_size=8, in_channels=3, out_channels=out_channels, layers_per_block=1,
                                 block_out_channels=(16, 32), norm_num_groups=8,
                                 down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                                 up_block_types=("AttnUpBlock2D", "UpBlock2D"), attention_head_dim=8)
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return unet.eval()


# (scheduler class, its settings, steps): every schedule, prediction type, spacing, clip_sample on/off,
# set_alpha_to_one and steps_offset of DDIMScheduler; a DDPM folder checks DDIMPipeline's conversion of it.
DDIM_CASES = {
    "ddpm-eps-linear-clip-leading": ("DDPMScheduler", dict(beta_schedule="linear"), 10),
    "ddim-v-scaled_linear-noclip-trailing": ("DDIMScheduler", dict(
        beta_schedule="scaled_linear", prediction_type="v_prediction", clip_sample=False, timestep_spacing="trailing",
        set_alpha_to_one=False), 7),
    "ddim-eps-cosine-clip0.5-linspace": ("DDIMScheduler", dict(
        beta_schedule="squaredcos_cap_v2", clip_sample=True, clip_sample_range=0.5, timestep_spacing="linspace"), 6),
    "ddim-v-linear-clip-leading-offset1": ("DDIMScheduler", dict(
        beta_schedule="linear", prediction_type="v_prediction", steps_offset=1, set_alpha_to_one=False), 8),
    "ddim-eps-scaled_linear-noclip-trailing": ("DDIMScheduler", dict(
        beta_schedule="scaled_linear", clip_sample=False, timestep_spacing="trailing"), 3),
    "ddim-v-cosine-noclip-leading": ("DDIMScheduler", dict(
        beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction", clip_sample=False), 5),
    "ddpm-sample-linear-clip": ("DDPMScheduler", dict(beta_schedule="linear", prediction_type="sample"), 4),
}


@pytest.mark.parametrize("case", sorted(DDIM_CASES))
def test_sampler_ddim_reproduces_ddim_pipeline(tmp_path, case):
    from getfast.sampling import load as load_sampler
    sched_name, kw, steps = DDIM_CASES[case]
    sched = getattr(diffusers, sched_name)(num_train_timesteps=1000, **kw)
    folder = tmp_path / case
    diffusers.DDPMPipeline(unet=_unet(), scheduler=sched).save_pretrained(folder)
    pipe = diffusers.DDIMPipeline.from_pretrained(folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    want = pipe(batch_size=3, generator=torch.Generator().manual_seed(7), eta=0.0, num_inference_steps=steps,
                output_type="np").images                                     # (B, H, W, C) in [0, 1]
    s = load_sampler(str(folder), sampler="ddim", steps=steps)               # the path of `getfast sample`
    z = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(7))  # the pipeline's first draw
    got = (s(z) / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    err = float(abs(got - want).max())
    print(f"{case}: steps {steps}, max |Δ| {err:.2e}")
    assert err <= 1e-4, f"{case}: max |Δ| {err:.2e}"


def test_learned_variance_unet_uses_the_prediction_half(tmp_path):
    """out_channels = 2·in_channels (a learned variance): the first half is the ε prediction, as diffusers' DDPM
    scheduler splits it; DDIM then matches diffusers' DDIMScheduler stepped on that half."""
    from getfast.sampling import load as load_sampler
    unet = _unet(out_channels=6)
    sched = diffusers.DDPMScheduler(num_train_timesteps=1000, variance_type="learned_range")
    folder = tmp_path / "learned"
    diffusers.DDPMPipeline(unet=unet, scheduler=sched).save_pretrained(folder)
    D = load(str(folder))
    x, s = torch.randn(2, 3, 8, 8), torch.tensor([0.5, 3.0])
    assert D(x, s).shape == x.shape
    ddim = diffusers.DDIMScheduler.from_config(sched.config)
    ddim.set_timesteps(6)
    z = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    want = z
    with torch.no_grad():
        for t in ddim.timesteps:
            want = ddim.step(unet(want, t).sample[:, :3], t, want, eta=0.0).prev_sample
    got = load_sampler(str(folder), sampler="ddim", steps=6)(z)
    assert float((got - want).abs().max()) <= 1e-4


def test_unet_with_other_output_channels_is_refused(tmp_path):
    folder = tmp_path / "odd"
    diffusers.DDPMPipeline(unet=_unet(out_channels=4), scheduler=diffusers.DDPMScheduler()).save_pretrained(folder)
    with pytest.raises(ValueError, match="unsupported: a UNet2DModel with out_channels 4"):
        load(str(folder))


def _stable_diffusion_layout(root):
    import json
    root.mkdir()
    (root / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0", "unet": ["diffusers",
        "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "PNDMScheduler"]}))
    for sub, cfg in (("unet", {"_class_name": "UNet2DConditionModel", "in_channels": 4, "out_channels": 4,
                               "sample_size": 64, "cross_attention_dim": 768}),
                     ("vae", {"_class_name": "AutoencoderKL"})):
        (root / sub).mkdir()
        (root / sub / "config.json").write_text(json.dumps(cfg))
    (root / "scheduler").mkdir()
    (root / "scheduler" / "scheduler_config.json").write_text(json.dumps({"_class_name": "PNDMScheduler"}))
    return root


@pytest.mark.parametrize("command", ["sample", "distill", "convert", "fid"])
def test_stable_diffusion_layout_is_unsupported_in_one_line(tmp_path, capsys, command):
    from getfast.cli import main
    sd = _stable_diffusion_layout(tmp_path / "sd")
    argv = {"sample": ["sample", "--ckpt", str(sd), "--out", str(tmp_path / "s.png")],
            "distill": ["distill", "sim", "--teacher", str(sd), "--out", str(tmp_path / "run"), "--no-progress"],
            "convert": ["convert", "--from", str(sd), "--out", str(tmp_path / "t.safetensors")],
            "fid": ["fid", "--gen", str(sd)]}[command]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "unsupported: a diffusers UNet2DConditionModel" in err[0] and "Stable Diffusion" in err[0], err[0]
    assert "config.json" not in err[0]
