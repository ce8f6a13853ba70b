"""The one training loop behind the teacher and every distillation method.

A method (the :class:`Method` protocol) declares what it trains; the loop performs every update:

  ``modules``      dict name -> nn.Module that it trains (checkpointed; DDP-wrapped by ``setup``)
  ``optimizers``   dict name -> torch.optim.Optimizer (each param group may carry ``base_lr``)
  ``grad_clip``    max gradient norm per optimizer step (0: off)
  ``ema_module``   name of the module whose exponential moving average is the product
  ``data``         an object with ``__len__`` and ``batch(idx) -> tuple`` or None (data-free)
  ``setup(wrap)``  called once; ``wrap(module)`` returns the DDP-wrapped module to use in ``losses``
  ``losses(batch, step)``  the forward pass: a dict ``{optimizer name: scalar loss}`` (plus detached scalars
                   that are only logged), or an iterator of such dicts for methods whose updates are
                   sequential (the loop steps the optimizers of one dict before the method computes the
                   next, e.g. a fake-score step before the generator step, or a generator step before the
                   discriminator step). ``batch`` is ``data.batch(idx)`` on this rank, or the local batch
                   size when data is None.
  ``sample_grid(ema, n) -> Tensor``  (optional) images in [-1, 1] for the periodic PNG grid
  ``config() -> dict``  what must match for a checkpoint to be resumed
  ``data_fingerprint() -> dict | None`` (optional) what identifies stored training data; must match on resume
  ``product``, ``product_metadata()``  file name and safetensors metadata of the exported EMA weights
  ``lr_options`` (optional) dict optimizer name -> config field of its learning rate, for error messages

The loop owns the update: autocast (bf16 on GPU) around the forward only; then, for each loss, backward into
that optimizer's own parameters (``backward(inputs=...)``, so a frozen network in the graph of another
network's loss gets no gradient), gradient clipping, the optimizer step; EMA, LR warm-up, seeding per rank,
the data order (a seeded permutation per epoch, so the position is one integer), checkpoints and exact
resume, a lock on the run folder, a JSONL log, sample grids, and the export of the product (:func:`fit`,
:func:`export_product`). A loss or gradient that is not finite stops training with an error naming the step.
``LoopConfig.compile`` compiles the step with ``torch.compile`` and switches Adam/AdamW to their fused kernels;
``LoopConfig.tf32`` (default on) lets CUDA run float32 matmuls and convolutions on TF32 tensor cores.

Before ``setup`` the loop sets ``method.run_info`` (a :class:`RunInfo`: seed, global batch, rank, world); a
method may draw per-sample noise from :func:`sample_generators` (the teacher does), which makes its draws
independent of the number of processes and of resumes.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import fcntl
import inspect
import json
import math
import os
import random
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from getfast.io import atomic_write_bytes, save_grid
from getfast.train.checkpoint import (CheckpointError, latest_good_checkpoint, list_checkpoints, load_checkpoint,
                                      prune_checkpoints, save_checkpoint)


# --- option checks shared by every config ------------------------------------------------------------

def _flag(name: str) -> str:
    return f"{name} (--{name.replace('_', '-')})"


def check_number(name: str, value, *, lo=None, hi=None, lo_open: bool = False, hi_open: bool = False,
                 integer: bool = False):
    """``value`` if it is a finite number (an int when ``integer``) within the bounds, else ``ValueError``
    naming the option. Bounds are inclusive unless ``lo_open``/``hi_open``."""
    kind = "an integer" if integer else "a finite number"
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or (not integer and not math.isfinite(value)):
        raise ValueError(f"{_flag(name)} must be {kind}, got {value!r}")
    bounds = []
    if lo is not None:
        bounds.append(f"> {lo}" if lo_open else f">= {lo}")
        if value < lo or (lo_open and value == lo):
            raise ValueError(f"{_flag(name)} must be {kind} {' and '.join(bounds)}, got {value!r}")
    if hi is not None:
        bounds.append(f"< {hi}" if hi_open else f"<= {hi}")
        if value > hi or (hi_open and value == hi):
            raise ValueError(f"{_flag(name)} must be {kind} {' and '.join(bounds)}, got {value!r}")
    return value


def check_choice(name: str, value, choices: Iterable):
    choices = list(choices)
    if value not in choices:
        raise ValueError(f"{_flag(name)} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def check_bool(name: str, value, optional: bool = False):
    if isinstance(value, bool) or (optional and value is None):
        return value
    allowed = "true, false or None (automatic)" if optional else "true or false"
    raise ValueError(f"{_flag(name)} must be {allowed}, got {value!r}")


def check_betas(name: str, value) -> tuple:
    """Adam's (β1, β2), each in [0, 1)."""
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise ValueError(f"{_flag(name)} must be two numbers (β1 β2), got {value!r}")
    for b in value:
        check_number(name, b, lo=0, hi=1, hi_open=True)
    return tuple(float(b) for b in value)


