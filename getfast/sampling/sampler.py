"""One entry point to sample any checkpoint: ``load(ckpt, ...) -> Sampler``.

A ``Sampler`` maps noise ``z`` (B, C, H, W) and class labels to images in [-1, 1]:
* a teacher (EDM denoiser) with its multi-step sampler: Heun (Karras et al. 2022, Alg. 2; 2·steps − 1
  network evaluations), Euler, or DDIM (Song et al. 2021), optionally with classifier-free guidance
  (Ho & Salimans 2022, Eq. 6);
* a one-step student (GET, ViT, or a SIM/GDD generator): one network evaluation;
* a guided-distillation student (Meng et al. 2023): its own number of DDIM steps at guidance weight w.

Options that do not apply to a checkpoint are refused, never ignored: ``sampler``/``steps``/``cfg_scale``
for a one-step student, ``cfg_scale`` for a teacher without classes. ``None`` means "the model's own"
(Heun with 18 steps for a teacher, the student's trained step count for a guided student).

On CUDA the sampler runs under bf16 autocast by default and, with ``compile=True``, replays the whole call
from a captured CUDA graph per batch shape (:mod:`getfast.sampling.graphs`); on the CPU ``compile=True``
applies ``torch.compile`` to the network. Every call checks its result: a NaN or infinite image, or a
fixed-point solve that met NaN/Inf, is a :class:`NonFiniteError` naming the checkpoint, never a noise grid.
"""
from __future__ import annotations

import contextlib
import dataclasses
import inspect
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from getfast.options import check_choice, check_number, flag
from getfast.sampling.graphs import GraphCache
from getfast.train.distributed import resolve_device

__all__ = ["Sampler", "NonFiniteError", "load", "resolve_device", "SAMPLERS",
           "TEACHER_DEFAULT_STEPS"]

SAMPLERS = ("heun", "euler", "ddim")
TEACHER_DEFAULT_STEPS = 18   # EDM's Heun schedule: 35 network evaluations


class NonFiniteError(ValueError):
    """Sampling produced NaN or infinite values."""


@dataclass(eq=False)
class Sampler:
    """A loaded checkpoint ready to sample: ``images = sampler(z, labels)``.

    ``shape`` (C, H, W) of one sample; ``num_classes`` (0: unconditional); ``evaluations``: network
    evaluations per sample (NFE; a guided call counts once); ``kind``: "teacher", "one-step" or "guided".
    """

    net: nn.Module
    kind: str
    shape: tuple[int, int, int]
    num_classes: int
    evaluations: int
    source: str
    device: torch.device
    method: str = ""              # the student's distillation method, or "teacher"
    sampler: str | None = None    # multi-step sampler (teacher: heun | euler | ddim; guided: ddim)
    steps: int | None = None
    cfg_scale: float | None = None
    bf16: bool = False
    compile: bool = False
    check_finite: bool = True
    _body: Callable = field(default=None, repr=False)
    graphs: GraphCache | None = field(default=None, repr=False)

    @property
    def nfe(self) -> int:
        return self.evaluations

    @property
    def description(self) -> str:
        if self.kind == "teacher":
            g = "" if self.cfg_scale is None else f", cfg_scale {self.cfg_scale:g}"
            return f"teacher ({self.sampler}, {self.steps} steps, {self.evaluations} evaluations{g})"
        if self.kind == "guided":
            return f"guided student (ddim, {self.steps} steps, w={self.cfg_scale:g})"
        model = getattr(self.net, "meta", {}).get("config", {}).get("model")
        return f"one-step {self.method} student" + (f" ({model})" if model else "")

    def _check_inputs(self, z, labels):
        if not torch.is_tensor(z) or z.ndim != 4 or tuple(z.shape[1:]) != tuple(self.shape):
            got = tuple(z.shape) if torch.is_tensor(z) else type(z).__name__
            raise ValueError(f"z must be (B, {', '.join(map(str, self.shape))}), got {got}")
        if z.shape[0] == 0:
            raise ValueError("z must hold at least one sample")
        if not z.is_floating_point():
            raise ValueError(f"z must be floating point, got {z.dtype}")
        if labels is None:
            return
        if not self.num_classes:
            raise ValueError(f"{self.source} is unconditional: labels must be None")
        if not torch.is_tensor(labels) or labels.shape != (z.shape[0],) or labels.is_floating_point():
            got = f"{labels.dtype} {tuple(labels.shape)}" if torch.is_tensor(labels) else type(labels).__name__
            raise ValueError(f"labels must be integer class indices of shape ({z.shape[0]},), got {got}")
        if labels.device.type == "cpu" and labels.numel():  # on a GPU this would be a host sync per call
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                raise ValueError(f"labels must be in [0, {self.num_classes}), got values in [{lo}, {hi}]")

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        self._check_inputs(z, labels)
        z = z.to(self.device, torch.float32)
        labels = None if labels is None else labels.to(self.device, torch.int64)
        with torch.no_grad():
            if self.graphs is not None:
                x, bad = self.graphs(z, labels)
            else:
                x, bad = self._body(z, labels)
        if self.check_finite and bool(bad.any()):
            raise NonFiniteError(self._nonfinite_message(int(bad.sum()), z.shape[0]))
        return x

    def _nonfinite_message(self, k: int, b: int) -> str:
        cause = "the network's output overflowed"
        if self.kind == "one-step" and self.method == "get":
            cause = "the fixed-point solve met NaN/Inf (the equilibrium iteration diverged)"
        if self.cfg_scale is not None:
            cause += f" (guidance weight {self.cfg_scale:g})"
        if self.bf16:
            cause += "; bf16 autocast is on, try bf16=False (--no-bf16)"
        return f"{self.source}: sampling produced NaN/Inf in {k} of {b} samples: {cause}"


