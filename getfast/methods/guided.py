"""Guided distillation (Meng et al., "On Distillation of Guided Diffusion Models", CVPR 2023, arXiv 2210.03142).

Stage 1 (their Sec. 3.1, Eq. 4): a single student x̂_η(z_t, w), conditioned on the guidance weight w by a
Fourier embedding (``UNetConfig.w_cond``, zero-initialised so it starts as the teacher), is regressed onto
the classifier-free-guided teacher
    x̂^w(z_t) = (1 + w)·x̂_c(z_t) − w·x̂_u(z_t),     w ~ U[w_min, w_max],  t ~ U[t_min, 1],
with z_t = α_t x + σ_t ε (cosine VP schedule of ``getfast.diffusion.samplers``) and weight max(SNR, 1).

Stage 2 (Sec. 3.2; progressive distillation, Salimans & Ho 2022, Algorithm 2): a student that takes N DDIM
steps matches two DDIM steps of its teacher (the previous student, at 2N steps) in one. With t = i/N,
t′ = t − 0.5/N, t″ = t − 1/N and the teacher's two steps z → z′ → z″, the target is
    x̃ = (z″ − (σ″/σ)·z) / (α″ − (σ″/σ)·α),     loss weight max(SNR(t), 1) = max(α²/σ², 1)
(the x for which one DDIM step from z lands on z″). N halves every round, down to ``pd_end`` steps.

The paper starts progressive distillation from 1024 (pixel space) or 256 (latent space) DDIM steps; the default
here is 256 (``pd_start``), halved to 1 step in 8 rounds.

``GuidedMethod`` is one stage on the shared loop; ``GuidedMethod.run_stages`` runs stage 1 into
``out/stage1`` and the rounds into ``out/pd-N`` (each resumable, each exported as ``student.safetensors``),
and copies the last student to ``out/student.safetensors``. Sampling: ``ddim(student, z, N, labels, w=w)``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from getfast.data import load_dataset
from getfast.diffusion import ddim, ddim_step, vp_alpha_sigma, vp_denoise
from getfast.io import atomic_write_bytes
from getfast.methods.students import load_student
from getfast.models import build_denoiser
from getfast.teacher import load as load_teacher
from getfast.options import check_choice, check_number, check_text
from getfast.train.distributed import dist_info
from getfast.train.loop import fit
from getfast.train.step import adam


def _b(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(-1, 1, 1, 1)


def pd_target(teacher, z, t, steps: int, class_labels=None, w=None) -> torch.Tensor:
    """x̃ of progressive distillation (Salimans & Ho 2022, Alg. 2): two DDIM steps t → t−½/N → t−1/N of ``teacher``
    (called with the guidance weight ``w``), solved for the x that one student step from t must predict."""
    kw = {} if w is None else {"w": w}
    t1, t2 = t - 0.5 / steps, t - 1.0 / steps
    x_hat = vp_denoise(teacher, z, t, class_labels, **kw)
    z1 = ddim_step(x_hat, z, t, t1)
    x_hat1 = vp_denoise(teacher, z1, t1, class_labels, **kw)
    z2 = ddim_step(x_hat1, z1, t1, t2)
    a, s = (_b(v) for v in vp_alpha_sigma(t))
    a2, s2 = (_b(v) for v in vp_alpha_sigma(t2))
    ratio = s2 / s
    return (z2 - ratio * z) / (a2 - ratio * a)


def snr_weight(t: torch.Tensor) -> torch.Tensor:
    """max(SNR(t), 1) with SNR = α_t²/σ_t² ("truncated SNR" weighting, Salimans & Ho 2022, Sec. 4)."""
    a, s = vp_alpha_sigma(t)
    return (a**2 / s.clamp(min=1e-8) ** 2).clamp(min=1.0)


@dataclass
class GuidedConfig:
    """Guided distillation: w-conditioned student, then progressive distillation (Meng et al. 2023)."""

    teacher: str = "fashion-mnist"   # class-conditional teacher trained with label dropout
    data: str = ""                   # images x for z_t = α x + σ ε ("" = the teacher's training data)
    stage: str = "all"               # all: stage 1 then halve steps to pd_end | cfg: stage 1 only | pd: one round
    w_min: float = 0.0               # guidance weight w ~ U[w_min, w_max]
    w_max: float = 4.0               # (w = 0 is the conditional model, no guidance)
    lr: float = 1e-4                 # stage 1 Adam learning rate
    lr_pd: float = 5e-5              # progressive rounds' Adam learning rate
    pd_kimg: float = 0.0             # length of each progressive round, kimg (0: same as --kimg)
    pd_start: int = 256              # DDIM steps of the stage-1 student = the first round's teacher (paper: 1024/256)
    pd_end: int = 1                  # stop once the student takes this many steps
    steps: int = 0                   # stage pd: this round's student steps (its teacher takes twice as many)
    init: str = ""                   # stage pd: the w-conditioned student to start from (run folder or file)
    t_min: float = 1e-3              # stage 1: t ~ U[t_min, 1]
    grid_w: float = 2.0              # guidance weight of the periodic sample grids
    grad_clip: float = 1.0           # max gradient norm (0: off)

    def __post_init__(self):
        check_text("teacher", self.teacher, "a teacher (file, folder or import)")
        check_choice("stage", self.stage, ("all", "cfg", "pd"))
        check_number("w_min", self.w_min)
        check_number("w_max", self.w_max)
        if not self.w_min <= self.w_max:
            raise ValueError(f"w_min ({self.w_min}) must be <= w_max ({self.w_max})")
        check_number("lr", self.lr, lo=0, lo_open=True)
        check_number("lr_pd", self.lr_pd, lo=0, lo_open=True)
        check_number("pd_kimg", self.pd_kimg, lo=0)
        check_number("pd_start", self.pd_start, lo=1, integer=True)
        check_number("pd_end", self.pd_end, lo=1, integer=True)
        if self.pd_start < self.pd_end or self.pd_start % self.pd_end \
                or (self.pd_start // self.pd_end) & (self.pd_start // self.pd_end - 1):
            raise ValueError(f"pd_start ({self.pd_start}) must be pd_end ({self.pd_end}) times a power of two")
        check_number("steps", self.steps, lo=0, integer=True)
        check_number("t_min", self.t_min, lo=0, hi=1, lo_open=True, hi_open=True)
        check_number("grid_w", self.grid_w)
        check_number("grad_clip", self.grad_clip, lo=0)
        if self.stage == "pd" and (self.steps < 1 or not self.init):
            raise ValueError("stage pd needs --steps (>= 1) and --init (the student to halve)")


def make_w_student(teacher: nn.Module) -> nn.Module:
    """A w-conditioned copy of an EDM teacher (UNet with ``w_cond=True``, zero-initialised w embedding): it
    starts as the teacher's conditional denoiser, i.e. guidance weight 0."""
    meta = teacher.meta
    student = build_denoiser(meta["model"], meta["resolution"], meta["channels"], meta["num_classes"],
                             **{**meta.get("overrides", {}), "w_cond": True})
    missing, unexpected = student.load_state_dict(teacher.state_dict(), strict=False)
    if unexpected or any("map_w" not in k for k in missing):
        raise ValueError(f"teacher weights do not fit its w-conditioned copy: missing {missing}, unexpected {unexpected}")
    return student


