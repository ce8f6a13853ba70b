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
  ``frozen() -> {option: module}`` (optional) the frozen networks read from a path (teacher, --init); their
                   weights' digests must match on resume
  ``product``, ``product_metadata()``  file name and safetensors metadata of the exported EMA weights
  ``lr_options`` (optional) dict optimizer name -> config field of its learning rate, for error messages
  ``pop_warnings() -> list[str]`` (optional) read at log time; each message is written to the log once

Each step (as in NVlabs/edm2's training_loop.py): LR warm-up, the data order (a seeded permutation per epoch,
so the position is one integer), autocast (bf16 on GPU) around the forward only, then per loss a backward
into that optimizer's own parameters, clipping and the step (:mod:`.step`); the EMA; a JSONL log line;
checkpoints with exact resume (:mod:`.checkpoint`, :mod:`.rng`); sample grids. The run folder is locked and
never mixes runs (:mod:`.run_dir`); :func:`fit` exports the product (:mod:`.export`). A loss or gradient that
is not finite stops training with an error naming the step. ``LoopConfig.compile`` compiles the step with
``torch.compile`` (methods build their Adam/AdamW with ``fused=True`` when asked, which the CLI does with
``--compile``); ``LoopConfig.tf32`` (default on) lets CUDA run float32 matmuls and convolutions on TF32.

Before ``setup`` the loop sets ``method.run_info`` (a :class:`RunInfo`: seed, global batch, rank, world); a
method may draw per-sample noise from :func:`.rng.sample_generators` (the teacher does), which makes its draws
independent of the number of processes and of resumes.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import math
import time
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from getfast.io import atomic_write_bytes
from getfast.limits import MAX_SEED
from getfast.options import check_bool, check_device, check_number, check_path, check_text
from getfast.train.checkpoint import latest_good_checkpoint, restore_state, save_state
from getfast.train.distributed import agree, dist_info, init_distributed, resolve_device, tf32, unwrap
from getfast.train.export import export_product, warm_start
from getfast.train.rng import RunInfo, data_indices, seed_everything
from getfast.train.run_dir import JsonlLog, prepare_out, run_lock
from getfast.train.step import EMA, Updater, check_batch_fits, phases, set_lr, write_grid


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
    warm_start: str = ""                # exported student (.safetensors) that starts the product and its EMA (optimizers, fake score, discriminator start fresh; a resume restores its checkpoint instead)

    def __post_init__(self):
        check_path("out", self.out)
        for name in ("batch", "log_every", "ckpt_every", "keep_ckpts"):
            check_number(name, getattr(self, name), lo=1, integer=True)
        check_number("grid_n", self.grid_n, lo=0, integer=True)
        check_number("seed", self.seed, lo=0, hi=MAX_SEED, integer=True)
        check_number("grid_every", self.grid_every, lo=0, integer=True)
        check_number("kimg", self.kimg, lo=0, lo_open=True)
        for name in ("warmup_kimg", "ema_halflife_kimg", "ema_rampup"):
            check_number(name, getattr(self, name), lo=0)
        for name in ("resume", "overwrite", "compile", "tf32", "progress"):
            check_bool(name, getattr(self, name))
        check_bool("bf16", self.bf16, optional=True)
        if self.resume and self.overwrite:
            raise ValueError("--resume continues the run in --out and --overwrite deletes it: pass one of them")
        check_device("device", self.device)
        check_text("warm_start", self.warm_start, "a path to an exported student (.safetensors)", empty=True)

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


def train(method, cfg: LoopConfig, evaluator=None, warm: dict | None = None) -> dict:
    """Run ``method`` for ``cfg.kimg`` thousand samples in the run folder ``cfg.out``; returns the last log record.
    ``evaluator``: a :class:`getfast.metrics.train_eval.Evaluator` (FID every N kimg, TensorBoard), or None;
    ``warm``: the checked ``--warm-start`` weights when the caller read them already (:func:`fit`).

    Refuses to start a fresh run in a folder that holds an earlier one (``cfg.resume`` continues it,
    ``cfg.overwrite`` deletes it) and while another run holds the folder's lock.
    """
    check_method(method)
    device = resolve_device(cfg.device)
    init_distributed(device.type)
    rank, world = dist_info()
    if cfg.batch % world:
        raise ValueError(f"batch {cfg.batch} is not divisible by the number of processes {world}")
    check_batch_fits(method, cfg, device, world)
    if warm is None and cfg.warm_start:
        warm = warm_start(method, cfg.warm_start)  # a bad file: refused before any work
    out = Path(cfg.out)
    with contextlib.ExitStack() as held:
        def prepare():  # rank 0 only: lock the folder, then refuse or clear an earlier run in it
            held.enter_context(run_lock(out))
            prepare_out(out, getattr(method, "product", None), resume=cfg.resume, overwrite=cfg.overwrite)
        agree(prepare, rank, world)
        with tf32(device, cfg.tf32):
            return _train(method, cfg, device, rank, world, out, evaluator, warm)


