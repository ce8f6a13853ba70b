"""SIM: data-free Score Implicit Matching (Luo et al., NeurIPS 2024, arXiv 2410.16794).

Two networks start as copies of the frozen teacher D_p: the generator G (one step,
x_g = G(σ_init·z)) and the fake score D_ψ, which tracks the generator's own distribution.
Each iteration:
  (a) D_ψ takes ``fake_steps`` denoising-score-matching steps on detached generator samples;
  (b) G takes one step on the SIM surrogate (their Theorem 3.1), x_t = x_g + σε,
      y = (D_p(x_t) − D_ψ(x_t))/σ²,  u = y/√(‖y‖²+c²)  (pseudo-Huber d'(y), normaliser kept),
      L_G = E[ uᵀ(D_ψ(x_t) − x_g) ] / σ²
      with both denoisers' parameters frozen but gradients flowing through x_t and x_g.
Its gradient equals the gradient of the pseudo-Huber score divergence
E_{x_t ~ sg(q_θ)}[ √(‖s_p − s_θ‖² + c²) − c ] (SIM's sampling distribution is detached);
tests/test_sim.py checks sign and magnitude against finite differences on a Gaussian.
"""
from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

import torch
from torch import nn

from getfast.diffusion import EDMLoss
from getfast.train.loop import clip_and_step


class OneStepGenerator(nn.Module):
    """x = D(σ_init·z; σ_init): a denoiser evaluated once at a fixed noise level (SiD/SIM/GDD)."""

    def __init__(self, denoiser: nn.Module, sigma_init: float):
        super().__init__()
        self.denoiser = denoiser
        self.sigma_init = sigma_init

    def forward(self, z, class_labels=None):
        sigma = torch.full((z.shape[0],), self.sigma_init, device=z.device)
        return self.denoiser(self.sigma_init * z, sigma, class_labels)


def sample_sigma_rho(n, device, sigma_min=0.002, sigma_max=80.0, rho=7.0, t_max=0.8):
    """σ on EDM's ρ-schedule with u ~ U[1 − t_max, 1] (SiD's t-sampling; t_max = 0.8 caps σ ≈ 24)."""
    u = 1 - t_max * torch.rand(n, device=device)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def sim_generator_loss(teacher, fake, x_g, sigma, c, class_labels=None, weighting="sigma2"):
    """Per-sample SIM generator loss (Luo et al. 2024, Eq. 3.6 with pseudo-Huber d).

    ``teacher`` and ``fake`` must have ``requires_grad=False`` parameters; gradients reach ``x_g``
    directly and through x_t = x_g + σε. ``weighting='sigma2'`` multiplies by σ² (removing the 1/σ²
    blow-up at small σ; u is already unit-bounded), ``'none'`` keeps the bare surrogate.
    """
    from getfast.ops import sim_loss
    s = sigma.reshape(-1, *[1] * (x_g.ndim - 1))
    x_t = x_g + s * torch.randn_like(x_g)
    d_p = teacher(x_t, sigma, class_labels).float()
    d_f = fake(x_t, sigma, class_labels).float()
    loss = sim_loss(d_p.contiguous(), d_f.contiguous(), x_g.float().contiguous(), sigma.float().contiguous(), c)
    if weighting == "sigma2":
        loss = loss * sigma**2
    elif weighting != "none":
        raise ValueError(f"weighting must be 'sigma2' or 'none', got {weighting!r}")
    return loss


@dataclass
class SIMConfig:
    """SIM: data-free Score Implicit Matching (Luo et al. 2024)."""

    teacher: str = "fashion-mnist"   # embedded teacher name, .safetensors or teacher run folder
    sigma_init: float = 2.5          # generator input noise level σ_init (SiD/SIM)
    c: float = 0.0                   # pseudo-Huber c; 0 means 1e-3·√(pixels) (per-sample scale)
    lr_g: float = 2e-5               # generator Adam learning rate
    lr_fake: float = 2e-5            # fake-score Adam learning rate
    betas: tuple = (0.0, 0.999)      # Adam betas for both (SiD uses β1 = 0)
    fake_steps: int = 1              # fake-score DSM steps per generator step
    t_max: float = 0.8               # generator-step σ from EDM's ρ-schedule, u ∈ [1 − t_max, 1]
    weighting: str = "sigma2"        # generator loss weight: sigma2 | none
    grad_clip: float = 1.0           # max gradient norm for both networks (0: off)