def _nonfinite(x: torch.Tensor) -> torch.Tensor:
    return ~torch.isfinite(x).flatten(1).all(1)


def _autocast(device: torch.device, bf16: bool):
    # cache_enabled=False: cached weight casts cannot be shared between a CUDA-graph capture and its replays.
    if bf16:
        return torch.autocast(device.type, dtype=torch.bfloat16, cache_enabled=False)
    return contextlib.nullcontext()


def _check_weights(net: nn.Module, source: str) -> None:
    tensors = [(k, v) for k, v in net.state_dict().items() if v.is_floating_point()]
    if not tensors:
        return
    ok = torch.stack([torch.isfinite(v).all() for _, v in tensors])
    if not bool(ok.all()):
        bad = [k for (k, _), good in zip(tensors, ok.tolist()) if not good]
        more = f" and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise NonFiniteError(f"{source}: weights hold NaN/Inf ({', '.join(bad[:3])}{more}); this checkpoint cannot "
                             f"produce images (did its training diverge?)")


def _run_folder_method(p: Path) -> str | None:
    """The method of a training run folder or checkpoint file (its config), or None if it is not one."""
    cfg = p / "config.json" if p.is_dir() else None
    if cfg is not None and cfg.is_file():
        try:
            obj = json.loads(cfg.read_text())
        except ValueError as e:
            raise ValueError(f"{cfg}: not valid JSON ({e}); a run folder's config.json is written by getfast "
                             f"train-teacher/distill") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{cfg}: must be a JSON object (a run's config, or a diffusers UNet config), got "
                             f"{type(obj).__name__} {json.dumps(obj)[:40]}")
        method = obj.get("method")  # a run's {"loop": ..., "method": {...}}; a diffusers config has none
        return method.get("method") if isinstance(method, dict) else None
    if p.is_file() and p.suffix == ".pt":
        from getfast.train.checkpoint import CheckpointError, load_checkpoint
        try:
            return (load_checkpoint(p).get("config") or {}).get("method")
        except CheckpointError:
            return None
    return None


def _check_options(sampler, steps, cfg_scale):
    """None for each is the model's own; otherwise a known sampler, a step count >= 1, a finite scale."""
    if sampler is not None:
        check_choice("sampler", sampler, SAMPLERS)
    if steps is not None:
        check_number("steps", steps, lo=1, integer=True)
    if cfg_scale is not None:
        check_number("cfg_scale", cfg_scale)


def _not_for(what: str, value, source: str, kind: str) -> ValueError:
    return ValueError(f"{flag(what)} = {value!r} does not apply to {source}: it is {kind}")


