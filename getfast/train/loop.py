"""The one training loop behind the teacher and every distillation method.

A method is an object with:
  ``modules``      dict name -> nn.Module that it trains (checkpointed; DDP-wrapped by ``setup``)
  ``optimizers``   dict name -> torch.optim.Optimizer (each param group may carry ``base_lr``)
  ``ema_module``   name of the module whose exponential moving average is the product
  ``data``         an object with ``__len__`` and ``batch(idx) -> tuple`` or None (data-free)
  ``setup(wrap)``  called once; ``wrap(module)`` returns the DDP-wrapped module to use in ``step``
  ``step(batch, step) -> dict[str, Tensor]``  one optimisation step (its own backward/optimizer calls);
                   ``batch`` is ``data.batch(idx)`` on this rank, or the local batch size when data is None
  ``sample_grid(ema, n) -> Tensor``  images in [-1, 1] for the periodic PNG grid
  ``config() -> dict``  what must match for a checkpoint to be resumed

Before ``setup`` the loop sets ``method.run_info`` (a :class:`RunInfo`: seed, global batch, rank, world);
a method may use it with :func:`sample_generators` to draw its per-sample noise from the sample's global
position in the data stream, which makes the noise independent of the number of processes and of resumes.

The loop owns: seeding per rank, the data order (a seeded permutation per epoch, so the position
is one integer), LR warm-up, EMA, gradient clipping helpers, bf16 autocast on GPU, checkpoints and
exact resume, the progress bar, a JSONL log and sample grids.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import os
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from getfast.train.checkpoint import (CheckpointError, latest_good_checkpoint, load_checkpoint, prune_checkpoints,
                                     save_checkpoint)


@dataclass
class LoopConfig:
    out: str = "runs/train"            # run folder: checkpoints, log.jsonl, grids
    kimg: float = 100.0                 # training length, thousands of (global) samples
    batch: int = 64                     # global batch size (split across ranks)
    seed: int = 0                       # base seed; rank r uses seed + r for its noise
    warmup_kimg: float = 2.0            # linear LR warm-up length
    ema_halflife_kimg: float = 500.0    # EMA half-life (EDM), capped by the ramp-up below
    ema_rampup: float = 0.05            # half-life <= this fraction of images seen so far (EDM)
    log_every: int = 50                 # steps between log lines
    ckpt_every: int = 500               # steps between checkpoints
    keep_ckpts: int = 2                 # checkpoints kept on disk (older good ones survive a bad write)
    grid_every: int = 2000              # steps between sample grids (0: only at the end)
    grid_n: int = 64                    # images per grid
    resume: bool = False                # continue from the newest good checkpoint in ``out``
    compile: bool = False               # torch.compile the trained modules
    bf16: bool | None = None            # autocast to bf16; default: on for CUDA, off for CPU
    device: str = "auto"                # auto | cpu | cuda
    progress: bool = True               # show a progress bar on rank 0

    def __post_init__(self):
        for name in ("batch", "log_every", "ckpt_every", "keep_ckpts", "grid_n"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("kimg", "warmup_kimg", "ema_halflife_kimg", "ema_rampup"):
            v = float(getattr(self, name))
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v}")
        if self.kimg <= 0:
            raise ValueError(f"kimg must be > 0, got {self.kimg}")
        if self.grid_every < 0:
            raise ValueError(f"grid_every must be >= 0, got {self.grid_every}")
        if self.device not in ("auto", "cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise ValueError(f"device must be auto, cpu or cuda, got {self.device!r}")

    def total_steps(self) -> int:
        """Optimiser steps for ``kimg`` thousand samples (rounded so 0.57 kimg is 570 samples, not 570.0000001)."""
        return math.ceil(round(self.kimg * 1000, 6) / self.batch)


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


def clip_and_step(optimizer: torch.optim.Optimizer, params, max_norm: float | None) -> torch.Tensor | None:
    """Gradient clipping (if asked) then the optimizer step; NaN/Inf gradients are zeroed (EDM's guard)."""
    params = [p for p in params if p.grad is not None]
    for p in params:
        torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)
    norm = nn.utils.clip_grad_norm_(params, max_norm) if max_norm else None
    optimizer.step()
    return norm


