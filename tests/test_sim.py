"""SIM (Luo et al. 2024): gradient sign/magnitude against finite differences, the σ-sampling, the SiD variant,
and convergence through the shared loop (the class-conditional known answer is in test_known_answer.py)."""
import copy

import pytest
import torch

from getfast.diffusion import edm_sigmas
from getfast.methods.sim import SIMConfig, SIMMethod, sample_sigma_rho, sid_generator_loss, sim_generator_loss
from getfast.train import LoopConfig, load_ema, train

from toy import AffineGenerator, GaussianDenoiser, moments_distance  # tests/toy.py

SHAPE = (1, 2, 2)
MU = torch.tensor([1.0, -0.5, 0.3, 0.8]).reshape(SHAPE)
SD = torch.tensor([0.5, 0.3, 0.8, 0.4]).reshape(SHAPE)


def _pseudo_huber_divergence(teacher, a, b, a0, b0, z, eps, sigma, c):
    """E_{x_t ~ sg(q_θ0)} [√(‖s_p − s_θ‖² + c²) − c]: θ enters only through the generator's score."""
    fake = GaussianDenoiser(b, a.abs())  # exact denoiser of the generator law N(b, a²)
    sig = torch.full((z.shape[0],), sigma, dtype=z.dtype)
    x_t = a0 * z + b0 + sigma * eps
    y = (teacher(x_t, sig) - fake(x_t, sig)) / sigma**2
    return ((y.flatten(1).pow(2).sum(1) + c * c).sqrt() - c).mean()


def test_generator_gradient_matches_finite_differences(monkeypatch):
    """The surrogate's gradient is the gradient of the pseudo-Huber score divergence (Sec. 3.2), times σ² with
    ``weighting='sigma2'``."""
    torch.manual_seed(0)
    dt = torch.float64
    teacher = GaussianDenoiser(MU.to(dt), SD.to(dt)).to(dt)
    a0 = torch.tensor([0.8, 1.2, 0.9, 1.1], dtype=dt).reshape(SHAPE)
    b0 = torch.tensor([0.0, 0.3, -0.2, 0.5], dtype=dt).reshape(SHAPE)
    n, sigma, c = 200_000, 0.7, 0.3
    z, eps = torch.randn(n, *SHAPE, dtype=dt), torch.randn(n, *SHAPE, dtype=dt)
    monkeypatch.setattr("getfast.methods.sim.torch.randn_like", lambda t: eps.to(t.dtype))
    fake = GaussianDenoiser(b0, a0.abs()).to(dt)  # the optimal fake score at θ0, frozen
    grads = {}
    for weighting in ("none", "sigma2"):
        a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
        loss = sim_generator_loss(teacher, fake, a * z + b, torch.full((n,), sigma, dtype=dt), c, weighting=weighting)
        loss.mean().backward()
        grads[weighting] = (a.grad, b.grad)
    for g2, g in zip(grads["sigma2"], grads["none"]):
        torch.testing.assert_close(g2, sigma**2 * g)
    a, b = grads["none"]
    h = 1e-4
    for name, grad in (("a", a), ("b", b)):
        fd = torch.zeros(4, dtype=dt)
        for i in range(4):
            e = torch.zeros(4, dtype=dt)
            e[i] = h
            e = e.reshape(SHAPE)
            args_p = (a0 + e, b0) if name == "a" else (a0, b0 + e)
            args_m = (a0 - e, b0) if name == "a" else (a0, b0 - e)
            fd[i] = (_pseudo_huber_divergence(teacher, *args_p, a0, b0, z, eps, sigma, c)
                     - _pseudo_huber_divergence(teacher, *args_m, a0, b0, z, eps, sigma, c)) / (2 * h)
        # Same sign and magnitude (Monte-Carlo with common random numbers: agreement to ~1 %).
        torch.testing.assert_close(grad.flatten(), fd, rtol=0.03, atol=2e-3)
        assert (grad.flatten().sign() == fd.sign()).all()


