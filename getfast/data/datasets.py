"""Image datasets read from local files only (nothing is downloaded).

Every dataset is held as uint8 ``images`` (N, C, H, W) and int64 ``labels`` (N,) or None, and yields
float images in [-1, 1]. Sources: Fashion-MNIST IDX files, scikit-learn's bundled digits, an image
folder (class sub-folders become labels), or an ``.npz`` with ``x`` (N, H, W[, C]) uint8 and optional ``y``.
"""
from __future__ import annotations

import gzip
import os
import struct
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from getfast.limits import MAX_CLASSES, MAX_RESOLUTION, check_fits

FASHION_MNIST_DIRS = ("/usr/share/datasets/fashion-mnist",)
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
                         "Bag", "Ankle boot")
_IDX_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
              "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


class DatasetError(ValueError):
    """A dataset file is missing, truncated or not what it claims to be."""


@dataclass
class ImageDataset(torch.utils.data.Dataset):
    images: torch.Tensor              # uint8 (N, C, H, W)
    labels: torch.Tensor | None       # int64 (N,) or None
    num_classes: int = 0
    name: str = ""

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise DatasetError(f"{self.name}: images must be uint8 (N, C, H, W), got {self.images.dtype} "
                               f"{tuple(self.images.shape)}")
        if self.labels is not None and len(self.labels) != len(self.images):
            raise DatasetError(f"{self.name}: {len(self.labels)} labels for {len(self.images)} images")

    def __len__(self):
        return len(self.images)

    @property
    def resolution(self) -> int:
        h, w = self.images.shape[-2:]
        if h != w:
            raise DatasetError(f"{self.name}: images are {h}x{w}, not square; pass a resolution to pad/resize them")
        return w

    @property
    def channels(self) -> int:
        return self.images.shape[1]

    def __getitem__(self, i):
        x = self.images[i].float() / 127.5 - 1
        y = -1 if self.labels is None else int(self.labels[i])
        return x, y

    def batch(self, idx: torch.Tensor):
        """Images in [-1, 1] and labels (or None) for an index tensor, without a DataLoader."""
        x = self.images[idx].float() / 127.5 - 1
        return x, (None if self.labels is None else self.labels[idx])


def _read_idx(path: Path, expected_magic: int, expected_ndim: int) -> np.ndarray:
    if not path.exists():
        raise DatasetError(f"missing file {path}: expected an IDX .gz file (Fashion-MNIST layout)")
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except (OSError, EOFError, zlib.error) as e:
        raise DatasetError(f"{path}: not a readable gzip file ({e}); the file may be truncated") from e
    if len(raw) < 4 + 4 * expected_ndim:
        raise DatasetError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    magic = struct.unpack(">I", raw[:4])[0]
    if magic != expected_magic:
        raise DatasetError(f"{path}: IDX magic {magic:#x}, expected {expected_magic:#x}")
    dims = struct.unpack(f">{expected_ndim}I", raw[4:4 + 4 * expected_ndim])
    body = raw[4 + 4 * expected_ndim:]
    if len(body) != int(np.prod(dims)):
        raise DatasetError(f"{path}: header says {dims} = {int(np.prod(dims))} bytes, file has {len(body)}")
    return np.frombuffer(body, dtype=np.uint8).reshape(dims)


def find_fashion_mnist(root: str | os.PathLike | None = None, split: str = "train") -> Path:
    """The folder holding the Fashion-MNIST IDX files of ``split``: ``root`` if given, else Debian's location."""
    img_name = _IDX_FILES[split][0]
    if root:
        d = Path(root)
        if not d.is_dir():
            raise DatasetError(f"Fashion-MNIST folder {d} does not exist: expected a folder holding "
                               f"{', '.join(_IDX_FILES['train'] + _IDX_FILES['test'])}")
        return d  # a missing file inside it is reported by name when it is read
    candidates = [Path(d) for d in FASHION_MNIST_DIRS]
    for d in candidates:
        if (d / img_name).exists():
            return d
    where = ", ".join(str(c / img_name) for c in candidates)
    raise DatasetError(f"Fashion-MNIST not found: missing {where}; install Debian's dataset-fashion-mnist "
                       f"or pass a folder holding {', '.join(_IDX_FILES['train'] + _IDX_FILES['test'])}")


def is_fashion_mnist_dir(path) -> bool:
    """True for a folder that holds the Fashion-MNIST IDX files (either split)."""
    p = Path(path)
    return p.is_dir() and any((p / files[0]).exists() for files in _IDX_FILES.values())


def load_fashion_mnist(split: str = "train", root=None) -> ImageDataset:
    if split not in _IDX_FILES:
        raise ValueError(f"split must be one of {sorted(_IDX_FILES)}, got {split!r}")
    d = find_fashion_mnist(root, split)
    img_file, lbl_file = (d / f for f in _IDX_FILES[split])
    images = _read_idx(img_file, 0x803, 3)
    labels = _read_idx(lbl_file, 0x801, 1)
    if len(images) != len(labels):
        raise DatasetError(f"{img_file} has {len(images)} images but {lbl_file} has {len(labels)} labels")
    if len(labels) and int(labels.max()) >= 10:
        raise DatasetError(f"{lbl_file}: label {int(labels.max())} out of range, expected classes 0..9")
    return ImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)),
                        num_classes=10, name=f"fashion-mnist-{split}")


