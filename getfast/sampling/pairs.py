"""Pair generation: sample noise/image pairs from a teacher into the format of :mod:`getfast.data.pairs`.

GET (Geng et al. 2023, Sec. 4) distils from a fixed set of pairs (z, x = Heun_teacher(z)); generating them is
a teacher-sampling job, so it lives beside the sampler. The format, the per-sample seeded noise and the
reader (``PairDataset``) are in :mod:`getfast.data.pairs`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from getfast.data.pairs import (FORMAT, IMAGE_DTYPES, LABEL_SCHEMES, MANIFEST, SEED_STRIDE, PairDataError,
                                _array_files, _json_bytes, _npy_bytes, check_shard, noise_batch, quantize,
                                sample_label, sample_seed, sha256_file, shard_name)
from getfast.io import atomic_write_bytes
from getfast.options import check_choice, check_device, check_number, check_text, flag
from getfast.sampling.sampler import NonFiniteError, Sampler, load, resolve_device

__all__ = ["PairsConfig", "make_pairs"]


@dataclass
class PairsConfig:
    """Noise/image pairs from a teacher's Heun sampler (resumable; shards by rank under torchrun)."""

    n: int = dataclasses.field(kw_only=True)  # number of pairs (required)
    teacher: str = "fashion-mnist"   # embedded teacher name, .safetensors export, or training run folder
    out: str = "pairs"               # output folder
    cond: bool = False               # class-conditional pairs (the teacher must have classes)
    cfg_scale: float | None = None   # classifier-free guidance weight w (needs --cond)
    labels: str = "balanced"         # label scheme with --cond: balanced (i mod K) | random (seeded per sample)
    store_noise: bool = False        # also store the noise (else regenerated from per-sample seeds)
    image_dtype: str = "uint8"       # uint8 | fp16
    shard_size: int = 1000           # samples per shard
    steps: int = 18                  # Heun steps (2·steps − 1 network evaluations)
    batch: int = 64                  # sampler batch size (batches are cut at fixed offsets inside a shard)
    seed: int = 0                    # base seed: sample i's noise uses seed·2³² + i
    device: str = "auto"             # auto | cpu | cuda | cuda:N
    progress: bool = True            # print a line per shard

    def __post_init__(self):
        for name in ("n", "shard_size", "batch", "steps", "seed"):
            check_number(name, getattr(self, name), integer=True)
        if self.n <= 0:
            raise ValueError(f"{flag('n')} must be a positive number of pairs, got {self.n}")
        if self.n >= SEED_STRIDE:
            raise ValueError(f"{flag('n')} must be below 2**32, got {self.n}")
        if not 0 <= self.seed < 2**31:
            raise ValueError(f"{flag('seed')} must be in [0, 2**31), got {self.seed}")
        for name in ("shard_size", "batch", "steps"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag(name)} must be positive, got {getattr(self, name)}")
        check_choice("image_dtype", self.image_dtype, IMAGE_DTYPES)
        check_choice("labels", self.labels, LABEL_SCHEMES)
        if self.cfg_scale is not None:
            check_number("cfg_scale", self.cfg_scale)
            if not self.cond:
                raise ValueError(f"{flag('cfg_scale')} (classifier-free guidance) needs --cond")
        check_text("teacher", self.teacher, "a teacher (file, folder or import)")
        check_text("out", self.out, "a folder path")
        check_device("device", self.device)