# --- configuration -----------------------------------------------------------------------------------

@dataclass
class LoopConfig:
    out: str = "runs/train"            # run folder: checkpoints, log.jsonl, grids, the exported weights
    kimg: float = 100.0                 # training length, thousands of (global) samples
    batch: int = 64                     # global batch size (split across ranks)
    seed: int = 0                       # base seed; rank r uses seed + r for its noise
    warmup_kimg: float = 2.0            # linear LR warm-up length
    ema_halflife_kimg: float = 500.0    # EMA half-life (EDM), capped by the ramp-up below
    ema_rampup: float = 0.05            # half-life <= this fraction of images seen so far (EDM; 0: no cap)
    log_every: int = 50                 # steps between log lines
    ckpt_every: int = 500               # steps between checkpoints
    keep_ckpts: int = 2                 # checkpoints kept on disk (older good ones survive a bad write)
    grid_every: int = 2000              # steps between sample grids (0: only at the end)
    grid_n: int = 64                    # images per grid (0: no sample grids)
    resume: bool = False                # continue from the newest good checkpoint in ``out``
    overwrite: bool = False             # delete an earlier run's checkpoints, log and grids in ``out`` first
    compile: bool = False               # torch.compile the step (forward + loss + backward) and use fused Adam/AdamW
    bf16: bool | None = None            # autocast the forward pass to bf16; default: on for CUDA, off for CPU
    tf32: bool = True                   # CUDA: TF32 tensor cores for float32 matmuls and convolutions
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    progress: bool = True               # show a progress bar on rank 0

    def __post_init__(self):
        if not isinstance(self.out, (str, os.PathLike)) or not str(self.out):
            raise ValueError(f"{_flag('out')} must be a folder path, got {self.out!r}")
        for name in ("batch", "log_every", "ckpt_every", "keep_ckpts"):
            check_number(name, getattr(self, name), lo=1, integer=True)
        check_number("grid_n", self.grid_n, lo=0, integer=True)
        check_number("seed", self.seed, lo=0, integer=True)
        check_number("grid_every", self.grid_every, lo=0, integer=True)
        check_number("kimg", self.kimg, lo=0, lo_open=True)
        for name in ("warmup_kimg", "ema_halflife_kimg", "ema_rampup"):
            check_number(name, getattr(self, name), lo=0)
        for name in ("resume", "overwrite", "compile", "tf32", "progress"):
            check_bool(name, getattr(self, name))
        check_bool("bf16", self.bf16, optional=True)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
        if not isinstance(self.device, str) or not (self.device in ("auto", "cpu", "cuda")
                                                    or (self.device.startswith("cuda:") and self.device[5:].isdigit())):
            raise ValueError(f"{_flag('device')} must be auto, cpu, cuda or cuda:N, got {self.device!r}")

    def total_steps(self) -> int:
        """Optimiser steps for ``kimg`` thousand samples (rounded so 0.57 kimg is 570 samples, not 570.0000001)."""
        return math.ceil(round(self.kimg * 1000, 6) / self.batch)


