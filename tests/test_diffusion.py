"""EDM preconditioning, loss and samplers against analytic Gaussian answers (Karras et al. 2022)."""
import inspect

import pytest
import torch

from getfast.diffusion import EDMLoss, EDMPrecond, ddim, edm_sigmas, euler, heun, nfe, sample
from getfast.models import create

from toy import GaussianDenoiser, moments_distance, pf_ode_map  # tests/toy.py

SHAPE = (1, 2, 3)
MU = torch.linspace(-0.6, 0.9, 6).reshape(SHAPE)
SD = torch.linspace(0.2, 0.7, 6).reshape(SHAPE)


def test_edm_sigmas_match_karras_eq5():
    s = edm_sigmas(18)
    assert s.shape == (19,) and s[-1] == 0
    torch.testing.assert_close(s[0], torch.tensor(80.0, dtype=torch.float64))
    torch.testing.assert_close(s[-2], torch.tensor(0.002, dtype=torch.float64))
    assert (s[:-1].diff() < 0).all()
    assert nfe("heun", 18) == 35 and nfe("euler", 1) == 1


@pytest.mark.parametrize("sampler,steps,tol", [("heun", 18, 0.05), ("heun", 40, 0.012), ("euler", 64, 0.05), ("ddim", 64, 0.05)])
def test_sampler_reproduces_gaussian(sampler, steps, tol):
    torch.manual_seed(0)
    D = GaussianDenoiser(MU, SD)
    x = sample(D, torch.randn(20000, *SHAPE), sampler, steps=steps)
    dm, ds = moments_distance(x, MU, SD)
    assert dm < tol and ds < tol, (dm, ds)


def test_heun_counts_35_evaluations():
    calls = []
    D = GaussianDenoiser(MU, SD)

    def counting(x, sigma, labels=None, **kw):
        calls.append(1)
        return D(x, sigma, labels, **kw)

    heun(counting, torch.randn(4, *SHAPE), steps=18)
    assert len(calls) == 35


def test_heun_with_churn_runs_and_stays_close():
    torch.manual_seed(1)
    D = GaussianDenoiser(MU, SD)
    # Stochastic sampling needs more steps than the ODE: measured std error 0.077 at 18, 0.005 at 64.
    x = heun(D, torch.randn(20000, *SHAPE), steps=64, S_churn=10, S_min=0.05, S_max=50)
    dm, ds = moments_distance(x, MU, SD)
    assert dm < 0.02 and ds < 0.02


def test_edm_loss_minimised_by_analytic_denoiser():
    torch.manual_seed(0)
    loss = EDMLoss()
    y = MU + SD * torch.randn(50000, *SHAPE)
    sigma, noise = loss.sample_sigma(len(y), "cpu"), torch.randn_like(y)
    exact = loss(GaussianDenoiser(MU, SD), y, sigma=sigma, noise=noise).mean()
    for mu_shift, sd_scale in [(0.1, 1.0), (0.0, 1.3), (0.0, 0.7), (-0.2, 1.1)]:
        other = loss(GaussianDenoiser(MU + mu_shift, SD * sd_scale), y, sigma=sigma, noise=noise).mean()
        assert other > exact


def test_precond_coefficients_and_cfg():
    net = EDMPrecond(create("UNet-XS", 8, 1, num_classes=3))
    sigma = torch.tensor([0.002, 0.5, 80.0])
    c_skip, c_out, c_in, c_noise = net.coefficients(sigma)
    torch.testing.assert_close(c_skip, 0.25 / (sigma**2 + 0.25))
    torch.testing.assert_close(c_out, sigma * 0.5 / (sigma**2 + 0.25).sqrt())
    torch.testing.assert_close(c_in * (sigma**2 + 0.25).sqrt(), torch.ones(3))
    torch.testing.assert_close(c_noise, sigma.log() / 4)
    net.eval()
    x, labels = torch.randn(3, 1, 8, 8), torch.tensor([0, 1, 2])
    with torch.no_grad():
        for p in net.parameters():  # make the network output depend on the class
            p.add_(0.05 * torch.randn_like(p))
        d_c, d_u = net(x, sigma, labels), net(x, sigma, None)
        torch.testing.assert_close(net(x, sigma, labels, cfg_scale=2.0), d_c + 2.0 * (d_c - d_u), rtol=1e-4, atol=1e-4)
        assert not torch.allclose(d_c, d_u)
        net.train()  # no label dropout inside the network: training mode is as deterministic as eval mode
        x, sig, labels = torch.randn(64, 1, 8, 8), torch.full((64,), 0.5), torch.arange(64) % 3
        torch.testing.assert_close(net(x, sig, labels), net.eval()(x, sig, labels))
    assert "label_dropout" not in inspect.signature(EDMPrecond).parameters


def test_pf_ode_map_is_where_heun_converges():
    """For Gaussian data the probability-flow ODE from x_T = σ_max·z ends at μ + s·(σ_max·z − μ)/√(s² + σ_max²);
    Heun's error against it falls with the step count (float64)."""
    D = GaussianDenoiser(MU, SD).double()
    z = torch.randn(2000, *SHAPE, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    exact = pf_ode_map(z, MU.double(), SD.double())
    errs = [float((heun(D, z, steps=n) - exact).abs().mean()) for n in (18, 40, 100)]
    assert errs[0] > 4 * errs[1] > 16 * errs[2] and errs[2] < 1e-3, errs  # measured 0.0203, 0.0036, 0.00053


def test_samplers_reject_unknown_name():
    with pytest.raises(ValueError, match="unknown sampler"):
        sample(GaussianDenoiser(MU, SD), torch.randn(2, *SHAPE), "dpm")


def test_ddim_one_step_is_denoiser_at_sigma_max():
    D = GaussianDenoiser(MU, SD)
    z = torch.randn(8, *SHAPE)
    out = ddim(D, z, steps=1)
    torch.testing.assert_close(out, D(z * 80.0, torch.full((8,), 80.0)), rtol=1e-4, atol=1e-4)
