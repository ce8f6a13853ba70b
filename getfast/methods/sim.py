"""SIM: data-free Score Implicit Matching (Luo et al., NeurIPS 2024, arXiv 2410.16794).

Two networks start as copies of the frozen teacher D_p: the generator G (one step,
x_g = G(σ_init·z)) and the fake score D_ψ, which tracks the generator's own distribution.
Each iteration:
  (a) D_ψ takes ``fake_steps`` denoising-score-matching steps on detached generator samples;
  (b) G takes one step on the SIM surrogate of Sec. 3.2 (the score-gradient theorem), x_t = x_g + σε,
      y = (D_p(x_t) − D_ψ(x_t))/σ²  (= s_p(x_t) − s_ψ(x_t), the difference of the two scores),
      u = d′(y) = y/√(‖y‖²+c²)        (pseudo-Huber distance d(y) = √(‖y‖²+c²) − c, Sec. 3.3; normaliser kept),
      L_G = E[ uᵀ(D_ψ(x_t) − x_g) ] / σ²
      with both denoisers' parameters frozen but gradients flowing through x_t and x_g.
Its gradient equals the gradient of the pseudo-Huber score divergence
E_{x_t ~ sg(q_θ)}[ √(‖s_p − s_θ‖² + c²) − c ] (SIM's sampling distribution is detached);
tests/test_sim.py checks sign and magnitude against finite differences on a Gaussian.

The distance constant c (``SIMConfig.c``; 0 = 1e-3·√d for d pixels) is in score units, like y: for
‖y‖ ≫ c the distance is ‖y‖ (the update direction is normalised per sample), for ‖y‖ ≪ c it is
‖y‖²/(2c) (the squared distance, i.e. SiD). Since ‖y‖ = δ·√d/σ² for a per-pixel denoiser gap δ, the
default c means "quadratic while δ < 1e-3·σ²": at σ = 1 only for gaps below 1e-3, at σ = 24 up to 0.58.

``loss="sid"`` is the alternative of SiD (Zhou et al. 2024, Sec. 4; TDM uses the same normalisation): the
x-space difference Δ = D_p − D_ψ, L_G = Δᵀ((D_p − x_g) − α·Δ) / w with the detached per-sample weight
w = mean|x_g − D_p(x_t)|; α = 1 makes it SIM with the squared distance.
"""
from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from getfast.diffusion import EDMLoss
from getfast.methods.students import student_meta
from getfast.models.dropout import eval_mode
from getfast.models.onestep import OneStepGenerator
from getfast.ops import sim_loss
from getfast.teacher import load as load_teacher
from getfast.options import check_betas, check_choice, check_number, check_text
from getfast.train.step import adam

__all__ = ["OneStepGenerator", "SIMConfig", "SIMMethod", "sample_sigma_rho", "sid_generator_loss",
           "sim_generator_loss"]


