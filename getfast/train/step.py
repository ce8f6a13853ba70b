"""One optimizer update of the loop: backward into each optimizer's own parameters, clipping, the step, the
finite check (one host sync per log line or checkpoint), the LR warm-up and the EMA of the product."""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping

import torch
from torch import nn

from getfast.io import save_grid
from getfast.limits import check_fits
from getfast.options import check_number, flag


class DivergenceError(ValueError):
    """Training produced a non-finite loss or gradient; the message names the step and the likely option."""


def trainable(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters an optimizer updates (those with ``requires_grad``)."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


def adam(params, *, fused: bool = False, decoupled: bool = False, **kwargs) -> torch.optim.Optimizer:
    """Adam (Kingma & Ba 2015), or AdamW when ``decoupled`` (Loshchilov & Hutter 2019), as every method builds it.

    ``fused`` builds it with ``fused=True``: one kernel per step for all parameters (CPU and CUDA), the same
    update up to float rounding; the CLI asks for it with ``--compile``. Otherwise ``fused`` is left to torch
    (``None``: its foreach kernels on CUDA), since an explicit ``fused=False`` would turn foreach off too.
    """
    cls = torch.optim.AdamW if decoupled else torch.optim.Adam
    return cls(params, fused=True if fused else None, **kwargs)


def phases(out):
    """A method's ``losses`` result as an iterator of dicts (a single dict is one phase)."""
    if isinstance(out, Mapping):
        return iter((out,))
    return iter(out)


def set_lr(method, nimg: int, warmup_kimg: float) -> None:
    """Linear LR warm-up over ``warmup_kimg`` thousand samples from each param group's ``base_lr``."""
    ramp = min(1.0, nimg / max(warmup_kimg * 1000, 1e-8)) if warmup_kimg else 1.0
    for opt in method.optimizers.values():
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"] * ramp


class EMA:
    """Exponential moving average with EDM's half-life ramp-up (Karras et al. 2022, Appendix F)."""

    def __init__(self, module: nn.Module):
        self.module = copy.deepcopy(module).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, source: nn.Module, nimg: int, batch: int, halflife_kimg: float, rampup: float):
        halflife = halflife_kimg * 1000
        if rampup:
            halflife = min(halflife, nimg * rampup)
        beta = 0.5 ** (batch / max(halflife, 1e-8))
        for p_ema, p in zip(self.module.parameters(), source.parameters()):
            p_ema.lerp_(p.detach().to(p_ema.dtype), 1 - beta)
        for b_ema, b in zip(self.module.buffers(), source.buffers()):
            b_ema.copy_(b)