class Method(Protocol):
    """What :func:`train` needs of a method (see the module docstring)."""

    modules: dict[str, nn.Module]
    optimizers: dict[str, torch.optim.Optimizer]
    grad_clip: float
    ema_module: str
    data: Any
    product: str

    def config(self) -> dict: ...
    def setup(self, wrap) -> None: ...
    def losses(self, batch, step: int) -> Mapping[str, torch.Tensor] | Iterable[Mapping[str, torch.Tensor]]: ...
    def product_metadata(self) -> dict[str, str]: ...


class DivergenceError(ValueError):
    """Training produced a non-finite loss or gradient; the message names the step and the likely option."""


@dataclass(frozen=True)
class RunInfo:
    seed: int           # LoopConfig.seed
    batch: int          # global batch
    rank: int
    world: int

    @property
    def local_batch(self) -> int:
        return self.batch // self.world


def _mix64(x: int) -> int:
    # SplitMix64 finaliser: decorrelates nearby integers (seeds of neighbouring samples).
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def sample_generators(info: RunInfo, step: int, stream: int = 0) -> list[torch.Generator]:
    """One CPU generator per local sample of ``step``, seeded by (seed, stream, global sample position).

    Rank r's samples are positions ``step·batch + r·local_batch + j`` of the global batch, so a 2-process
    run draws exactly the noise of the 1-process run's corresponding rows, and a resumed run the noise of
    an uninterrupted one. ``stream`` separates independent uses within one step.
    """
    first = step * info.batch + info.rank * info.local_batch
    base = _mix64(_mix64(info.seed) ^ (stream * 0x9E3779B97F4A7C15))
    return [torch.Generator().manual_seed(_mix64(base + first + j) >> 1) for j in range(info.local_batch)]


def dist_info():
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def init_distributed(device: str) -> None:
    """Join the process group when launched by torchrun (RANK/WORLD_SIZE set)."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ and not dist.is_initialized():
        backend = "nccl" if device == "cuda" else "gloo"
        dist.init_process_group(backend=backend)
        if device == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device}: no CUDA device is available on this machine (use --device cpu)")
    if device == "cuda":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": {"version": random.getstate()[0], "state": list(random.getstate()[1]),
                       "gauss": random.getstate()[2]}}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = s["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def data_indices(n: int, batch: int, position: int, seed: int) -> torch.Tensor:
    """The global batch starting at ``position`` of an endless stream of seeded per-epoch permutations."""
    parts, pos, got = [], position, 0
    while got < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        part = perm[offset:offset + min(batch - got, n - offset)]
        parts.append(part)
        pos, got = pos + len(part), got + len(part)
    return torch.cat(parts)


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


def _unwrap(m: nn.Module) -> nn.Module:
    m = getattr(m, "module", m)  # DDP
    return getattr(m, "_orig_mod", m)  # torch.compile


def trainable(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    """The parameters an optimizer updates (those with ``requires_grad``)."""
    return [p for g in optimizer.param_groups for p in g["params"] if p.requires_grad]


# --- the run folder: lock, refusal to mix runs, overwrite --------------------------------------------

LOCK_NAME = ".getfast.lock"
_held_locks: dict[str, list] = {}  # folder -> [file object, depth]: re-entrant within one process


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold an exclusive lock on the run folder ``out`` (``flock`` on ``out/.getfast.lock``; released when the
    process exits, also by SIGKILL). A second run into the same folder is refused instead of racing."""
    key = str(Path(out).resolve())
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    f = open(Path(out) / LOCK_NAME, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{out} is in use by another training run ({holder}); wait for it to finish or "
                         "choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _held_locks[key] = [f, 1]
    try:
        yield
    finally:
        _held_locks.pop(key, None)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _run_files(out: Path, product: str | None) -> list[Path]:
    """Files a previous run of the loop left in ``out`` (never anything else)."""
    if not out.is_dir():
        return []
    found = list_checkpoints(out)
    for p in out.iterdir():
        if p.name in ("log.jsonl", "config.json") or (p.name.startswith("grid-") and p.suffix == ".png") \
                or (p.name.startswith(".ckpt-") and ".tmp" in p.name) or (product and p.name == product):
            found.append(p)
    return found


def _prepare_out(out: Path, cfg: LoopConfig, product: str | None) -> None:
    """Refuse to mix a fresh run with an earlier one in ``out``; with ``overwrite``, delete the earlier one."""
    earlier = [p for p in _run_files(out, product) if p.name != product]
    if cfg.overwrite:
        for p in _run_files(out, product):
            p.unlink(missing_ok=True)
    elif earlier and not cfg.resume:
        what = "checkpoints" if list_checkpoints(out) else "a log"
        raise ValueError(f"{out} already holds a training run ({what}); pass --resume to continue it, or "
                         "--overwrite to replace it, or choose a new --out")


def _agree(fn, rank: int, world: int):
    """Run ``fn`` on rank 0 and raise its ``ValueError``/``OSError`` on every rank (so no rank waits forever)."""
    msg = None
    if rank == 0:
        try:
            fn()
        except (ValueError, OSError) as e:
            if world == 1:
                raise
            msg = (type(e), str(e))
    if world > 1:
        box = [msg]
        dist.broadcast_object_list(box, src=0)
        msg = box[0]
    if msg is not None:
        raise msg[0](msg[1])


# --- the log -----------------------------------------------------------------------------------------

class _Logger:
    def __init__(self, path: Path, enabled: bool, resume_step: int | None = None):
        self.enabled = enabled
        if enabled and resume_step is not None and path.exists():
            # Drop records written after the checkpoint we resume from (they are about to be redone) and any
            # line torn by a kill, so the log reads as one uninterrupted run.
            kept = []
            for line in path.read_text().splitlines():
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict) and rec.get("step", 0) <= resume_step:
                    kept.append(line + "\n")
            atomic_write_bytes(path, "".join(kept).encode())
        self.f = open(path, "a") if enabled else None

    def write(self, record: dict):
        if self.enabled:
            self.f.write(json.dumps(record, allow_nan=False) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


# --- one step ----------------------------------------------------------------------------------------

class _Updater:
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
            f"The likely cause is the learning rate {_flag(field)} = {lr:g}: lower it; {clip_txt}. "
            "Nothing of this step was checkpointed; --resume continues from the last good checkpoint")


