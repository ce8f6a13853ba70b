"""GET offline distillation (Geng et al., NeurIPS 2023, arXiv 2401.08639, Sec. 3-4).

The student maps the stored noise z to the teacher's image x in one forward pass. For a GET,
the ``grad_steps`` unrolled fixed-point states from the noise start are all supervised with
fixed-point-correction weights γ^(n−1−k) (Bai et al. 2022, Eq. 9); a ViT baseline has one state.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from getfast.train.loop import clip_and_step


def pair_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1", c: float = 0.03) -> torch.Tensor:
    """Per-sample L1 (GET's choice) or pseudo-Huber √(‖·‖²/d + c²) − c (Song & Dhariwal 2023)."""
    diff = (pred.float() - target.float()).flatten(1)
    if kind == "l1":
        return diff.abs().mean(1)
    if kind == "pseudo_huber":
        return (diff.pow(2).mean(1) + c * c).sqrt() - c
    raise ValueError(f"loss must be 'l1' or 'pseudo_huber', got {kind!r}")


def supervised_loss(states, target, kind="l1", gamma=0.8, c=0.03) -> torch.Tensor:
    """Σ_k γ^(n−1−k)·loss(state_k, x) per sample, normalised by Σ_k γ^(n−1−k)."""
    from getfast.deq import fp_correction_weights
    if torch.is_tensor(states):
        states = [states]
    w = fp_correction_weights(len(states), gamma)
    total = sum(wk * pair_loss(s, target, kind, c) for wk, s in zip(w, states))
    return total / sum(w)


@dataclass
class GETDistillConfig:
    """GET offline distillation on noise/image pairs (Geng et al. 2023)."""

    pairs: str = "pairs"          # pair folder written by `getfast make-pairs`
    model: str = "GET-N/4"        # GET-* student or ViT-* baseline
    cond: bool = False            # class-conditional student (pairs must hold labels)
    loss: str = "l1"              # l1 (GET) | pseudo_huber
    huber_c: float = 0.03         # pseudo-Huber c (per-pixel scale)
    gamma: float = 0.8            # fixed-point correction weight base
    lr: float = 2e-4              # AdamW learning rate (GET: 1e-4 at batch 128 on GPUs)
    weight_decay: float = 0.0     # AdamW weight decay
    grad_clip: float = 1.0        # max gradient norm (0: off)
    solver: str = ""              # GET: DEQ solver at eval ("" keeps the model's default)
    grad: str = ""                # GET: unrolled | phantom | ift ("" keeps the default: unrolled)
    grad_steps: int = 0           # GET: differentiable steps (0 keeps the default: 6)
    eval_iters: int = 0           # GET: solver iterations at sampling (0 keeps the default: 6)


def build_student(cfg: GETDistillConfig, resolution: int, channels: int, num_classes: int) -> nn.Module:
    from getfast.models import create
    overrides = {}
    if cfg.model.startswith("GET"):
        for k in ("solver", "grad", "grad_steps", "eval_iters"):
            if getattr(cfg, k):
                overrides[k] = getattr(cfg, k)
    elif any(getattr(cfg, k) for k in ("solver", "grad", "grad_steps", "eval_iters")):
        raise ValueError(f"solver/grad/grad_steps/eval_iters apply to GET models only, not {cfg.model}")
    return create(cfg.model, img_resolution=resolution, in_channels=channels, num_classes=num_classes, **overrides)


class GETDistillMethod:
    """Offline regression of noise → teacher image on stored pairs, on the shared training loop."""

    ema_module = "student"

    def __init__(self, cfg: GETDistillConfig, data=None):
        from getfast.data import PairDataset
        self.cfg = cfg
        self.data = data if data is not None else PairDataset(cfg.pairs)
        self.shape = tuple(self.data.shape)
        self.num_classes = self.data.num_classes if cfg.cond else 0
        if cfg.cond and not self.num_classes:
            raise ValueError(f"--cond needs pairs with class labels; {cfg.pairs} has none")
        student = build_student(cfg, self.shape[-1], self.shape[0], self.num_classes)
        self.modules = {"student": student}
        self.optimizers = {"student": torch.optim.AdamW(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)}

    def config(self):
        return {"method": "get", **asdict(self.cfg)}

    def setup(self, wrap):
        self.student = wrap(self.modules["student"])

    def step(self, batch, step):
        noise, image, labels = batch
        states = self.student(noise, labels if self.num_classes else None)
        loss = supervised_loss(states, image, self.cfg.loss, self.cfg.gamma, self.cfg.huber_c).mean()
        self.optimizers["student"].zero_grad(set_to_none=True)
        loss.backward()
        clip_and_step(self.optimizers["student"], self.modules["student"].parameters(), self.cfg.grad_clip or None)
        final = states[-1] if isinstance(states, (list, tuple)) else states
        return {"loss": loss.detach(), "l1_last": (final.detach() - image).abs().mean()}

    def sample_grid(self, ema, n):
        idx = torch.arange(min(n, len(self.data)))
        noise, _, labels = self.data.batch(idx)
        device = next(ema.parameters()).device
        return ema(noise.to(device), labels.to(device) if self.num_classes and labels is not None else None)
