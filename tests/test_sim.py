"""SIM (Luo et al. 2024): gradient sign/magnitude against finite differences, and convergence."""
import pytest
import torch

from getfast.methods.sim import SIMConfig, SIMMethod, sim_generator_loss
from getfast.methods.toy import AffineGenerator, GaussianDenoiser, moments_distance

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
    torch.manual_seed(0)
    dt = torch.float64
    teacher = GaussianDenoiser(MU.to(dt), SD.to(dt)).to(dt)
    a0 = torch.tensor([0.8, 1.2, 0.9, 1.1], dtype=dt).reshape(SHAPE)
    b0 = torch.tensor([0.0, 0.3, -0.2, 0.5], dtype=dt).reshape(SHAPE)
    n, sigma, c = 200_000, 0.7, 0.3
    z, eps = torch.randn(n, *SHAPE, dtype=dt), torch.randn(n, *SHAPE, dtype=dt)
    monkeypatch.setattr("getfast.methods.sim.torch.randn_like", lambda t: eps.to(t.dtype))
    a, b = a0.clone().requires_grad_(), b0.clone().requires_grad_()
    fake = GaussianDenoiser(b0, a0.abs()).to(dt)  # the optimal fake score at θ0, frozen
    loss = sim_generator_loss(teacher, fake, a * z + b, torch.full((n,), sigma, dtype=dt), c, weighting="none")
    loss.mean().backward()
    h = 1e-4
    for name, grad in (("a", a.grad), ("b", b.grad)):
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


def _toy_method(seed=0):
    torch.manual_seed(seed)
    teacher = GaussianDenoiser(MU, SD)
    gen = AffineGenerator(SHAPE, scale=1.0, shift=0.0)  # starts off-target: N(0, 1)
    fake = GaussianDenoiser(MU, SD, learnable=True)     # SIM: fake score starts as the teacher
    cfg = SIMConfig(lr_g=1e-2, lr_fake=1e-2, grad_clip=0.0)
    method = SIMMethod(cfg, teacher=teacher, generator=gen, fake=fake, shape=SHAPE, num_classes=0)
    method.setup(lambda m: m)
    return method, gen


def test_sim_converges_to_gaussian_teacher():
    method, gen = _toy_method()
    with torch.no_grad():
        before = moments_distance(gen(torch.randn(20000, *SHAPE)), MU, SD)
    for step in range(600):
        method.step(256, step)
    with torch.no_grad():
        after = moments_distance(gen(torch.randn(20000, *SHAPE)), MU, SD)
    # Measured: start (1.02, 0.72); after 600 steps ≈ (0.02–0.08, 0.04–0.06).
    assert before[0] > 0.5 and before[1] > 0.3, "the untrained generator must fail the threshold"
    assert after[0] < 0.15 and after[1] < 0.12, after


def test_sim_loss_weighting_validation():
    teacher = GaussianDenoiser(MU, SD)
    x = torch.randn(4, *SHAPE)
    with pytest.raises(ValueError, match="weighting"):
        sim_generator_loss(teacher, teacher, x, torch.ones(4), 1.0, weighting="bogus")
