"""Offline noise/image pairs sampled from a teacher: the on-disk format and its reader (``PairDataset``).

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

Generation (a teacher-sampling job) is ``getfast.sampling.pairs.make_pairs``.
"""
from __future__ import annotations

import hashlib
import io
import json
from pathlib import Path

import numpy as np
import torch

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


# --- shard checks (shared by generation and reading) -----------------------------------------

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




# --- reading -----------------------------------------------------------------------------------

def _check_finite(p: Path) -> None:
    """A float shard (fp16 images, stored noise) holding NaN/Inf is refused when the set is opened, naming the
    file: trained on, it would surface as a diverging loss blamed on the learning rate."""
    try:
        a = np.load(p, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as e:
        raise PairDataError(f"cannot read shard file {p}: {str(e).splitlines()[0]}") from None
    if a.dtype.kind == "f":
        bad = sum(int((~np.isfinite(a[i:i + 4096])).sum()) for i in range(0, len(a), 4096))
        if bad:
            raise PairDataError(f"{p}: {bad} values are NaN or infinite; regenerate this pair set (getfast make-pairs)")


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
                if verify:
                    _check_finite(p)
            if self.num_classes:
                labels += info["labels"]
        if sum(s["count"] for s in self._shards) != self._count:
            raise PairDataError(f"{mpath}: shard counts add up to {sum(s['count'] for s in self._shards)}, "
                                f"not {self._count}")
        self.labels = torch.tensor(labels, dtype=torch.int64) if self.num_classes else None
        self._maps: dict[tuple[int, str], np.ndarray] = {}

    def fingerprint(self) -> dict:
        """What identifies these pairs: their count and one sha256 over the shards' checksummed records (each
        names the sha256 of its arrays), so a grown or regenerated set under the same path differs."""
        h = hashlib.sha256("".join(s["json_sha256"] for s in self._shards).encode())
        return {"pairs": self._count, "sha256": h.hexdigest()}

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