def check_method(method) -> None:
    """``ValueError`` naming what a method lacks of the :class:`Method` protocol (before anything is built)."""
    missing = [a for a in ("modules", "optimizers", "ema_module", "data", "config", "setup", "losses")
               if not hasattr(method, a)]
    if missing:
        raise ValueError(f"{type(method).__name__} is not a training method: it lacks {', '.join(missing)} "
                         "(see getfast.train.loop.Method)")
    if method.ema_module not in method.modules:
        raise ValueError(f"{type(method).__name__}.ema_module {method.ema_module!r} is not one of its modules "
                         f"{sorted(method.modules)}")


def _phases(out):
    """A method's ``losses`` result as an iterator of dicts (a single dict is one phase)."""
    if isinstance(out, Mapping):
        return iter((out,))
    return iter(out)


# --- the loop ----------------------------------------------------------------------------------------

def train(method, cfg: LoopConfig) -> dict:
    """Run ``method`` for ``cfg.kimg`` thousand samples in the run folder ``cfg.out``; returns the last log record.

    Refuses to start a fresh run in a folder that holds an earlier one (``cfg.resume`` continues it,
    ``cfg.overwrite`` deletes it) and while another run holds the folder's lock.
    """
    check_method(method)
    device = resolve_device(cfg.device)
    init_distributed(device.type)
    rank, world = dist_info()
    if cfg.batch % world:
        raise ValueError(f"batch {cfg.batch} is not divisible by the number of processes {world}")
    out = Path(cfg.out)
    with contextlib.ExitStack() as held:
        def prepare():  # rank 0 only: lock the folder, then refuse or clear an earlier run in it
            held.enter_context(run_lock(out))
            _prepare_out(out, cfg, getattr(method, "product", None))
        _agree(prepare, rank, world)
        with _tf32(device, cfg.tf32):
            return _train(method, cfg, device, rank, world, out)