class SIMMethod:
    """SIM on the shared training loop. ``teacher`` may be any denoiser ``D(x, σ, labels)``."""

    ema_module = "generator"
    data = None  # data-free

    def __init__(self, cfg: SIMConfig, teacher: nn.Module | None = None, generator: nn.Module | None = None,
                 fake: nn.Module | None = None, shape=None, num_classes=None):
        from getfast.teacher import load
        self.cfg = cfg
        self.teacher = (teacher if teacher is not None else load(cfg.teacher)).eval().requires_grad_(False)
        meta = getattr(self.teacher, "meta", {})
        self.shape = tuple(shape or (meta["channels"], meta["resolution"], meta["resolution"]))
        self.num_classes = meta.get("num_classes", 0) if num_classes is None else num_classes
        gen = generator if generator is not None else OneStepGenerator(copy.deepcopy(self.teacher), cfg.sigma_init)
        fake = fake if fake is not None else copy.deepcopy(self.teacher)
        gen.train().requires_grad_(True)
        fake.train().requires_grad_(True)
        self.modules = {"generator": gen, "fake": fake}
        self.optimizers = {
            "generator": torch.optim.Adam(gen.parameters(), lr=cfg.lr_g, betas=tuple(cfg.betas)),
            "fake": torch.optim.Adam(fake.parameters(), lr=cfg.lr_fake, betas=tuple(cfg.betas)),
        }
        n_pix = 1
        for d in self.shape:
            n_pix *= d
        self.c = cfg.c or 1e-3 * n_pix**0.5
        self.dsm = EDMLoss()

    def config(self):
        return {"method": "sim", **asdict(self.cfg)}

    def setup(self, wrap):
        self.teacher.to(next(self.modules["generator"].parameters()).device)
        self.G, self.fake = wrap(self.modules["generator"]), wrap(self.modules["fake"])

    def _labels(self, n, device):
        return torch.randint(0, self.num_classes, (n,), device=device) if self.num_classes else None

    def step(self, batch, step):
        """``batch`` is the local batch size (data-free methods get a count from the loop)."""
        device = next(self.modules["generator"].parameters()).device
        n = batch
        clip = self.cfg.grad_clip or None
        # (a) fake score: denoising score matching on detached generator samples.
        for _ in range(self.cfg.fake_steps):
            z, labels = torch.randn(n, *self.shape, device=device), self._labels(n, device)
            with torch.no_grad():
                x_g = self.G(z, labels)
            loss_fake = self.dsm(self.fake, x_g.float(), labels).mean()
            self.optimizers["fake"].zero_grad(set_to_none=True)
            loss_fake.backward()
            clip_and_step(self.optimizers["fake"], self.modules["fake"].parameters(), clip)
        # (b) generator: SIM surrogate, both denoisers frozen, gradients through x_t and x_g.
        fake = self.modules["fake"]
        fake.requires_grad_(False)
        try:
            z, labels = torch.randn(n, *self.shape, device=device), self._labels(n, device)
            x_g = self.G(z, labels)
            sigma = sample_sigma_rho(n, device, t_max=self.cfg.t_max)
            loss_g = sim_generator_loss(self.teacher, fake, x_g, sigma, self.c, labels, self.cfg.weighting).mean()
            self.optimizers["generator"].zero_grad(set_to_none=True)
            loss_g.backward()
            clip_and_step(self.optimizers["generator"], self.modules["generator"].parameters(), clip)
        finally:
            fake.requires_grad_(True)
        return {"loss_fake": loss_fake.detach(), "loss_g": loss_g.detach()}

    def sample_grid(self, ema, n):
        device = next(ema.parameters()).device
        z = torch.randn(n, *self.shape, device=device)
        labels = torch.arange(n, device=device) % self.num_classes if self.num_classes else None
        return ema(z, labels)