def _digits_arrays():
    # scikit-learn ships the digits as one CSV (64 pixel values 0..16, then the class per row). Read that file
    # directly: importing sklearn.datasets pulls in scipy.stats and costs seconds in every process.
    import importlib.util
    spec = importlib.util.find_spec("sklearn")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        f = Path(loc) / "datasets" / "data" / "digits.csv.gz"
        if f.exists():
            try:
                data = np.loadtxt(f, delimiter=",", dtype=np.float64)
            except (OSError, ValueError, EOFError, zlib.error) as e:
                raise DatasetError(f"{f}: unreadable digits data ({e}); reinstall scikit-learn") from e
            if data.shape != (1797, 65):
                raise DatasetError(f"{f}: {data.shape} values, expected 1797 rows of 64 pixels and a class")
            return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(np.int64)
    from sklearn.datasets import load_digits as _ld  # layout changed: use the public loader
    d = _ld()
    return d.images, d.target.astype(np.int64)


def load_digits() -> ImageDataset:
    """scikit-learn's 1,797 8×8 digits (values 0..16) rescaled to uint8."""
    images, target = _digits_arrays()
    images = np.round(images * (255 / 16)).astype(np.uint8)
    return ImageDataset(torch.from_numpy(images).unsqueeze(1), torch.from_numpy(target),
                        num_classes=10, name="digits")


def open_npz(path, expected: str = "an .npz archive"):
    """``np.load`` of an ``.npz`` archive (pickles refused) whose failures name the file and say what it is:
    a file that is not a zip archive is not handed to numpy, whose fallback would try to unpickle it and answer
    with advice to pass ``allow_pickle``."""
    path = Path(path)
    with open(path, "rb") as f:  # a missing or unreadable file is the OSError naming it
        head = f.read(6)
    if not head.startswith(b"PK"):  # every zip archive (an .npz is one) starts with its "PK" signature
        if head.startswith(b"\x93NUMPY"):
            raise DatasetError(f"{path}: a single .npy array, not an .npz archive; expected {expected}")
        raise DatasetError(f"{path}: not an .npz archive (it is no zip archive); expected {expected}")
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: not a readable .npz archive ({type(e).__name__}: {_first_line(e)})") from None


def npz_array(z, key: str, path) -> np.ndarray:
    """Array ``key`` of an open ``.npz``; an array of Python objects is refused by name (loading it would
    unpickle, which can run code), a damaged member names the file."""
    try:
        return z[key]
    except ValueError as e:
        if "allow_pickle" in str(e) or "Object arrays" in str(e):
            raise DatasetError(f"{path}: array {key!r} holds Python objects (dtype=object), which getfast does not "
                               f"load (unpickling can run code); store it as numbers") from None
        raise DatasetError(f"{path}: array {key!r} is unreadable ({_first_line(e)})") from None
    except (OSError, EOFError, zlib.error, zipfile.BadZipFile) as e:
        raise DatasetError(f"{path}: array {key!r} is unreadable ({type(e).__name__}: {_first_line(e)}); "
                           f"the file may be truncated") from None


def _first_line(e: Exception) -> str:
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return lines[0] if lines else type(e).__name__