def test_sigma_sampling_follows_the_edm_schedule():
    """σ = EDM's ρ-schedule (Karras et al. 2022, Eq. 5) at u ~ U[1 − t_max, 1]: its range is
    [σ_min, σ(1 − t_max)] and P(σ > σ_i) at the schedule's points is the matching fraction of u."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    s = sample_sigma_rho(200_000, "cpu", t_max=0.8).double()
    grid = edm_sigmas(11)[:-1]  # σ at u = 0, 0.1, ..., 1
    assert float(s.min()) >= 0.002 - 1e-9 and float(s.max()) <= float(grid[2]) + 1e-6  # u >= 0.2
    assert 24 < float(grid[2]) < 25  # t_max = 0.8 caps σ at ≈ 24.6
    for i, sig in enumerate(grid.tolist()):
        frac_u = min(max((i / 10 - 0.2) / 0.8, 0.0), 1.0)  # P(u < i/10)
        assert abs(float((s > sig).double().mean()) - frac_u) < 0.005, (i, sig)
    full = sample_sigma_rho(100_000, "cpu", t_max=1.0)
    assert float(full.max()) > 70 and float(full.min()) < 0.01
    del g


def test_sid_loss_is_sim_with_the_squared_distance():
    """With c ≫ ‖y‖ the pseudo-Huber distance is ‖y‖²/(2c), so SIM's loss times c·σ⁴ is SiD's with α = 1 times its
    normaliser w; values and gradients agree."""
    torch.manual_seed(0)
    dt = torch.float64
    teacher, fake = GaussianDenoiser(MU, SD).to(dt), GaussianDenoiser(MU + 0.1, SD * 1.2).to(dt)
    x0 = torch.randn(64, *SHAPE, dtype=dt)
    sigma = 0.5 + torch.rand(64, dtype=dt)
    eps = torch.randn_like(x0)
    c = 1e7
    out = {}
    for kind in ("sim", "sid"):
        x = x0.clone().requires_grad_()
        torch.manual_seed(1)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr("getfast.methods.sim.torch.randn_like", lambda t: eps.to(t.dtype))
            if kind == "sim":
                loss = sim_generator_loss(teacher, fake, x, sigma, c, weighting="none") * c * sigma**4
            else:
                x_t = x0 + sigma.reshape(-1, 1, 1, 1) * eps
                w = (x0 - teacher(x_t, sigma)).abs().flatten(1).mean(1)
                loss = sid_generator_loss(teacher, fake, x, sigma, alpha=1.0) * w
        loss.sum().backward()
        out[kind] = (loss.detach(), x.grad)
    torch.testing.assert_close(out["sim"][0], out["sid"][0], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(out["sim"][1], out["sid"][1], rtol=1e-5, atol=1e-7)


def _toy_method(loss="sim"):
    torch.manual_seed(0)
    teacher = GaussianDenoiser(MU, SD)
    gen = AffineGenerator(SHAPE, scale=1.0, shift=0.0)  # starts off-target: N(0, 1)
    fake = GaussianDenoiser(MU, SD, learnable=True)     # SIM: fake score starts as the teacher
    cfg = SIMConfig(lr_g=1e-2, lr_fake=1e-2, grad_clip=0.0, loss=loss)
    return SIMMethod(cfg, teacher=teacher, generator=gen, fake=fake, shape=SHAPE, num_classes=0), gen


@pytest.mark.parametrize("loss", ["sim", "sid"])
def test_sim_converges_to_gaussian_teacher(tmp_path, one_thread, loss):
    method, gen = _toy_method(loss)
    with torch.no_grad():
        before = moments_distance(gen(torch.randn(20000, *SHAPE)), MU, SD)
    train(method, LoopConfig(out=str(tmp_path), kimg=0.6 * 256, batch=256, warmup_kimg=0, log_every=100,
                             ckpt_every=600, grid_every=0, grid_n=4, progress=False, device="cpu"))
    ema = copy.deepcopy(gen)
    ema.load_state_dict(load_ema(tmp_path)[0])
    with torch.no_grad():
        after = moments_distance(ema(torch.randn(20000, *SHAPE)), MU, SD)
    assert before[0] > 0.5 and before[1] > 0.3, "the untrained generator must fail the threshold"
    assert after[0] < 0.05 and after[1] < 0.05, after


def test_config_validation():
    teacher = GaussianDenoiser(MU, SD)
    x = torch.randn(4, *SHAPE)
    with pytest.raises(ValueError, match="weighting"):
        sim_generator_loss(teacher, teacher, x, torch.ones(4), 1.0, weighting="bogus")
    for bad in (dict(c=-1.0), dict(sigma_init=0.0), dict(lr_g=float("inf")), dict(t_max=1.5), dict(loss="kl"),
                dict(fake_steps=0), dict(grad_clip=-1.0), dict(betas=(0.9,)), dict(weighting="sigma")):
        with pytest.raises(ValueError, match=next(iter(bad))):
            SIMConfig(**bad)