@contextlib.contextmanager
def _tf32(device: torch.device, on: bool):
    """TF32 tensor cores for float32 matmuls/convolutions on CUDA (about 8x the float32 rate on A100/H100, with
    a 10-bit mantissa in the products); the previous settings come back afterwards."""
    if device.type != "cuda":
        yield
        return
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = bool(on)
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _train(method, cfg: LoopConfig, device, rank: int, world: int, out: Path) -> dict:
    local_batch = cfg.batch // world
    seed_everything(cfg.seed + rank)
    bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16

    for m in method.modules.values():
        m.to(device)
    if cfg.compile:
        for opt in method.optimizers.values():
            use_fused_kernel(opt)
    ema = EMA(method.modules[method.ema_module])
    step, nimg, resumed_from = 0, 0, None
    if cfg.resume:
        path, state = latest_good_checkpoint(out, log=print if rank == 0 else (lambda *_: None))
        if state is not None:
            _restore(method, ema, state, rank, cfg, path)
            step, nimg, resumed_from = state["loop"]["step"], state["loop"]["nimg"], str(path)
        elif rank == 0:
            print(f"no checkpoint to resume in {out}: starting from scratch")
    method.run_info = RunInfo(seed=cfg.seed, batch=cfg.batch, rank=rank, world=world)

    # --compile: a method whose losses are one dict is compiled as a whole (forward and loss in one graph, whose
    # backward AOTAutograd compiles with it); a method with sequential updates has its modules compiled instead.
    whole_step = cfg.compile and not inspect.isgeneratorfunction(type(method).losses)

    def wrap(module: nn.Module) -> nn.Module:
        if cfg.compile and not whole_step:
            module = torch.compile(module)
        if world > 1 and any(p.requires_grad for p in module.parameters()):
            module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        return module

    method.setup(wrap)
    losses_fn = torch.compile(method.losses) if whole_step else method.losses
    updater = _Updater(method, device)
    total_steps = cfg.total_steps()
    logger = _Logger(out / "log.jsonl", rank == 0, resume_step=step if cfg.resume else None)
    if rank == 0:
        atomic_write_bytes(out / "config.json", json.dumps({"loop": asdict(cfg), "method": method.config()},
                                                           indent=2, default=str).encode())
        if resumed_from:
            print(f"resumed from {resumed_from} at step {step} ({nimg / 1000:.1f} kimg)")
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t_start, last_t, last_nimg, record = time.time(), time.time(), nimg, {}
    try:
        while step < total_steps:
            _set_lr(method, nimg, cfg.warmup_kimg)
            batch = local_batch  # data-free methods get the local batch size
            if method.data is not None:
                idx = data_indices(len(method.data), cfg.batch, nimg, cfg.seed)
                batch = method.data.batch(idx[rank * local_batch:(rank + 1) * local_batch])
                batch = tuple(b.to(device) if torch.is_tensor(b) else b for b in batch)
            with autocast:  # the forward pass only: backward and the optimizer steps run outside autocast
                phases = _phases(losses_fn(batch, step))
            while True:
                with autocast:
                    phase = next(phases, None)
                if phase is None:
                    break
                updater.apply(phase, step)
            step += 1
            nimg += cfg.batch
            ema.update(_unwrap(method.modules[method.ema_module]), nimg, cfg.batch, cfg.ema_halflife_kimg,
                       cfg.ema_rampup)
            if step % cfg.log_every == 0 or step == total_steps:
                means = updater.take()
                if world > 1 and means:  # log the mean over all ranks, not rank 0's share of the batch
                    keys = sorted(means)
                    t = torch.tensor([means[k] for k in keys], dtype=torch.float64, device=device)
                    dist.all_reduce(t)
                    means = dict(zip(keys, (t / world).tolist()))
                now = time.time()
                record = {"step": step, "kimg": nimg / 1000, "time": now - t_start,
                          "img_per_s": (nimg - last_nimg) / max(now - last_t, 1e-9), **means}
                logger.write(record)
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k not in ("step", "time")},
                                    refresh=False)
                last_t, last_nimg = now, nimg
            if bar is not None:
                bar.update(1)
            if step % cfg.ckpt_every == 0 or step == total_steps:
                updater.check()
                _save(method, ema, out, step, nimg, cfg, rank)
            if rank == 0 and cfg.grid_n and hasattr(method, "sample_grid") and \
                    ((cfg.grid_every and step % cfg.grid_every == 0) or step == total_steps):
                _grid(method, ema, out / f"grid-{step:07d}.png", cfg.grid_n)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
    return record


