"""GET offline distillation (Geng et al., NeurIPS 2023, arXiv 2401.08639, Sec. 3-4).

The student maps the stored noise z to the teacher's image x in one forward pass. For a GET, the
``grad_steps`` differentiable fixed-point states are all supervised with fixed-point-correction weights:
L = Σ_k γ^(n−1−k)·L1(state_k, x) (Bai et al. 2022, Eq. 9), a weighted sum, not a weighted mean, as in the
official GET training (torchdeq's ``fp_correction``, γ = 0.8, no gradient clipping); a ViT baseline has one
state. The defaults follow the official run except the learning rate (official: AdamW 1e-4 at batch 128 on
GPUs; here 2e-4 for small CPU batches) and the length of training.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass

import torch
from torch import nn

from getfast.data import PairDataset
from getfast.deq import fp_correction, list_solvers
from getfast.methods.students import GET_ARCH_FIELDS, build_get_student, student_meta
from getfast.models.get import CONFIGS as GET_MODELS, STATES, Z_INITS
from getfast.models.vit import CONFIGS as VIT_MODELS
from getfast.options import check_bool, check_choice, check_number, check_text
from getfast.train.step import adam

LOSSES = ("l1", "pseudo_huber")
GRADS = ("unrolled", "phantom", "ift")


def pair_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l1", c: float = 0.03) -> torch.Tensor:
    """Per-sample L1 (GET's choice) or pseudo-Huber √(‖·‖²/d + c²) − c (Song & Dhariwal 2023, Sec. 3.3)."""
    check_choice("loss", kind, LOSSES)
    diff = (pred.float() - target.float()).flatten(1)
    if kind == "l1":
        return diff.abs().mean(1)
    return (diff.pow(2).mean(1) + c * c).sqrt() - c


@dataclass
class GETDistillConfig:
    """GET offline distillation on noise/image pairs (Geng et al. 2023)."""

    pairs: str = "pairs"          # pair folder written by `getfast make-pairs`
    model: str = "GET-N/4"        # GET-* student or ViT-* baseline
    cond: bool = False            # class-conditional student (pairs must hold labels)
    loss: str = "l1"              # l1 (GET) | pseudo_huber
    huber_c: float = 0.03         # pseudo-Huber c (per-pixel scale)
    gamma: float = 0.8            # fixed-point correction weight base (GET: 0.8; the loss is a weighted sum)
    lr: float = 2e-4              # AdamW learning rate (official GET: 1e-4 at batch 128)
    weight_decay: float = 0.0     # AdamW weight decay (official GET: 0)
    grad_clip: float = 0.0        # max gradient norm (0: off, as official GET)
    solver: str = ""              # GET: DEQ solver ("" keeps the model's default, fixed_point)
    grad: str = ""                # GET: unrolled | phantom | ift ("" keeps GET's default: unrolled)
    grad_steps: int = 0           # GET: differentiable steps (0 keeps the default: 6)
    eval_iters: int = 0           # GET: solver iterations at sampling (0 keeps the default: 6)
    train_solver_iters: int = 0   # GET --grad phantom: solver iterations without gradient first (>= 1)
    tau: float = 0.0              # GET: damping of the differentiable steps, in (0, 1] (0 keeps the default: 1)
    z_init: str = ""              # GET: fixed-point start, noise | zeros | input ("" keeps GET's default: noise)
    state: str = ""               # GET: raw (the paper) | normalized (iterate the LayerNorm'd state, whose fixed point exists)

    def __post_init__(self):
        check_text("pairs", self.pairs, "a folder of pairs (getfast make-pairs)")
        check_choice("model", self.model, [*GET_MODELS, *VIT_MODELS])
        check_bool("cond", self.cond)
        check_choice("loss", self.loss, LOSSES)
        check_number("huber_c", self.huber_c, lo=0)
        check_number("gamma", self.gamma, lo=0, lo_open=True)
        check_number("lr", self.lr, lo=0, lo_open=True)
        check_number("weight_decay", self.weight_decay, lo=0)
        check_number("grad_clip", self.grad_clip, lo=0)
        if self.solver:
            check_choice("solver", self.solver, list_solvers())
        if self.grad:
            check_choice("grad", self.grad, GRADS)
        for name in ("grad_steps", "eval_iters", "train_solver_iters"):
            check_number(name, getattr(self, name), lo=0, integer=True)
        check_number("tau", self.tau, lo=0, hi=1)
        if self.z_init:
            check_choice("z_init", self.z_init, Z_INITS)
        if self.state:
            check_choice("state", self.state, STATES)
        get_only = [k for k in GET_ARCH_FIELDS if getattr(self, k)]
        if not self.model.startswith("GET") and get_only:
            raise ValueError(f"{', '.join('--' + k.replace('_', '-') for k in get_only)} apply to GET models only, "
                             f"not {self.model}")
        if self.model.startswith("GET"):  # the GET config checks how they combine (e.g. phantom needs a solve)
            dataclasses.replace(GET_MODELS[self.model], **{k: getattr(self, k) for k in get_only})


def build_student(cfg: GETDistillConfig, resolution: int, channels: int, num_classes: int) -> nn.Module:
    return build_get_student(cfg.model, resolution, channels, num_classes, asdict(cfg))


class GETDistillMethod:
    """Offline regression of noise → teacher image on stored pairs, on the shared training loop."""

    ema_module = "student"
    product = "student.safetensors"
    lr_options = {"student": "lr"}
    data_location_options = ("pairs",)  # a resume accepts the same pair set (by fingerprint) at another path

    def __init__(self, cfg: GETDistillConfig, data=None, fused: bool = False):
        self.cfg = cfg
        self.data = data if data is not None else PairDataset(cfg.pairs)
        self.shape = tuple(self.data.shape)
        self.num_classes = self.data.num_classes if cfg.cond else 0
        if cfg.cond and not self.num_classes:
            raise ValueError(f"--cond needs pairs with class labels; {cfg.pairs} has none")
        student = build_student(cfg, self.shape[-1], self.shape[0], self.num_classes)
        self.modules = {"student": student}
        self.optimizers = {"student": adam(student.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                           decoupled=True, fused=fused)}
        self.grad_clip = cfg.grad_clip

    def config(self):
        return {"method": "get", **asdict(self.cfg)}

    def data_fingerprint(self) -> dict | None:
        """The pair set's identity, checked on ``--resume`` (None for in-memory data without one)."""
        fp = getattr(self.data, "fingerprint", None)
        return fp() if fp is not None else None

    def product_metadata(self) -> dict[str, str]:
        return {"getfast_student": json.dumps(student_meta(self))}

    def setup(self, wrap):
        self.student = wrap(self.modules["student"])

    def losses(self, batch, step):
        noise, image, labels = batch
        states = self.student(noise, labels if self.num_classes else None)
        # Σ_k γ^(n−1−k)·loss(state_k, x) per sample (Bai et al. 2022, Eq. 9; unnormalised, as official GET);
        # a ViT's single output is the one state.
        seq = [states] if torch.is_tensor(states) else states
        loss = fp_correction(pair_loss, seq, image, self.cfg.loss, self.cfg.huber_c, gamma=self.cfg.gamma).mean()
        final = states[-1] if isinstance(states, (list, tuple)) else states
        out = {"student": loss, "l1_last": (final.detach() - image).abs().mean()}
        record = getattr(self.modules["student"], "ift_record", None)
        if record and "converged" in record:  # the previous step's IFT backward solve (grad="ift")
            missed = (~record.pop("converged")).float().mean()
            out["ift_unconverged"] = missed  # fraction of samples whose backward solve hit ift_max_iter
            self._ift_missed = missed if self._ift_missed is None else self._ift_missed + missed
        return out

    _ift_missed = None  # running sum of ift_unconverged (device tensor: read only at log time)
    _ift_warned = False

    def pop_warnings(self) -> list[str]:
        """Messages the loop writes to the log once (read at log time, so the step itself never syncs)."""
        if self._ift_warned or self._ift_missed is None or not float(self._ift_missed) > 0:
            return []
        self._ift_warned = True
        cfg = self.modules["student"].config
        return [f"--grad ift: the backward solve w = Jᵀw + v did not reach tol {cfg.ift_tol} within "
                f"{cfg.ift_max_iter} iterations for some samples; their gradients are inexact (the equilibrium "
                f"map is close to non-contractive). Consider --state normalized or --grad unrolled"]

    def sample_grid(self, ema, n):
        idx = torch.arange(min(n, len(self.data)))
        noise, _, labels = self.data.batch(idx)
        device = next(ema.parameters()).device
        return ema(noise.to(device), labels.to(device) if self.num_classes and labels is not None else None)
