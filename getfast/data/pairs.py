"""Offline noise/image pairs sampled from a teacher: generation (``make_pairs``) and reading (``PairDataset``).

GET (Geng et al. 2023, Sec. 4) distils from a fixed set of pairs (z, x = Heun_teacher(z)). A pair
set is a folder::

    manifest.json               written last, by rank 0: what the set is and the sha256 of every shard
    shard-00000.json            one per shard, written after its arrays: its presence means "complete"
    shard-00000.images.npy      (count, C, H, W) uint8 (round((x+1)·127.5), clipped) or float16 in [-1, 1]
    shard-00000.noise.npy       (count, C, H, W) float32, only with ``store_noise``
    ...

Shard k holds the samples [k·S, min((k+1)·S, n)). Sample i's noise is regenerated bit-exactly from
its own seed, ``torch.randn(C, H, W, generator=torch.Generator().manual_seed(seed·2³² + i))`` (CPU,
float32), so 1M pairs cost the images only. Class labels (conditional sets) are ``i mod K``
("balanced") or drawn from the same per-sample generator after the noise ("random").

Every file is written atomically (temp file + fsync + rename). A re-run skips shards whose JSON is
present and whose arrays match their checksums, regenerates the rest, and gives a set identical to an
uninterrupted run: a shard's content depends only on its index and the configuration (its batches
are cut at fixed offsets inside the shard), never on which rank or run produced it.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from getfast.diffusion.samplers import heun
from getfast.train.checkpoint import atomic_write_bytes

FORMAT = "getfast-pairs-v1"
MANIFEST = "manifest.json"
SEED_STRIDE = 2**32          # sample i of base seed s uses the generator seed s·2³² + i
IMAGE_DTYPES = ("uint8", "fp16")
LABEL_SCHEMES = ("balanced", "random")


class PairDataError(ValueError):
    """A pair set is missing a file, is corrupt, or does not match what was asked."""


# --- per-sample noise and labels ---------------------------------------------------------------

def sample_seed(seed: int, index: int) -> int:
    """The generator seed of sample ``index`` in a set made with base ``seed``."""
    return seed * SEED_STRIDE + index


def sample_noise(seed: int, index: int, shape) -> torch.Tensor:
    """Sample ``index``'s noise z ~ N(0, I), float32 on CPU, regenerated bit-exactly from its seed."""
    g = torch.Generator().manual_seed(sample_seed(seed, index))
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def sample_label(seed: int, index: int, shape, num_classes: int, scheme: str = "balanced") -> int:
    """Class label of sample ``index``: ``index mod K`` (balanced) or a draw after its noise (random)."""
    if num_classes <= 0:
        raise ValueError(f"num_classes must be positive for labels, got {num_classes}")
    if scheme == "balanced":
        return index % num_classes
    if scheme == "random":
        g = torch.Generator().manual_seed(sample_seed(seed, index))
        torch.randn(tuple(shape), generator=g, dtype=torch.float32)   # advance past the noise
        return int(torch.randint(num_classes, (1,), generator=g))
    raise ValueError(f"label scheme {scheme!r} is not one of {LABEL_SCHEMES}")


def noise_batch(seed: int, indices, shape) -> torch.Tensor:
    """(B, *shape) float32: the regenerated noise of each index in ``indices``."""
    idx = [int(i) for i in indices]
    out = torch.empty((len(idx), *shape), dtype=torch.float32)
    for j, i in enumerate(idx):
        out[j] = sample_noise(seed, i, shape)
    return out


# --- files -------------------------------------------------------------------------------------

def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _npy_bytes(a: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(a), allow_pickle=False)
    return buf.getvalue()


def _json_bytes(obj) -> bytes:
    return (json.dumps(obj, indent=1, sort_keys=True) + "\n").encode()


def shard_name(k: int) -> str:
    return f"shard-{k:05d}"


def quantize(x: torch.Tensor, image_dtype: str) -> np.ndarray:
    """Images in [-1, 1] -> stored array: uint8 = round((x+1)·127.5) clipped to [0, 255], or float16."""
    if image_dtype == "uint8":
        return ((x.to(torch.float32) + 1) * 127.5).round().clamp(0, 255).to(torch.uint8).cpu().numpy()
    if image_dtype == "fp16":
        return x.to(torch.float16).cpu().numpy()
    raise ValueError(f"image_dtype {image_dtype!r} is not one of {IMAGE_DTYPES}")


def dequantize(a: np.ndarray) -> torch.Tensor:
    """Stored images -> float32 in [-1, 1]."""
    t = torch.from_numpy(np.ascontiguousarray(a))
    if t.dtype == torch.uint8:
        return t.to(torch.float32) / 127.5 - 1
    return t.to(torch.float32)


# --- generation --------------------------------------------------------------------------------

@dataclass
class PairsConfig:
    teacher: str = "fashion-mnist"   # embedded teacher name, .safetensors export, or training run folder
    n: int = 0                       # number of pairs (required)
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
    device: str = "auto"             # auto | cpu | cuda
    progress: bool = True            # print a line per shard