def use_fused_kernel(opt: torch.optim.Optimizer) -> bool:
    """Switch an Adam/AdamW optimizer to its fused kernel (one kernel per step for all parameters, the
    ``fused=True`` of its constructor; same update up to float rounding). Other optimizers, and parameters on a
    device without the kernel, are left as they are. Returns whether the kernel is used."""
    if type(opt) not in (torch.optim.Adam, torch.optim.AdamW):
        return False
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
        devices = _get_fused_kernels_supported_devices()
    except ImportError:  # the helper is private to torch.optim: without it, trust only CUDA's kernel
        devices = ["cuda"]
    params = [p for g in opt.param_groups for p in g["params"]]
    if any(g["differentiable"] for g in opt.param_groups) or \
            not all(p.device.type in devices and p.is_floating_point() for p in params):
        return False
    for g in opt.param_groups:
        g["fused"], g["foreach"] = True, False
    opt.defaults["fused"], opt.defaults["foreach"] = True, False
    opt._step_supports_amp_scaling = True  # what the constructor sets for fused=True
    return True


def _set_lr(method, nimg, warmup_kimg):
    ramp = min(1.0, nimg / max(warmup_kimg * 1000, 1e-8)) if warmup_kimg else 1.0
    for opt in method.optimizers.values():
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"] * ramp


def _grid(method, ema, path, n):
    rng = torch.get_rng_state()  # grids must not change the training noise stream
    torch.manual_seed(0)
    try:
        with torch.no_grad():
            imgs = method.sample_grid(ema.module, n)
        save_grid(imgs, path, nrow=int(math.sqrt(n)))
    finally:
        torch.set_rng_state(rng)


def _save(method, ema, out, step, nimg, cfg, rank):
    _, world = dist_info()
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        state = {"format": "getfast-train-v1", "config": json.loads(json.dumps(method.config(), default=str)),
                 "loop": {"step": step, "nimg": nimg, "batch": cfg.batch, "seed": cfg.seed, "world": world},
                 "modules": {k: _unwrap(m).state_dict() for k, m in method.modules.items()},
                 "optimizers": {k: o.state_dict() for k, o in method.optimizers.items()},
                 "ema": ema.module.state_dict(), "rng": rngs}
        if hasattr(method, "data_fingerprint"):
            state["data"] = method.data_fingerprint()
        save_checkpoint(out / f"ckpt-{step:09d}.pt", state)
        prune_checkpoints(out, cfg.keep_ckpts, current_step=step)
    if world > 1:
        dist.barrier()