class GuidedMethod:
    """One stage of guided distillation on the shared loop (``cfg.stage`` cfg or pd).

    ``teacher`` (stage cfg: a class-conditional denoiser accepting ``cfg_scale``; stage pd: a w-conditioned
    denoiser accepting ``w=``), ``student`` and ``data`` may be given, e.g. the analytic models of
    ``tests/toy.py``.
    """

    ema_module = "student"
    product = "student.safetensors"

    def __init__(self, cfg: GuidedConfig, teacher: nn.Module | None = None, student: nn.Module | None = None,
                 data=None, shape=None, num_classes=None, base_meta: dict | None = None, fused: bool = False):
        self.cfg = cfg
        self.stage = "cfg" if cfg.stage == "all" else cfg.stage
        self.steps = cfg.steps if self.stage == "pd" else cfg.pd_start  # the student's DDIM steps
        if teacher is None:
            if self.stage == "cfg":
                teacher = load_teacher(cfg.teacher)
            else:
                teacher = load_student(cfg.init)
                prev = teacher.meta
                if prev.get("method") != "guided":
                    raise ValueError(f"--init {cfg.init} is a {prev.get('method')!r} student, not a guided one")
                if int(prev.get("steps", 0)) != 2 * cfg.steps:
                    raise ValueError(f"--init {cfg.init} takes {prev.get('steps')} steps; a round to {cfg.steps} "
                                     f"steps needs a {2 * cfg.steps}-step teacher")
        self.teacher = teacher.eval().requires_grad_(False)
        meta = getattr(teacher, "meta", {})
        # The original diffusion teacher's metadata (what rebuilds the student's architecture).
        self.base_meta = base_meta if base_meta is not None else (meta.get("teacher_meta", meta) if meta else {})
        bm = self.base_meta
        if num_classes is None:
            num_classes = bm.get("num_classes", 0)
        if not num_classes:
            raise ValueError("guided distillation needs a class-conditional teacher (train it with --cond)")
        if self.stage == "cfg" and not bm.get("label_dropout", 0.0) and student is None:
            raise ValueError("the teacher was trained without label dropout: it has no unconditional branch for CFG")
        self.num_classes = num_classes
        if data is None:
            name = cfg.data or bm.get("data")
            if not name:
                raise ValueError("guided distillation needs images for z_t: pass --data")
            data = load_dataset(name, resolution=bm.get("resolution"))
        self.data = data
        self.shape = tuple(shape or (bm["channels"], bm["resolution"], bm["resolution"]))
        if student is None:
            student = make_w_student(teacher) if self.stage == "cfg" else copy.deepcopy(teacher)
        student.train().requires_grad_(True)
        self.modules = {"student": student}
        lr = cfg.lr if self.stage == "cfg" else cfg.lr_pd
        self.optimizers = {"student": adam(student.parameters(), lr=lr, betas=(0.9, 0.999), fused=fused)}
        self.grad_clip = cfg.grad_clip
        self.lr_options = {"student": "lr" if self.stage == "cfg" else "lr_pd"}

    def frozen(self):
        """The networks read from a path that a resume must find unchanged (train.checkpoint): stage 1's EDM
        teacher, or the previous round's student a round learns from (--init)."""
        return {"teacher" if self.stage == "cfg" else "init": self.teacher}

    def config(self):
        return {"method": "guided", **asdict(self.cfg), "stage": self.stage}

    def product_metadata(self) -> dict[str, str]:
        return {"getfast_student": json.dumps(self.student_meta())}

    def setup(self, wrap):
        self.teacher.to(next(self.modules["student"].parameters()).device)
        self.S = wrap(self.modules["student"])

    def _labels(self, labels, n, device):
        if labels is None:  # unlabelled images: draw classes uniformly
            return torch.randint(0, self.num_classes, (n,), device=device)
        return labels

    def losses(self, batch, step):
        """Stage 1: regression onto the guided teacher (Meng et al. 2023, Eq. 4); stage 2: onto the two-step
        target x̃ (Salimans & Ho 2022, Alg. 2); both weighted by max(SNR, 1)."""
        x, labels = batch
        n, dev = x.shape[0], x.device
        x = x.float()
        labels = self._labels(labels, n, dev)
        w = self.cfg.w_min + (self.cfg.w_max - self.cfg.w_min) * torch.rand(n, device=dev)
        if self.stage == "cfg":
            t = self.cfg.t_min + (1 - self.cfg.t_min) * torch.rand(n, device=dev)
        else:
            t = torch.randint(1, self.steps + 1, (n,), device=dev).float() / self.steps
        a, s = (_b(v) for v in vp_alpha_sigma(t))
        z = a * x + s * torch.randn_like(x)
        with torch.no_grad():
            if self.stage == "cfg":
                target = vp_denoise(self.teacher, z, t, labels, cfg_scale=_b(w))
            else:
                target = pd_target(self.teacher, z, t, self.steps, labels, w=w)
        pred = vp_denoise(self.S, z, t, labels, w=w)
        err = (pred.float() - target.float()).square().flatten(1).mean(1)
        return {"student": (snr_weight(t) * err).mean(), "mse_x": err.detach().mean()}

    def sample_grid(self, ema, n):
        """DDIM with the student's own step count at guidance weight ``grid_w``."""
        device = next(ema.parameters()).device
        z = torch.randn(n, *self.shape, device=device)
        labels = torch.arange(n, device=device) % self.num_classes
        w = torch.full((n,), float(self.cfg.grid_w), device=device)
        return ddim(ema, z, self.steps, labels, w=w).clamp(-1, 1)

    def student_meta(self) -> dict:
        """``save_student`` metadata: the original teacher's architecture, this student's steps and w range."""
        return {"method": "guided", "config": self.config(), "shape": list(self.shape),
                "num_classes": int(self.num_classes), "teacher_meta": self.base_meta, "steps": int(self.steps),
                "w_range": [self.cfg.w_min, self.cfg.w_max], "sampler": "ddim"}

    # --- the multi-stage run ------------------------------------------------------------------------
    @classmethod
    def run_stages(cls, cfg: GuidedConfig, loop, log=print, teacher: nn.Module | None = None,
                   student: nn.Module | None = None, **given) -> list[Path]:
        """Stage 1 then progressive rounds pd_start/2, …, pd_end (``cfg.stage == 'all'``; ``cfg`` or ``pd``: that
        stage alone, in ``loop.out``). Each stage trains and exports its EMA student with :func:`fit` into its own
        folder, resumes with ``--resume`` (a stage whose ``student.safetensors`` was written by the same
        configuration and whose checkpoint reached the stage's kimg is done: its exported weights are reused; a
        stage trained further refuses to continue the rounds it taught before) and teaches the next round. Returns the exported
        files; the last one is also copied to ``out/student.safetensors``.

        ``teacher``/``student`` (and ``data``, ``shape``, ``num_classes`` in ``given``) replace stage 1's
        networks, e.g. analytic models; every round then starts from the previous round's product in memory.
        """
        out = Path(loop.out)
        if os.environ.get("RANK", "0") != "0":
            log = _quiet
        if cfg.stage != "all":
            method = cls(cfg, teacher=teacher, student=student, fused=loop.compile, **given)
            return [cls._run_one(method, loop, out, log)[0]]
        plan = [("stage1", {"stage": "cfg"}, loop.kimg)]
        n = cfg.pd_start // 2
        while n >= cfg.pd_end:
            plan.append((f"pd-{n}", {"stage": "pd", "steps": n}, cfg.pd_kimg or loop.kimg))
            n //= 2
        files, prev, prev_method, advanced = [], None, None, False
        for name, changes, kimg in plan:
            if prev is not None:
                changes["init"] = str(prev)
            stage_cfg = dataclasses.replace(cfg, **changes)
            stage_loop = dataclasses.replace(loop, out=str(out / name), kimg=kimg)
            if prev_method is None:
                method = cls(stage_cfg, teacher=teacher, student=student, fused=loop.compile, **given)
            else:  # the previous round's EMA student teaches this round, and this round's student starts as it
                product = prev_method.modules[prev_method.ema_module]
                method = cls(stage_cfg, teacher=copy.deepcopy(product), student=copy.deepcopy(product),
                             data=prev_method.data, shape=prev_method.shape, num_classes=prev_method.num_classes,
                             base_meta=prev_method.base_meta, fused=loop.compile)
            if advanced and _trained_steps(out / name) > 0:
                # This round's run was distilled from the earlier round that just trained further: continuing
                # it would silently keep a student of the old teacher.
                raise ValueError(f"{out / name} was distilled from the earlier round that this run just trained "
                                 f"further; delete {out / name} (and the rounds after it) or use a new --out")
            prev, trained = cls._run_one(method, stage_loop, out / name, log)
            advanced = advanced or trained
            files.append(prev)
            prev_method = method
        if dist_info()[0] == 0:
            final = out / "student.safetensors"
            atomic_write_bytes(final, prev.read_bytes(), mode=0o644)
            log(f"guided students: {', '.join(str(f) for f in files)}; final ({plan[-1][0]}): {final}")
        _barrier()
        return files

    @classmethod
    def _run_one(cls, method: GuidedMethod, loop, out: Path, log) -> tuple[Path, bool]:
        """Train one stage (or reuse its finished student); returns its student file and whether it trained."""
        path = out / "student.safetensors"
        finished = _trained_steps(out) >= loop.total_steps()  # reads the newest checkpoint once
        if loop.resume and path.exists():
            want = json.loads(json.dumps(method.config(), default=str))
            if _export_config(path) == want and finished:
                log(f"{out}: already trained, skipping")
                from getfast.weights import read_weights
                method.modules[method.ema_module].load_state_dict(read_weights(path)[0])  # checksum verified
                return path, False
            log(f"{out}: its student was trained with another configuration; training this stage again")
        fit(method, loop)
        log(f"student weights ({method.steps} DDIM steps): {path}")
        return path, not finished


def _trained_steps(out: Path) -> int:
    """Optimiser steps of the newest good checkpoint in ``out`` (0 without one): a stage whose student exists is
    done only when it reached this run's --kimg, so ``--resume --kimg`` with a larger value trains it further."""
    from getfast.train.checkpoint import latest_good_checkpoint
    _, state = latest_good_checkpoint(out, log=_quiet)
    return int(state["loop"]["step"]) if state is not None else 0


def _export_config(path: Path):
    from safetensors import safe_open
    try:
        with safe_open(str(path), "pt") as f:
            return json.loads((f.metadata() or {}).get("getfast_student", "{}")).get("config")
    except Exception:  # unreadable export: train the stage again
        return None


def _quiet(*_):
    pass


def _barrier():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