class Updater:
    """Backward, clipping and the optimizer step for each loss a method hands over; collects what is logged.

    Log keys: a loss is logged as ``loss`` when the method has one optimizer, as ``loss_<optimizer>`` when it
    has several; other (detached) scalars under their own names. Sums stay on the device until a log line.
    """

    def __init__(self, method, device):
        self.method = method
        self.params = {k: trainable(o) for k, o in method.optimizers.items()}
        self.single = len(method.optimizers) == 1
        clip = getattr(method, "grad_clip", 0.0) or 0.0
        self.clip = float(check_number("grad_clip", clip, lo=0))
        self.device = device
        self.first_bad = {k: torch.full((), -1, dtype=torch.long, device=device) for k in method.optimizers}
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, int] = {}

    def key(self, name: str) -> str:
        return "loss" if self.single else f"loss_{name}"

    def _add(self, key, value):
        v = value.detach().float().mean()
        self.sums[key] = self.sums[key] + v if key in self.sums else v
        self.counts[key] = self.counts.get(key, 0) + 1

    def apply(self, phase: Mapping, step: int):
        if not isinstance(phase, Mapping):
            raise TypeError(f"{type(self.method).__name__}.losses must give dicts {{optimizer name: loss}}, "
                            f"got {type(phase).__name__}")
        updates = []
        for k, v in phase.items():
            if k in self.method.optimizers:
                if not torch.is_tensor(v) or v.numel() != 1:
                    raise ValueError(f"{type(self.method).__name__}.losses: the loss for optimizer {k!r} must be a "
                                     f"scalar tensor")
                updates.append((k, v))
            elif torch.is_tensor(v) and v.requires_grad:
                raise ValueError(f"{type(self.method).__name__}.losses gave {k!r} with a gradient but there is no "
                                 f"optimizer of that name (optimizers: {sorted(self.method.optimizers)})")
            else:
                self._add(k, torch.as_tensor(v, device=self.device))
        for i, (name, loss) in enumerate(updates):
            opt, params = self.method.optimizers[name], self.params[name]
            opt.zero_grad(set_to_none=True)
            loss.reshape(()).backward(inputs=params, retain_graph=i < len(updates) - 1)
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros((), device=self.device)
            if self.clip > 0:
                torch.nn.utils.clip_grads_with_norm_(params, self.clip, norm)
            opt.step()
            opt.zero_grad(set_to_none=True)  # no gradient outlives its step (memory, and the next phase's check)
            ok = torch.isfinite(loss.detach()).all() & torch.isfinite(norm)
            bad = self.first_bad[name]
            self.first_bad[name] = torch.where(ok | (bad >= 0), bad, torch.full_like(bad, step))
            self._add(self.key(name), loss)

    def check(self):
        """One host sync: raise :class:`DivergenceError` if any loss or gradient so far was not finite."""
        names = list(self.first_bad)
        steps = torch.stack([self.first_bad[k] for k in names]).tolist() if names else []
        bad = [(s, k) for s, k in zip(steps, names) if s >= 0]
        if bad:
            s, k = min(bad)
            raise DivergenceError(_divergence_message(self.method, k, s, self.clip))

    def take(self) -> dict[str, float]:
        """The logged means since the last call (one host sync), after the finite check."""
        self.check()
        keys = sorted(self.sums)
        vals = torch.stack([self.sums[k] for k in keys]).tolist() if keys else []
        out = {k: v / self.counts[k] for k, v in zip(keys, vals)}
        self.sums, self.counts = {}, {}
        return out


def _divergence_message(method, name: str, step: int, clip: float) -> str:
    opt = method.optimizers[name]
    lr = opt.param_groups[0].get("base_lr", opt.param_groups[0]["lr"])
    field = getattr(method, "lr_options", {}).get(name, "lr")
    clip_txt = f"--grad-clip is {clip:g}" if clip > 0 else "gradient clipping is off (--grad-clip 0)"
    return (f"training diverged at step {step + 1}: the loss of {name!r} or its gradient is not finite. "
            f"The likely cause is the learning rate {flag(field)} = {lr:g}: lower it; {clip_txt}. "
            "Nothing of this step was checkpointed; --resume continues from the last good checkpoint")


# Bytes a training step keeps per image element at the least (the batch, its noise and the network's stored
# activations for backward, float32): a lower bound, so a refusal is certain and a pass is not a promise.
_STEP_BYTES_PER_ELEMENT = 4 * 16


def check_batch_fits(method, cfg, device, world: int) -> None:
    """``ValueError`` naming --batch when one step's batch cannot fit in ``device``'s free memory."""
    shape = getattr(method, "shape", None)
    meta = getattr(method, "meta", None)
    if shape is None and isinstance(meta, dict) and "channels" in meta and "resolution" in meta:
        shape = (meta["channels"], meta["resolution"], meta["resolution"])
    if not shape:
        return
    need = cfg.batch // world * math.prod(int(v) for v in shape) * _STEP_BYTES_PER_ELEMENT
    check_fits(need, f"{flag('batch')} {cfg.batch}: one training step of {cfg.batch // world} images of "
                     f"{'x'.join(map(str, shape))} per process", device, hint="lower --batch")


def write_grid(method, ema, path, n):
    """The EMA's sample grid as a PNG, from a fixed seed, leaving the training RNG stream untouched."""
    rng = torch.get_rng_state()  # grids must not change the training noise stream
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            imgs = method.sample_grid(ema.module, n)
        save_grid(imgs, path, nrow=int(math.sqrt(n)))
    finally:
        torch.set_rng_state(rng)