def _validate(cfg: PairsConfig) -> None:
    if cfg.n <= 0:
        raise ValueError(f"n must be a positive number of pairs (--n), got {cfg.n}")
    if cfg.n >= SEED_STRIDE:
        raise ValueError(f"n must be below 2**32, got {cfg.n}")
    if not 0 <= cfg.seed < 2**31:
        raise ValueError(f"seed must be in [0, 2**31), got {cfg.seed}")
    if cfg.shard_size <= 0:
        raise ValueError(f"shard_size must be positive, got {cfg.shard_size}")
    if cfg.batch <= 0:
        raise ValueError(f"batch must be positive, got {cfg.batch}")
    if cfg.steps <= 0:
        raise ValueError(f"steps must be positive, got {cfg.steps}")
    if cfg.image_dtype not in IMAGE_DTYPES:
        raise ValueError(f"image_dtype must be one of {IMAGE_DTYPES}, got {cfg.image_dtype!r}")
    if cfg.labels not in LABEL_SCHEMES:
        raise ValueError(f"labels must be one of {LABEL_SCHEMES}, got {cfg.labels!r}")
    if cfg.cfg_scale is not None and not cfg.cond:
        raise ValueError("cfg_scale (classifier-free guidance) needs --cond")


def _teacher_identity(name_or_path: str, net) -> dict:
    """Where the teacher came from, the sha256 of its file (when it is one) and of its weights."""
    from getfast.teacher import EMBEDDED
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


def _array_files(k: int, store_noise: bool) -> dict:
    files = {"images": f"{shard_name(k)}.images.npy"}
    if store_noise:
        files["noise"] = f"{shard_name(k)}.noise.npy"
    return files


def check_shard(out: Path, k: int, first: int, count: int, fingerprint: dict | None = None) -> tuple[bool, str]:
    """(True, "") when shard ``k`` is complete and intact; otherwise (False, why)."""
    jpath = out / f"{shard_name(k)}.json"
    if not jpath.exists():
        return False, "missing"
    try:
        info = json.loads(jpath.read_text())
    except (OSError, ValueError) as e:
        return False, f"{jpath.name} unreadable ({e})"
    if fingerprint is not None and info.get("fingerprint") != fingerprint:
        theirs = info.get("fingerprint") or {}
        diff = {key: (theirs.get(key), fingerprint.get(key)) for key in set(theirs) | set(fingerprint)
                if theirs.get(key) != fingerprint.get(key)}
        raise PairDataError(f"{jpath} was made with different settings {diff} (shard, now); "
                            f"use a new --out folder or delete the old shards")
    if info.get("first") != first or info.get("count") != count:
        return False, f"{jpath.name} holds [{info.get('first')}, +{info.get('count')}) instead of [{first}, +{count})"
    for key, rec in info.get("files", {}).items():
        p = out / rec["file"]
        if not p.exists():
            return False, f"{p.name} missing"
        if sha256_file(p) != rec["sha256"]:
            return False, f"{p.name} fails its sha256"
    return True, ""


def _sample_shard(D, cfg: PairsConfig, k: int, first: int, count: int, shape, num_classes: int, device):
    """The arrays and labels of shard ``k``; its batches start at fixed offsets inside the shard."""
    images, noises, labels = [], [], []
    for b0 in range(first, first + count, cfg.batch):
        idx = range(b0, min(b0 + cfg.batch, first + count))
        z = noise_batch(cfg.seed, idx, shape)
        lab = None
        if cfg.cond:
            lab_list = [sample_label(cfg.seed, i, shape, num_classes, cfg.labels) for i in idx]
            labels += lab_list
            lab = torch.tensor(lab_list, dtype=torch.int64, device=device)
        x = heun(D, z.to(device), steps=cfg.steps, class_labels=lab, cfg_scale=cfg.cfg_scale)
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

    from getfast.teacher import load
    from getfast.train.loop import dist_info, init_distributed, resolve_device

    _validate(cfg)
    device = resolve_device(cfg.device)
    init_distributed(device.type)
    rank, world = dist_info()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    say = log if (rank == 0 and cfg.progress) else (lambda *_: None)

    D = load(cfg.teacher, device=device)
    m = D.meta
    num_classes = int(m.get("num_classes", 0))
    if cfg.cond and not num_classes:
        raise ValueError(f"--cond needs a class-conditional teacher, but {cfg.teacher!r} has no classes")
    shape = (int(m["channels"]), int(m["resolution"]), int(m["resolution"]))
    teacher = _teacher_identity(cfg.teacher, D)
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
        arrays, labels = _sample_shard(D, cfg, k, first, count, shape, num_classes, device)
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


# --- reading -----------------------------------------------------------------------------------