def sample_sigma_rho(n, device, sigma_min=0.002, sigma_max=80.0, rho=7.0, t_max=0.8):
    """σ on EDM's ρ-schedule (Karras et al. 2022, Eq. 5) at u ~ U[1 − t_max, 1] (SiD's t-sampling): σ ranges
    from σ_min (u = 1) to σ(1 − t_max) (t_max = 0.8: ≈ 24.6)."""
    u = 1 - t_max * torch.rand(n, device=device)
    return (sigma_max ** (1 / rho) + u * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def _noised(x_g, sigma):
    s = sigma.reshape(-1, *[1] * (x_g.ndim - 1))
    return x_g + s * torch.randn_like(x_g)


def sim_generator_loss(teacher, fake, x_g, sigma, c, class_labels=None, weighting="sigma2"):
    """Per-sample SIM generator loss with the pseudo-Huber distance (Luo et al. 2024, Sec. 3.2-3.3).

    Gradients reach ``x_g`` directly and through x_t = x_g + σε; the optimizer step that uses this loss updates
    the generator only. ``weighting='sigma2'`` multiplies by σ² (removing the 1/σ² blow-up at small σ; u is
    already unit-bounded), ``'none'`` keeps the bare surrogate.
    """
    check_choice("weighting", weighting, ("sigma2", "none"))
    x_t = _noised(x_g, sigma)
    d_p = teacher(x_t, sigma, class_labels).float()
    d_f = fake(x_t, sigma, class_labels).float()
    loss = sim_loss(d_p.contiguous(), d_f.contiguous(), x_g.float().contiguous(), sigma.float().contiguous(), c)
    return loss * sigma**2 if weighting == "sigma2" else loss


def sid_generator_loss(teacher, fake, x_g, sigma, class_labels=None, alpha=1.0):
    """Per-sample SiD generator loss (Zhou et al. 2024, Sec. 4): Δᵀ((D_p − x_g) − α·Δ) / mean|x_g − D_p|, with
    Δ = D_p(x_t) − D_ψ(x_t) in x-space and the normalising weight detached."""
    x_t = _noised(x_g, sigma)
    d_p = teacher(x_t, sigma, class_labels).float()
    d_f = fake(x_t, sigma, class_labels).float()
    x = x_g.float()
    delta = d_p - d_f
    with torch.no_grad():
        w = (x - d_p).abs().flatten(1).mean(1).clamp(min=1e-5)
    return (delta * ((d_p - x) - alpha * delta)).flatten(1).sum(1) / w


@dataclass
class SIMConfig:
    """SIM: data-free Score Implicit Matching (Luo et al. 2024)."""

    teacher: str = "fashion-mnist"   # embedded teacher name, .safetensors or teacher run folder
    sigma_init: float = 2.5          # generator input noise level σ_init (SiD/SIM)
    loss: str = "sim"                # sim: pseudo-Huber on the score difference | sid: SiD's x-space loss
    c: float = 0.0                   # sim: pseudo-Huber c, in the units of the score difference y: quadratic for ‖y‖ < c, ‖y‖ above (0: 1e-3·√pixels)
    alpha: float = 1.0               # sid: SiD's α (1: SIM with the squared distance; SiD's code defaults to 1.2)
    lr_g: float = 2e-5               # generator Adam learning rate
    lr_fake: float = 2e-5            # fake-score Adam learning rate
    betas: tuple = (0.0, 0.999)      # Adam betas of the fake score, and of the generator unless --betas-g (SiD uses β1 = 0)
    betas_g: tuple[float, ...] = ()  # the generator's Adam betas (empty: --betas; SiD's --g_beta1 0.9 on FFHQ)
    fake_steps: int = 1              # fake-score DSM steps per generator step
    t_max: float = 0.8               # generator-step σ from EDM's ρ-schedule, u ∈ [1 − t_max, 1]
    weighting: str = "sigma2"        # sim: generator loss weight, sigma2 | none
    grad_clip: float = 1.0           # max gradient norm for both networks (0: off)

    def __post_init__(self):
        check_text("teacher", self.teacher, "a teacher (file, folder or import)")
        check_number("sigma_init", self.sigma_init, lo=0, lo_open=True)
        check_choice("loss", self.loss, ("sim", "sid"))
        check_number("c", self.c, lo=0)
        check_number("alpha", self.alpha)
        check_number("lr_g", self.lr_g, lo=0, lo_open=True)
        check_number("lr_fake", self.lr_fake, lo=0, lo_open=True)
        self.betas = check_betas("betas", self.betas)
        self.betas_g = check_betas("betas_g", self.betas_g) if self.betas_g else ()
        check_number("fake_steps", self.fake_steps, lo=1, integer=True)
        check_number("t_max", self.t_max, lo=0, hi=1, lo_open=True)
        check_choice("weighting", self.weighting, ("sigma2", "none"))
        check_number("grad_clip", self.grad_clip, lo=0)


class SIMMethod:
    """SIM on the shared training loop. ``teacher`` may be any denoiser ``D(x, σ, labels)``."""

    ema_module = "generator"
    data = None  # data-free
    product = "student.safetensors"
    lr_options = {"generator": "lr_g", "fake": "lr_fake"}

    def __init__(self, cfg: SIMConfig, teacher: nn.Module | None = None, generator: nn.Module | None = None,
                 fake: nn.Module | None = None, shape=None, num_classes=None, fused: bool = False):
        self.cfg = cfg
        self.teacher = (teacher if teacher is not None else load_teacher(cfg.teacher)).eval().requires_grad_(False)
        meta = getattr(self.teacher, "meta", {})
        self.shape = tuple(shape or (meta["channels"], meta["resolution"], meta["resolution"]))
        self.num_classes = meta.get("num_classes", 0) if num_classes is None else num_classes
        # Neither copy has label dropout (y must compare the two scores for the same class); an imported teacher's
        # dropout acts only in each copy's own update (losses(), as SiD's loop does).
        gen = generator if generator is not None else OneStepGenerator(copy.deepcopy(self.teacher), cfg.sigma_init)
        fake = fake if fake is not None else copy.deepcopy(self.teacher)
        gen.train().requires_grad_(True)
        fake.train().requires_grad_(True)
        self.modules = {"generator": gen, "fake": fake}
        self.optimizers = {
            "fake": adam(fake.parameters(), lr=cfg.lr_fake, betas=tuple(cfg.betas), fused=fused),
            "generator": adam(gen.parameters(), lr=cfg.lr_g, betas=tuple(cfg.betas_g or cfg.betas), fused=fused),
        }
        self.grad_clip = cfg.grad_clip
        n_pix = 1
        for d in self.shape:
            n_pix *= d
        self.c = cfg.c or 1e-3 * n_pix**0.5
        self.dsm = EDMLoss()

    def frozen(self):
        """The networks read from a path that a resume must find unchanged (train.checkpoint)."""
        return {"teacher": self.teacher}

    def config(self):
        return {"method": "sim", **asdict(self.cfg)}

    def product_metadata(self) -> dict[str, str]:
        return {"getfast_student": json.dumps(student_meta(self))}

    def setup(self, wrap):
        self.teacher.to(next(self.modules["generator"].parameters()).device)
        self.G, self.fake = wrap(self.modules["generator"]), wrap(self.modules["fake"])

    def _labels(self, n, device):
        return torch.randint(0, self.num_classes, (n,), device=device) if self.num_classes else None

    def losses(self, batch, step):
        """``batch`` is the local batch size (data-free). Yields the fake-score losses, then the generator's."""
        device = next(self.modules["generator"].parameters()).device
        n = batch
        # Each network runs in train mode (its dropout on) only in its own update, as SiD's loop does
        # (mingyuanzhou/SiD, training/sid_training_loop.py: G_ddp.eval() while it makes the fake-score step's
        # samples, fake_score_ddp.eval() inside the generator loss): an imported teacher's dropout (EDM: 0.13)
        # must not turn the generator's samples or the fake score's side of y into noise.
        # (a) fake score: denoising score matching (Karras et al. 2022, Eq. 2) on detached generator samples.
        for _ in range(self.cfg.fake_steps):
            z, labels = torch.randn(n, *self.shape, device=device), self._labels(n, device)
            with torch.no_grad(), eval_mode(self.modules["generator"]):
                x_g = self.G(z, labels)
            yield {"fake": self.dsm(self.fake, x_g.float(), labels).mean()}
        # (b) generator: the updated fake score, called unwrapped (only the generator's parameters are updated).
        z, labels = torch.randn(n, *self.shape, device=device), self._labels(n, device)
        x_g = self.G(z, labels)
        sigma = sample_sigma_rho(n, device, t_max=self.cfg.t_max)
        with eval_mode(self.modules["fake"]):
            if self.cfg.loss == "sim":
                loss = sim_generator_loss(self.teacher, self.modules["fake"], x_g, sigma, self.c, labels,
                                          self.cfg.weighting)
            else:
                loss = sid_generator_loss(self.teacher, self.modules["fake"], x_g, sigma, labels, self.cfg.alpha)
        yield {"generator": loss.mean()}

    def sample_grid(self, ema, n):
        device = next(ema.parameters()).device
        z = torch.randn(n, *self.shape, device=device)
        labels = torch.arange(n, device=device) % self.num_classes if self.num_classes else None
        return ema(z, labels)