def _teacher_identity(name_or_path: str, net) -> dict:
    """Where the teacher came from, the sha256 of its file (when it is one) and of its weights."""
    from getfast.embedded import EMBEDDED
    path = Path(EMBEDDED.get(name_or_path, name_or_path))
    h = hashlib.sha256()
    for k, v in sorted(net.state_dict().items()):
        t = v.detach().cpu().contiguous()
        h.update(k.encode())
        h.update(str(t.dtype).encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return {"path": str(path), "sha256": sha256_file(path) if path.is_file() else None,
            "weights_sha256": h.hexdigest(), "meta": getattr(net, "meta", {})}


def _fingerprint(cfg: PairsConfig, teacher: dict, shape) -> dict:
    """Everything a shard's content depends on (``n`` is not: growing ``n`` reuses complete shards)."""
    return {"format": FORMAT, "teacher_weights_sha256": teacher["weights_sha256"], "shape": list(shape),
            "seed": cfg.seed, "cond": cfg.cond, "labels": cfg.labels if cfg.cond else None,
            "cfg_scale": cfg.cfg_scale, "sampler": "heun", "steps": cfg.steps, "batch": cfg.batch,
            "shard_size": cfg.shard_size, "image_dtype": cfg.image_dtype, "store_noise": cfg.store_noise}


def _sample_shard(teacher: Sampler, cfg: PairsConfig, k: int, first: int, count: int, shape, num_classes: int):
    """The arrays and labels of shard ``k``; its batches start at fixed offsets inside the shard."""
    images, noises, labels = [], [], []
    for b0 in range(first, first + count, cfg.batch):
        idx = range(b0, min(b0 + cfg.batch, first + count))
        z = noise_batch(cfg.seed, idx, shape)
        lab = None
        if cfg.cond:
            lab_list = [sample_label(cfg.seed, i, shape, num_classes, cfg.labels) for i in idx]
            labels += lab_list
            lab = torch.tensor(lab_list, dtype=torch.int64)
        try:
            x = teacher(z, lab)
        except NonFiniteError as e:
            guidance = f" with cfg_scale {cfg.cfg_scale:g}" if cfg.cfg_scale is not None else ""
            raise NonFiniteError(f"{shard_name(k)}, samples [{idx.start}, {idx.stop}){guidance}: {e}") from None
        images.append(quantize(x, cfg.image_dtype))
        if cfg.store_noise:
            noises.append(z.numpy())
    arrays = {"images": np.concatenate(images)}
    if cfg.store_noise:
        arrays["noise"] = np.concatenate(noises)
    return arrays, (labels if cfg.cond else None)


def _write_shard(out: Path, k: int, first: int, count: int, arrays: dict, labels, cfg: PairsConfig, fingerprint):
    files = {}
    for key, fname in _array_files(k, cfg.store_noise).items():
        data = _npy_bytes(arrays[key])
        atomic_write_bytes(out / fname, data)
        files[key] = {"file": fname, "sha256": hashlib.sha256(data).hexdigest(),
                      "dtype": str(arrays[key].dtype), "shape": list(arrays[key].shape)}
    info = {"format": FORMAT, "index": k, "first": first, "count": count,
            "seeds": [sample_seed(cfg.seed, first), sample_seed(cfg.seed, first + count - 1)],
            "labels": labels, "files": files, "fingerprint": fingerprint}
    atomic_write_bytes(out / f"{shard_name(k)}.json", _json_bytes(info))   # last: marks the shard complete


def _remove_stale_temps(out: Path, k: int) -> None:
    for p in out.glob(f".{shard_name(k)}.*.tmp*"):
        p.unlink(missing_ok=True)


def make_pairs(cfg: PairsConfig, log=print) -> Path:
    """Sample ``cfg.n`` noise/image pairs with the teacher's Heun sampler (Karras et al. 2022, Alg. 2).

    Under ``torchrun`` rank r writes the shards k ≡ r (mod world); after a barrier rank 0 checks all
    shards and writes ``manifest.json``. Safe to re-run after a kill at any point. Returns the manifest path.
    """
    import torch.distributed as dist

    from getfast.train.distributed import dist_info, init_distributed

    device = resolve_device(cfg.device)
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise NotADirectoryError(20, "exists and is not a folder", str(out))
    from getfast.methods import is_student
    if is_student(cfg.teacher):
        raise ValueError(f"teacher {cfg.teacher!r} is a distilled student; pairs are sampled from a teacher denoiser")
    # The teacher is loaded before anything is written, so a bad --teacher leaves no empty --out behind.
    # fp32 (no autocast): the pairs are training data and must not depend on the device they were made on.
    sampler = load(cfg.teacher, sampler="heun", steps=cfg.steps, cfg_scale=cfg.cfg_scale, device=device,
                   bf16=False)
    D = sampler.net
    num_classes = sampler.num_classes
    if cfg.cond and not num_classes:
        raise ValueError(f"--cond needs a class-conditional teacher, but {cfg.teacher!r} has no classes")
    shape = sampler.shape
    teacher = _teacher_identity(cfg.teacher, D)
    init_distributed(device.type)
    rank, world = dist_info()
    out.mkdir(parents=True, exist_ok=True)
    say = log if (rank == 0 and cfg.progress) else (lambda *_: None)
    fingerprint = _fingerprint(cfg, teacher, shape)

    n_shards = math.ceil(cfg.n / cfg.shard_size)
    mine = [k for k in range(n_shards) if k % world == rank]
    t0, made, skipped = time.time(), 0, 0
    for k in mine:
        first = k * cfg.shard_size
        count = min(cfg.shard_size, cfg.n - first)
        _remove_stale_temps(out, k)   # torn temp files of a killed run (only this rank writes shard k)
        ok, why = check_shard(out, k, first, count, fingerprint)
        if ok:
            skipped += 1
            continue
        if why != "missing":
            log(f"[rank {rank}] regenerating {shard_name(k)}: {why}")
            (out / f"{shard_name(k)}.json").unlink(missing_ok=True)   # "JSON present" must mean complete
        ts = time.time()
        arrays, labels = _sample_shard(sampler, cfg, k, first, count, shape, num_classes)
        _write_shard(out, k, first, count, arrays, labels, cfg, fingerprint)
        made += 1
        if cfg.progress:
            dt = time.time() - ts
            log(f"[rank {rank}] {shard_name(k)} ({count} pairs) in {dt:.1f}s, {count / max(dt, 1e-9):.2f} pairs/s")
    wall = time.time() - t0

    if world > 1:
        dist.barrier()
    path = out / MANIFEST
    if rank == 0:
        shards = []
        for k in range(n_shards):
            first = k * cfg.shard_size
            count = min(cfg.shard_size, cfg.n - first)
            jpath = out / f"{shard_name(k)}.json"
            if not jpath.exists():
                raise PairDataError(f"{jpath} is missing after generation (is --out on a filesystem all ranks share?)")
            info = json.loads(jpath.read_text())
            if info["first"] != first or info["count"] != count or info["fingerprint"] != fingerprint:
                raise PairDataError(f"{jpath} does not hold samples [{first}, +{count}) of this configuration")
            shards.append({"index": k, "first": first, "count": count, "json": jpath.name,
                           "json_sha256": sha256_file(jpath),
                           "files": {key: {"file": r["file"], "sha256": r["sha256"]}
                                     for key, r in info["files"].items()}})
        manifest = {"format": FORMAT, "count": cfg.n, "shape": list(shape), "image_dtype": cfg.image_dtype,
                    "image_encoding": "round((x+1)*127.5) clipped to [0,255]" if cfg.image_dtype == "uint8"
                    else "float16 in [-1, 1]",
                    "noise": "stored" if cfg.store_noise else "seeded",
                    "noise_rule": "torch.randn(shape, generator=torch.Generator().manual_seed(seed*2**32+i)), "
                                  "CPU float32",
                    "seed": cfg.seed, "seed_stride": SEED_STRIDE, "num_classes": num_classes if cfg.cond else 0,
                    "labels": cfg.labels if cfg.cond else None,
                    "teacher": teacher,
                    "sampler": {"name": "heun", "steps": cfg.steps, "nfe": 2 * cfg.steps - 1, "sigma_min": 0.002,
                                "sigma_max": 80.0, "rho": 7.0, "cfg_scale": cfg.cfg_scale, "batch": cfg.batch},
                    "shard_size": cfg.shard_size, "fingerprint": fingerprint, "shards": shards,
                    "timing": {"finished_unix": time.time(), "wall_s_rank0": wall, "shards_made_rank0": made,
                               "shards_skipped_rank0": skipped, "world": world}}
        for p in out.glob(f".{MANIFEST}.tmp*"):
            p.unlink(missing_ok=True)
        atomic_write_bytes(path, _json_bytes(manifest))
        say(f"wrote {cfg.n} pairs in {n_shards} shards to {out} ({made} shards made, {skipped} reused by rank 0)")
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()
    return path