def _restore(method, ema, state, rank, cfg, path):
    want = json.loads(json.dumps(method.config(), default=str))
    if state.get("format") != "getfast-train-v1":
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r} is not getfast-train-v1")
    # An option added to the method after the checkpoint was written is compatible when this run leaves it
    # at its default (the checkpoint's run behaved as the default does); anything else must match exactly.
    added = _added_at_default(method, set(want) - set(state["config"]))
    if state["config"] != {k: v for k, v in want.items() if k not in added}:
        diff = {k: (state["config"].get(k), want.get(k)) for k in sorted(set(want) | set(state["config"]))
                if k not in added and state["config"].get(k) != want.get(k)}
        raise CheckpointError(f"{path} was written by a different configuration, refusing to resume: "
                              f"{diff} (checkpoint, now)")
    # The data order and the per-sample noise depend on these: continuing with others is not a resume.
    loop_diff = {k: (state["loop"].get(k), getattr(cfg, k)) for k in ("seed", "batch")
                 if state["loop"].get(k) != getattr(cfg, k)}
    if loop_diff:
        raise CheckpointError(f"{path} was written with different loop settings, refusing to resume: "
                              f"{loop_diff} (checkpoint, now)")
    # Stored training data (GET's pairs) can grow or be regenerated under the same path: a run continued on
    # other data is not a resume. Checkpoints written before this check carry no fingerprint and are trusted.
    if state.get("data") is not None and hasattr(method, "data_fingerprint"):
        now = method.data_fingerprint()
        if now != state["data"]:
            raise CheckpointError(f"{path} was trained on different data, refusing to resume: {state['data']} "
                                  f"(checkpoint) vs {now} (now); train on the original data, or start a new run")
    rngs = state["rng"]
    if len(rngs) != dist_info()[1]:
        raise CheckpointError(f"{path} holds RNG states of {len(rngs)} processes, this run has {dist_info()[1]}")
    for k, m in method.modules.items():
        _unwrap(m).load_state_dict(state["modules"][k])
    for k, o in method.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    ema.module.load_state_dict(state["ema"])
    set_rng_state(rngs[rank])


def _added_at_default(method, missing: set[str]) -> set[str]:
    """The options in ``missing`` that ``method.cfg`` (a dataclass) holds at their declared defaults."""
    cfg = getattr(method, "cfg", None)
    if not missing or cfg is None or not dataclasses.is_dataclass(cfg):
        return set()
    out = set()
    for f in dataclasses.fields(cfg):
        if f.name not in missing:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if getattr(cfg, f.name) == default:
            out.add(f.name)
    return out


def load_ema(path, map_location="cpu") -> tuple[dict, dict]:
    """(EMA state_dict, method config) of a training checkpoint file or the newest good one in a folder."""
    p = Path(path)
    if p.is_dir():
        found, state = latest_good_checkpoint(p)
        if state is None:
            raise CheckpointError(f"no readable checkpoint in {p}")
    else:
        state = load_checkpoint(p, map_location)
    return state["ema"], state["config"]


# --- the product -------------------------------------------------------------------------------------

def save_weights(module_or_state, path, metadata: dict[str, str]) -> Path:
    """Write a module's weights (or a state dict) as safetensors with ``metadata``, atomically, mode 0644:
    exported weights are meant to be shared, like any other file the user makes."""
    from safetensors.torch import save
    state = module_or_state.state_dict() if isinstance(module_or_state, nn.Module) else module_or_state
    state = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    return atomic_write_bytes(path, save(state, metadata=metadata), mode=0o644)


def export_product(method, cfg: LoopConfig) -> Path | None:
    """Load the EMA of the newest good checkpoint in ``cfg.out`` into the method's product module and save it as
    ``cfg.out/<method.product>`` with ``method.product_metadata()``. Rank 0 writes; returns the path there,
    None on the other ranks."""
    rank, world = dist_info()
    path = Path(cfg.out) / method.product
    if rank == 0:
        with run_lock(Path(cfg.out)):
            state, _ = load_ema(cfg.out)
            product = _unwrap(method.modules[method.ema_module])
            product.load_state_dict(state)
            save_weights(product, path, method.product_metadata())
    if world > 1:
        dist.barrier()
    return path if rank == 0 else None


def fit(method, cfg: LoopConfig) -> Path | None:
    """:func:`train` then :func:`export_product`, holding the run folder's lock throughout, so no other run can
    start in ``cfg.out`` between the last checkpoint and the export. Returns the exported file (rank 0)."""
    init_distributed(resolve_device(cfg.device).type)
    rank, world = dist_info()
    with contextlib.ExitStack() as held:
        _agree(lambda: held.enter_context(run_lock(Path(cfg.out))), rank, world)
        train(method, cfg)
        return export_product(method, cfg)