def load_npz(path) -> ImageDataset:
    """An ``.npz`` with ``x`` uint8 (N, H, W) or (N, H, W, C), C in {1, 3}, and optional integer ``y`` (N,)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"missing file {path}: expected an .npz with 'x' (N,H,W[,C]) uint8 and optional 'y'")
    expected = "an .npz with 'x' (N,H,W[,C]) uint8 and optional 'y'"
    with open_npz(path, expected) as z:
        if "x" not in z.files:
            raise DatasetError(f"{path}: no array 'x' (found {sorted(z.files)}); expected 'x' (N,H,W[,C]) uint8")
        x, y = npz_array(z, "x", path), (npz_array(z, "y", path) if "y" in z.files else None)
    if x.dtype != np.uint8 or x.ndim not in (3, 4):
        raise DatasetError(f"{path}: 'x' must be uint8 (N,H,W) or (N,H,W,C), got {x.dtype} {x.shape}")
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[-1] not in (1, 3):
        hint = " (it looks channels-first: transpose to (N,H,W,C))" if x.shape[1] in (1, 3) else ""
        raise DatasetError(f"{path}: 'x' has {x.shape[-1]} channels in its last axis, expected 1 or 3 "
                           f"(layout N,H,W,C){hint}")
    if len(x) == 0:
        raise DatasetError(f"{path}: 'x' holds no images")
    labels = None
    if y is not None:
        y = np.asarray(y)
        if y.dtype.kind not in "iu":
            raise DatasetError(f"{path}: 'y' must hold integer class labels, got {y.dtype}")
        y = y.reshape(-1).astype(np.int64)
        if len(y) != len(x):
            raise DatasetError(f"{path}: {len(y)} labels in 'y' for {len(x)} images in 'x'")
        if y.min() < 0:
            raise DatasetError(f"{path}: 'y' holds negative label {int(y.min())}, expected classes 0..K-1")
        if y.max() >= MAX_CLASSES:  # the class count sizes the networks' label embeddings
            raise DatasetError(f"{path}: 'y' holds label {int(y.max())}; class labels must be 0..K-1 with "
                               f"K <= {MAX_CLASSES}")
        labels = torch.from_numpy(y)
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), labels,
                        num_classes=int(labels.max()) + 1 if labels is not None else 0, name=path.stem)


_IMAGE_EXT = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


def load_image_folder(path) -> ImageDataset:
    """PNG/JPEG files; if the folder has sub-folders, each is a class (sorted names → labels)."""
    from PIL import Image, UnidentifiedImageError
    root = Path(path)
    if not root.is_dir():
        raise DatasetError(f"{root}: not a folder of images")
    subdirs = sorted(p for p in root.iterdir() if p.is_dir())
    groups = [(i, sorted(p for p in d.rglob("*") if p.suffix.lower() in _IMAGE_EXT)) for i, d in enumerate(subdirs)]
    if not subdirs:
        groups = [(-1, sorted(p for p in root.iterdir() if p.suffix.lower() in _IMAGE_EXT))]
    arrays, labels = [], []
    for label, files in groups:
        for f in files:
            try:
                with Image.open(f) as im:
                    grey = im.mode in ("1", "L", "LA", "I", "I;16", "F")
                    arrays.append(np.asarray(im.convert("L" if grey else "RGB")))
            except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError) as e:
                raise DatasetError(f"{f}: unreadable image ({type(e).__name__}: {e})") from e
            labels.append(label)
    if not arrays:
        raise DatasetError(f"{root}: no images ({', '.join(sorted(_IMAGE_EXT))})")
    if any(a.ndim == 3 for a in arrays):  # a mix of grey and colour files: make them all RGB
        arrays = [np.repeat(a[..., None], 3, axis=-1) if a.ndim == 2 else a for a in arrays]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise DatasetError(f"{root}: images differ in size {sorted(shapes)[:3]}; resize them first")
    x = np.stack(arrays)
    if x.ndim == 3:
        x = x[..., None]
    lab = torch.tensor(labels) if subdirs else None
    return ImageDataset(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2))), lab,
                        num_classes=len(subdirs), name=root.name)


def resize(ds: ImageDataset, resolution: int, mode: str = "pad") -> ImageDataset:
    """Make images ``resolution``×``resolution``: ``pad`` centres smaller images on black (= -1) and
    resizes larger ones; ``resize`` always resizes (bilinear, antialiased)."""
    if mode not in ("pad", "resize"):
        raise ValueError(f"mode must be 'pad' or 'resize', got {mode!r}")
    if int(resolution) < 1:
        raise ValueError(f"resolution must be >= 1, got {resolution}")
    h, w = ds.images.shape[-2:]
    if h == w == resolution:
        return ds
    if resolution > MAX_RESOLUTION:
        raise ValueError(f"resolution (--resolution) must be <= {MAX_RESOLUTION}, got {resolution}")
    n, c = ds.images.shape[:2]
    # the uint8 result, plus the float copy interpolation makes of the images
    need = n * c * resolution * resolution * (1 if mode == "pad" and resolution >= max(h, w) else 5)
    check_fits(need, f"resolution (--resolution) {resolution}: {n} images of {ds.name or 'the data'} at "
                     f"{resolution}x{resolution}", hint="lower --resolution")
    if mode == "pad" and resolution >= h and resolution >= w:
        ph, pw = resolution - h, resolution - w
        imgs = F.pad(ds.images, (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2))
    else:
        imgs = F.interpolate(ds.images.float(), size=(resolution, resolution), mode="bilinear", antialias=True,
                             align_corners=False).round().clamp(0, 255).to(torch.uint8)
    return ImageDataset(imgs, ds.labels, ds.num_classes, f"{ds.name}@{resolution}")


def load_dataset(name: str, split: str = "train", resolution: int | None = None, root=None) -> ImageDataset:
    """``fashion-mnist`` | ``digits`` | a folder with the Fashion-MNIST IDX files | path to an ``.npz`` |
    path to an image folder."""
    if name == "fashion-mnist":
        ds = load_fashion_mnist(split, root)
    elif name == "digits":
        ds = load_digits()
    elif is_fashion_mnist_dir(name):  # a folder the user names holding the four IDX files
        ds = load_fashion_mnist(split, name)
    elif str(name).endswith(".npz"):
        ds = load_npz(name)
    elif Path(name).is_dir():
        ds = load_image_folder(name)
    else:
        raise DatasetError(f"unknown dataset {name!r} (no such file or folder): use fashion-mnist, digits, "
                           f"a folder with the Fashion-MNIST IDX files, a .npz file or an image folder")
    return resize(ds, resolution) if resolution else ds