def _train(method, cfg: LoopConfig, device, rank: int, world: int, out: Path, evaluator=None, warm=None) -> dict:
    local_batch = cfg.batch // world
    seed_everything(cfg.seed + rank)
    bf16 = device.type == "cuda" if cfg.bf16 is None else cfg.bf16

    path, state = latest_good_checkpoint(out, log=print if rank == 0 else (lambda *_: None)) if cfg.resume \
        else (None, None)
    if warm is not None and state is None:  # the product starts from the exported weights, its EMA with it
        unwrap(method.modules[method.ema_module]).load_state_dict(warm)
    for m in method.modules.values():
        m.to(device)
    ema = EMA(method.modules[method.ema_module])
    step, nimg, resumed_from = 0, 0, None
    if state is not None:
        restore_state(method, ema, state, rank, cfg, path)
        step, nimg, resumed_from = state["loop"]["step"], state["loop"]["nimg"], str(path)
    elif cfg.resume and rank == 0:
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
    updater = Updater(method, device)
    total_steps = cfg.total_steps()
    logger = JsonlLog(out / "log.jsonl", rank == 0, resume_step=step if cfg.resume else None)
    if evaluator is not None:
        evaluator.start(out, rank)
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
            set_lr(method, nimg, cfg.warmup_kimg)
            batch = local_batch  # data-free methods get the local batch size
            if method.data is not None:
                idx = data_indices(len(method.data), cfg.batch, nimg, cfg.seed)
                batch = method.data.batch(idx[rank * local_batch:(rank + 1) * local_batch])
                batch = tuple(b.to(device) if torch.is_tensor(b) else b for b in batch)
            with autocast:  # the forward pass only: backward and the optimizer steps run outside autocast
                todo = phases(losses_fn(batch, step))
            while True:
                with autocast:
                    phase = next(todo, None)
                if phase is None:
                    break
                updater.apply(phase, step)
            step += 1
            nimg += cfg.batch
            ema.update(unwrap(method.modules[method.ema_module]), nimg, cfg.batch, cfg.ema_halflife_kimg,
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
                if evaluator is not None:
                    evaluator.log(record)
                for message in method.pop_warnings() if hasattr(method, "pop_warnings") else ():
                    logger.write({"step": step, "warning": message})  # once per cause, the method decides
                    if rank == 0:
                        print(f"warning: {message}")
                if bar is not None:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in record.items() if k not in ("step", "time")},
                                    refresh=False)
                last_t, last_nimg = now, nimg
            if bar is not None:
                bar.update(1)
            if evaluator is not None:  # before the checkpoint: a resume from it never loses a measurement
                evaluator.after_step(method, ema.module, step, nimg - cfg.batch, nimg, step == total_steps, logger)
            if step % cfg.ckpt_every == 0 or step == total_steps:
                updater.check()
                save_state(method, ema, out, step, nimg, cfg, rank)
            if rank == 0 and cfg.grid_n and hasattr(method, "sample_grid") and \
                    ((cfg.grid_every and step % cfg.grid_every == 0) or step == total_steps):
                write_grid(method, ema, out / f"grid-{step:07d}.png", cfg.grid_n)
    finally:
        if bar is not None:
            bar.close()
        logger.close()
        if evaluator is not None:
            evaluator.close()
    return record


def fit(method, cfg: LoopConfig, evaluator=None) -> Path | None:
    """:func:`train` then :func:`export_product`, holding the run folder's lock throughout, so no other run can
    start in ``cfg.out`` between the last checkpoint and the export. Returns the exported file (rank 0)."""
    device = resolve_device(cfg.device)
    init_distributed(device.type)
    rank, world = dist_info()
    check_batch_fits(method, cfg, device, world)  # before the run folder exists: a refusal leaves nothing behind
    warm = warm_start(method, cfg.warm_start) if cfg.warm_start else None
    with contextlib.ExitStack() as held:
        agree(lambda: held.enter_context(run_lock(Path(cfg.out))), rank, world)
        train(method, cfg, evaluator, warm)
        return export_product(method, cfg)