def _unwrap(m: nn.Module) -> nn.Module:
    m = getattr(m, "module", m)  # DDP
    return getattr(m, "_orig_mod", m)  # torch.compile


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
            from getfast.train.checkpoint import atomic_write_bytes
            atomic_write_bytes(path, "".join(kept).encode())
        self.f = open(path, "a") if enabled else None

    def write(self, record: dict):
        if self.enabled:
            self.f.write(json.dumps(record) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None


def train(method, cfg: LoopConfig) -> dict:
    """Run ``method`` for ``cfg.kimg`` thousand samples; returns the final log record."""
    device = resolve_device(cfg.device)
    init_distributed(device.type)
    rank, world = dist_info()
    if cfg.batch % world:
        raise ValueError(f"batch {cfg.batch} is not divisible by the number of processes {world}")
    local_batch = cfg.batch // world
    out = Path(cfg.out)
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    seed_everything(cfg.seed + rank)
    bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16

    for m in method.modules.values():
        m.to(device)
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

    def wrap(module: nn.Module) -> nn.Module:
        if cfg.compile:
            module = torch.compile(module)
        if world > 1 and any(p.requires_grad for p in module.parameters()):
            module = nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)
        return module

    method.setup(wrap)
    total_steps = cfg.total_steps()
    logger = _Logger(out / "log.jsonl", rank == 0, resume_step=step if resumed_from else None)
    if rank == 0:
        (out / "config.json").write_text(json.dumps({"loop": asdict(cfg), "method": method.config()}, indent=2, default=str))
        if resumed_from:
            print(f"resumed from {resumed_from} at step {step} ({nimg / 1000:.1f} kimg)")
    bar = None
    if rank == 0 and cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, initial=step, unit="step", dynamic_ncols=True)

    autocast = torch.autocast(device.type, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    t_start, last_t, last_nimg, record = time.time(), time.time(), nimg, {}
    sums: dict[str, float] = {}
    n_sums = 0
    while step < total_steps:
        _set_lr(method, nimg, cfg.warmup_kimg)
        batch = local_batch  # data-free methods get the local batch size
        if method.data is not None:
            idx = data_indices(len(method.data), cfg.batch, nimg, cfg.seed)
            batch = method.data.batch(idx[rank * local_batch:(rank + 1) * local_batch])
            batch = tuple(b.to(device) if torch.is_tensor(b) else b for b in batch)
        with autocast:
            losses = method.step(batch, step)
        step += 1
        nimg += cfg.batch
        ema.update(_unwrap(method.modules[method.ema_module]), nimg, cfg.batch, cfg.ema_halflife_kimg, cfg.ema_rampup)
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + float(v.detach().float().mean())  # one sync per step, logging only
        n_sums += 1
        if step % cfg.log_every == 0 or step == total_steps:
            if world > 1 and sums:  # log the mean over all ranks, not rank 0's share of the batch
                keys = sorted(sums)
                t = torch.tensor([sums[k] for k in keys], dtype=torch.float64, device=device)
                dist.all_reduce(t)
                sums = dict(zip(keys, (t / world).tolist()))
            now = time.time()
            record = {"step": step, "kimg": nimg / 1000, "time": now - t_start,
                      "img_per_s": (nimg - last_nimg) / max(now - last_t, 1e-9),
                      **{k: v / n_sums for k, v in sums.items()}}
            logger.write(record)
            if bar is not None:
                bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k not in ("step", "time")}, refresh=False)
            last_t, last_nimg, sums, n_sums = now, nimg, {}, 0
        if bar is not None:
            bar.update(1)
        if step % cfg.ckpt_every == 0 or step == total_steps:
            _save(method, ema, out, step, nimg, cfg, rank)
        if rank == 0 and ((cfg.grid_every and step % cfg.grid_every == 0) or step == total_steps):
            _grid(method, ema, out / f"grid-{step:07d}.png", cfg.grid_n)
    if bar is not None:
        bar.close()
    logger.close()
    return record


def _set_lr(method, nimg, warmup_kimg):
    ramp = min(1.0, nimg / max(warmup_kimg * 1000, 1e-8)) if warmup_kimg else 1.0
    for opt in method.optimizers.values():
        for g in opt.param_groups:
            g.setdefault("base_lr", g["lr"])
            g["lr"] = g["base_lr"] * ramp


def _grid(method, ema, path, n):
    from getfast.metrics.grids import save_grid
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
        save_checkpoint(out / f"ckpt-{step:09d}.pt", state)
        prune_checkpoints(out, cfg.keep_ckpts, current_step=step)
    if world > 1:
        dist.barrier()


def _restore(method, ema, state, rank, cfg, path):
    want = json.loads(json.dumps(method.config(), default=str))
    if state.get("format") != "getfast-train-v1":
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r} is not getfast-train-v1")
    if state["config"] != want:
        diff = {k: (state["config"].get(k), want.get(k)) for k in sorted(set(want) | set(state["config"]))
                if state["config"].get(k) != want.get(k)}
        raise CheckpointError(f"{path} was written by a different configuration, refusing to resume: "
                              f"{diff} (checkpoint, now)")
    # The data order and the per-sample noise depend on these: continuing with others is not a resume.
    loop_diff = {k: (state["loop"].get(k), getattr(cfg, k)) for k in ("seed", "batch")
                 if state["loop"].get(k) != getattr(cfg, k)}
    if loop_diff:
        raise CheckpointError(f"{path} was written with different loop settings, refusing to resume: "
                              f"{loop_diff} (checkpoint, now)")
    rngs = state["rng"]
    if len(rngs) != dist_info()[1]:
        raise CheckpointError(f"{path} holds RNG states of {len(rngs)} processes, this run has {dist_info()[1]}")
    for k, m in method.modules.items():
        _unwrap(m).load_state_dict(state["modules"][k])
    for k, o in method.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    ema.module.load_state_dict(state["ema"])
    set_rng_state(rngs[rank])


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