class PairDataset(torch.utils.data.Dataset):
    """Noise/image pairs made by ``make_pairs``; arrays are memory-mapped, never loaded whole.

    ``batch(idx)`` returns ``(noise float32 (B, C, H, W), image float32 in [-1, 1] (B, C, H, W),
    labels int64 (B,) or None)``; seeded noise is regenerated bit-exactly. ``verify`` checks every
    sha256 once, at open.
    """

    def __init__(self, path, verify: bool = True):
        self.path = Path(path)
        mpath = self.path / MANIFEST
        if not mpath.exists():
            unfinished = any(self.path.glob("shard-*.json"))
            hint = " (shards are present: generation is unfinished, re-run make-pairs)" if unfinished else ""
            raise PairDataError(f"no pair set at {self.path}: {mpath} is missing{hint}")
        try:
            self.manifest = json.loads(mpath.read_text())
        except ValueError as e:
            raise PairDataError(f"{mpath} is not valid JSON: {e}") from e
        m = self.manifest
        if m.get("format") != FORMAT:
            raise PairDataError(f"{mpath} has format {m.get('format')!r}, expected {FORMAT!r}")
        self.shape = tuple(m["shape"])
        self.seed = int(m["seed"])
        self.num_classes = int(m["num_classes"])
        self.store_noise = m["noise"] == "stored"
        self.shard_size = int(m["shard_size"])
        self._count = int(m["count"])
        self._shards = m["shards"]
        labels = []
        for s in self._shards:
            jpath = self.path / s["json"]
            if not jpath.exists():
                raise PairDataError(f"shard file {jpath} is missing")
            if verify and sha256_file(jpath) != s["json_sha256"]:
                raise PairDataError(f"checksum mismatch: {jpath} does not match the sha256 in {mpath}")
            info = json.loads(jpath.read_text())
            for key, rec in s["files"].items():
                p = self.path / rec["file"]
                if not p.exists():
                    raise PairDataError(f"shard file {p} is missing")
                if verify and sha256_file(p) != rec["sha256"]:
                    raise PairDataError(f"checksum mismatch: {p} does not match the sha256 in {mpath}")
            if self.num_classes:
                labels += info["labels"]
        if sum(s["count"] for s in self._shards) != self._count:
            raise PairDataError(f"{mpath}: shard counts add up to {sum(s['count'] for s in self._shards)}, "
                                f"not {self._count}")
        self.labels = torch.tensor(labels, dtype=torch.int64) if self.num_classes else None
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    @property
    def resolution(self) -> int:
        return self.shape[-1]

    @property
    def channels(self) -> int:
        return self.shape[0]

    def __len__(self) -> int:
        return self._count

    def _array(self, k: int, key: str) -> np.ndarray:
        a = self._maps.get((k, key))
        if a is None:
            p = self.path / self._shards[k]["files"][key]["file"]
            try:
                a = np.load(p, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise PairDataError(f"cannot read shard file {p}: {e}") from e
            if a.shape != (self._shards[k]["count"], *self.shape):
                raise PairDataError(f"{p} has shape {a.shape}, expected {(self._shards[k]['count'], *self.shape)}")
            self._maps[(k, key)] = a
        return a

    def _gather(self, idx: np.ndarray, key: str) -> np.ndarray:
        shard = idx // self.shard_size
        out = None
        for k in np.unique(shard):
            sel = np.nonzero(shard == k)[0]
            a = self._array(int(k), key)
            if out is None:
                out = np.empty((len(idx), *self.shape), dtype=a.dtype)
            out[sel] = a[idx[sel] - int(k) * self.shard_size]   # reads only these rows of the map
        return out

    def batch(self, idx) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """(noise, image, labels) of the samples ``idx`` (a 1-D LongTensor of dataset indices)."""
        idx_t = torch.as_tensor(idx, dtype=torch.int64).reshape(-1).cpu()
        if idx_t.numel() == 0:
            raise ValueError("idx is empty")
        if int(idx_t.min()) < 0 or int(idx_t.max()) >= self._count:
            raise IndexError(f"idx out of range [0, {self._count}): min {int(idx_t.min())}, max {int(idx_t.max())}")
        idx_np = idx_t.numpy()
        image = dequantize(self._gather(idx_np, "images"))
        if self.store_noise:
            noise = torch.from_numpy(self._gather(idx_np, "noise"))
        else:
            noise = noise_batch(self.seed, idx_np.tolist(), self.shape)
        labels = self.labels[idx_t] if self.labels is not None else None
        return noise, image, labels

    def __getitem__(self, i):
        """(noise (C, H, W), image (C, H, W), label int; -1 for an unconditional set)."""
        i = int(i)
        if i < 0:
            i += self._count
        noise, image, labels = self.batch(torch.tensor([i]))
        return noise[0], image[0], (int(labels[0]) if labels is not None else -1)

    def rank_indices(self, rank: int, world: int) -> torch.Tensor:
        """Rank ``rank``'s contiguous share of the indices (sizes differ by at most one; all ranks cover all)."""
        if world <= 0 or not 0 <= rank < world:
            raise ValueError(f"rank must be in [0, world), got rank={rank}, world={world}")
        return torch.arange(rank * self._count // world, (rank + 1) * self._count // world)

    def __getstate__(self):  # DataLoader workers re-open their own memory maps
        state = self.__dict__.copy()
        state["_maps"] = {}
        return state