def load(ckpt: str = "fashion-mnist", *, sampler: str | None = None, steps: int | None = None,
         cfg_scale: float | None = None, device: str | torch.device = "cpu", compile: bool = False,
         bf16: bool | None = None, check_finite: bool = True, graph_backend=None, log=None) -> Sampler:
    """Load a teacher or student checkpoint as a :class:`Sampler`.

    ``ckpt``: an embedded teacher name, a teacher or student ``.safetensors``, or a run folder (a student run's
    ``student.safetensors``; a teacher run's newest checkpoint EMA). ``bf16``: autocast the network to bf16
    (None: on for CUDA). ``compile``: CUDA-graph replay on CUDA, ``torch.compile`` on the CPU.
    ``graph_backend`` replaces the CUDA capture (tests).
    """
    _check_options(sampler, steps, cfg_scale)
    device = resolve_device(device)
    bf16 = device.type == "cuda" if bf16 is None else bool(bf16)
    from getfast.methods import is_student, load_student
    source = str(ckpt)
    p = Path(ckpt)
    if is_student(ckpt):
        net = load_student(ckpt, device=device)
        meta = net.meta
    else:
        method = _run_folder_method(p)
        if method not in (None, "teacher"):
            where = p if p.is_dir() else p.parent
            raise ValueError(f"{ckpt}: a '{method}' training run {'folder' if p.is_dir() else 'checkpoint'} "
                             f"without an exported student.safetensors; a run exports its student when training "
                             f"ends (finish it with: getfast distill {method} --resume --out {where})")
        from getfast.teacher import load as load_teacher
        net = load_teacher(ckpt, device=device)
        meta = None
    teacher_meta = getattr(net, "meta", {})
    _check_weights(net, source)
    if bf16 and any(t.dtype == torch.float64 for t in net.parameters()):
        bf16 = False  # a float64 network is meant to run in float64
    if compile and device.type == "cpu":
        net = torch.compile(net)

    if meta is None:
        m = teacher_meta
        shape = (int(m["channels"]), int(m["resolution"]), int(m["resolution"]))
        K = int(m.get("num_classes", 0))
        if cfg_scale is not None and not K:
            raise _not_for("cfg_scale", cfg_scale, source, "an unconditional teacher (guidance needs classes)")
        sampler = sampler or "heun"
        steps = steps or TEACHER_DEFAULT_STEPS
        from getfast.diffusion import nfe, sample
        kw = {} if cfg_scale is None else {"cfg_scale": float(cfg_scale)}

        def run(z, labels):
            with _autocast(device, bf16):
                x = sample(net, z, sampler, steps=steps, class_labels=labels, **kw)
            x = x.float()
            return x, _nonfinite(x)
        s = Sampler(net, "teacher", shape, K, nfe(sampler, steps), source, device, "teacher", sampler, steps,
                    None if cfg_scale is None else float(cfg_scale), bf16, compile, check_finite, run)
    elif meta.get("sampler") == "ddim":
        if sampler not in (None, "ddim"):
            raise _not_for("sampler", sampler, source, "a guided student sampled with DDIM")
        shape, K = tuple(int(v) for v in meta["shape"]), int(meta["num_classes"])
        steps = steps or int(meta.get("steps", 1))
        w = float(cfg_scale or 0.0)
        lo, hi = meta.get("w_range", [-math.inf, math.inf])
        if not lo <= w <= hi:
            raise ValueError(f"{flag('cfg_scale')} = {w:g} is outside the guidance range [{lo:g}, {hi:g}] that "
                             f"{source} was trained on")
        from getfast.diffusion import ddim

        def run(z, labels):
            with _autocast(device, bf16):
                x = ddim(net, z, steps, labels, w=torch.full((z.shape[0],), w, device=z.device))
            x = x.float()
            return x, _nonfinite(x)
        s = Sampler(net, "guided", shape, K, steps, source, device, "guided", "ddim", steps, w, bf16, compile,
                    check_finite, run)
    else:
        method = str(meta.get("method", "student"))
        kind = f"a one-step {method} student"
        for name, value in (("sampler", sampler), ("steps", steps), ("cfg_scale", cfg_scale)):
            if value is not None:
                raise _not_for(name, value, source, kind)
        shape, K = tuple(int(v) for v in meta["shape"]), int(meta["num_classes"])
        solver_stats = "return_info" in inspect.signature(_unwrap(net).forward).parameters
        if solver_stats and compile and device.type == "cuda":
            _zero_sync_solver(_unwrap(net))

        def run(z, labels):
            with _autocast(device, bf16):
                if solver_stats:
                    x, info = net(z, labels, return_info=True)
                else:
                    x, info = net(z, labels), {}
            x = x.float()
            bad = _nonfinite(x)
            stats = info.get("stats") or {}
            if "nonfinite" in stats:  # the solver froze a sample at its start after NaN/Inf: finite, but noise
                bad = bad | stats["nonfinite"].reshape(-1).to(bad.device)
            return x, bad
        s = Sampler(net, "one-step", shape, K, int(meta.get("nfe", 1)), source, device, method, None, None, None,
                    bf16, compile, check_finite, run)
    if compile and device.type == "cuda":
        s.graphs = GraphCache(s._body, backend=graph_backend, log=log)
    elif graph_backend is not None:  # tests exercise the graph bookkeeping on the CPU with a stand-in backend
        s.graphs = GraphCache(s._body, backend=graph_backend, log=log)
    return s


def _unwrap(net: nn.Module) -> nn.Module:
    return getattr(net, "_orig_mod", net)


def _zero_sync_solver(net: nn.Module) -> None:
    """Inside a CUDA graph the fixed-point solve must run its fixed iteration count without host reads."""
    cfg = getattr(net, "config", None)
    if cfg is not None and dataclasses.is_dataclass(cfg) and getattr(cfg, "tol", None) is not None:
        net.config = dataclasses.replace(cfg, tol=None)
