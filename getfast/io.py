"""File output for the whole package: one atomic writer, and the PNG/grid writers built on it.

``atomic_write_bytes`` writes a temporary file beside the target, fsyncs it, renames it over the target and
fsyncs the folder, so a reader sees the old content or the new one, never a mix, and a crash leaves no
half-written target. A failure (no permission, read-only or full disk, a file where a folder should be)
raises a single ``OSError`` of the same class whose ``filename`` is the target path; the temporary file is
removed quietly, so the user never sees a second error from the clean-up.

Images: ``to_uint8`` (floats in [-1, 1] → uint8, as EDM writes PNGs), ``make_grid``, ``save_grid`` and
``save_images`` live here, below the training loop and the metrics that both write sample grids.
"""
from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path

__all__ = ["atomic_write_bytes", "atomic_write_with", "FdWriter", "atomic_write_text", "atomic_write_json", "check_writable", "to_uint8",
           "make_grid", "save_grid", "save_images", "png_bytes"]


def _raise_for(path: Path, err: OSError):
    """Re-raise ``err`` as the same OSError class, naming ``path`` (not the temporary file), unchained."""
    errno_ = err.errno
    strerror = err.strerror or str(err)
    raise type(err)(errno_, strerror, str(path)) from None


def atomic_write_bytes(path: str | os.PathLike, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` so that ``path`` holds either its old or its new content, never a mix.

    ``mode``: permission bits of the new file (default: ``0o666`` minus the umask, as ``open`` makes it).
    Raises ``OSError`` naming ``path`` when the folder cannot be made or written, or the disk is full.
    """
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise ValueError(f"data for {path} must be bytes, got {type(data).__name__}")
    return atomic_write_with(path, lambda f: f.write(data), mode)


class FdWriter:
    """A write-only file over an open descriptor, every byte through ``os.write`` (so a full disk surfaces as one
    ``OSError``); ``digest`` (a hashlib object or None) sees every byte written, in order."""

    def __init__(self, fd: int, digest=None):
        self.fd, self.digest = fd, digest

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        size = view.nbytes
        if self.digest is not None:
            self.digest.update(view)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        return size

    def flush(self) -> None:
        pass


def atomic_write_with(path: str | os.PathLike, write, mode: int | None = None) -> Path:
    """:func:`atomic_write_bytes` for content produced by ``write(f)`` on an :class:`FdWriter` ``f`` (streamed to
    the temporary file: a multi-GB checkpoint is never a second copy in memory). ``write`` may ``os.lseek(f.fd, …)``
    to fill in a header last."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _raise_for(path.parent, e)
    if path.is_dir():
        raise IsADirectoryError(21, "is a folder, expected a file path", str(path))
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o666 if mode is None else mode)
        try:
            if mode is not None:
                os.fchmod(fd, mode)  # not reduced by the umask: the caller asked for these bits
            write(FdWriter(fd))
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except OSError as e:
        _discard(tmp)
        _raise_for(path, e)
    except BaseException:
        _discard(tmp)  # KeyboardInterrupt mid-write: no debris, the old file stays
        raise
    _fsync_dir(path.parent)
    return path


def _discard(tmp: Path) -> None:
    try:
        tmp.unlink(missing_ok=True)
    except OSError:
        pass  # the folder itself is unwritable or gone: nothing was left in it


def _fsync_dir(folder: Path) -> None:
    try:
        dfd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # some filesystems do not open folders; the rename itself already happened
    try:
        os.fsync(dfd)
    except OSError:
        pass
    finally:
        os.close(dfd)


def atomic_write_text(path: str | os.PathLike, text: str, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode(), mode)


def atomic_write_json(path: str | os.PathLike, obj, indent: int | None = 2, mode: int | None = None) -> Path:
    """Write ``obj`` as JSON. NaN and infinities are refused (they are not JSON)."""
    try:
        text = json.dumps(obj, indent=indent, allow_nan=False)
    except ValueError as e:
        raise ValueError(f"{path}: cannot write non-finite numbers as JSON ({e})") from None
    return atomic_write_text(path, text + "\n", mode)


def check_writable(path: str | os.PathLike, kind: str = "folder") -> Path:
    """Raise ``OSError`` naming ``path`` unless it can be created or written, without creating anything.

    ``kind="folder"``: ``path`` must be a folder or not exist yet; ``kind="file"``: ``path`` must not be a
    folder. The nearest existing ancestor must be a folder where a file can be created (checked by creating and
    removing an empty hidden file there).
    """
    path = Path(path)
    if kind not in ("folder", "file"):
        raise ValueError(f"kind must be 'folder' or 'file', got {kind!r}")
    if path.exists():
        if kind == "folder" and not path.is_dir():
            raise NotADirectoryError(20, "exists and is not a folder", str(path))
        if kind == "file" and path.is_dir():
            raise IsADirectoryError(21, "is a folder, expected a file path", str(path))
        target = path if path.is_dir() else path.parent
    else:
        target = path.parent
    probe = target.absolute()
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise NotADirectoryError(20, f"{probe} is a file, so this path cannot be created", str(path))
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(13, f"no write permission in {probe}", str(path))
    # Permission bits do not tell the whole story (root, read-only mounts, /proc): create and remove a file.
    test = probe / f".getfast-write-test-{os.getpid()}"
    try:
        os.close(os.open(test, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as e:
        raise type(e)(e.errno, f"cannot create files in {probe} ({e.strerror})", str(path)) from None
    _discard(test)
    return path


# --- images --------------------------------------------------------------------------------------

def to_uint8(images):
    """Float images in [-1, 1], (N, C, H, W) → uint8 numpy (N, H, W, C).

    Values outside [-1, 1] are clipped; the rounding is ``floor((x + 1) · 127.5 + 0.5)``, as when an
    EDM sample (Karras et al. 2022) is written to PNG. A torch tensor or a numpy array is accepted;
    NaN or infinite values are an error.
    """
    import numpy as np
    import torch
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images)
    if not torch.is_tensor(images):
        raise ValueError(f"images must be a torch tensor or numpy array, got {type(images).__name__}")
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"images must be (N, C, H, W) with C in (1, 3), got shape {tuple(images.shape)}")
    if not images.is_floating_point():
        raise ValueError(f"images must be floating point in [-1, 1], got {images.dtype}")
    x = images.detach().to("cpu", torch.float32)
    if not bool(torch.isfinite(x).all()):
        raise ValueError("images contain NaN or inf")
    x = torch.floor((x.clamp(-1, 1) + 1) * 127.5 + 0.5).clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(images, nrow: int | None = None, pad: int = 1, pad_value: int = 0):
    """Tile images in [-1, 1] (N, C, H, W) into one uint8 array (H', W', C), ``nrow`` images per row."""
    import numpy as np
    if len(images) == 0:
        raise ValueError("images is empty: a grid needs at least one image")
    x = to_uint8(images)
    n, h, w, c = x.shape
    nrow = int(nrow) if nrow else math.ceil(math.sqrt(n))
    if nrow < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    if pad < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")
    nrow = min(nrow, n)
    rows = math.ceil(n / nrow)
    grid = np.full((rows * (h + pad) + pad, nrow * (w + pad) + pad, c), pad_value, dtype=np.uint8)
    for i in range(n):
        r, k = divmod(i, nrow)
        y0, x0 = pad + r * (h + pad), pad + k * (w + pad)
        grid[y0:y0 + h, x0:x0 + w] = x[i]
    return grid


def png_bytes(array) -> bytes:
    """A uint8 (H, W), (H, W, 1) or (H, W, 3) array encoded as PNG."""
    from PIL import Image
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images, path, nrow: int | None = None, pad: int = 1, pad_value: int = 0) -> Path:
    """Write images in [-1, 1] (N, C, H, W) as one PNG grid (grey or RGB), ``nrow`` per row (default: square).

    The file is written atomically. Returns the path.
    """
    grid = make_grid(images, nrow=nrow, pad=pad, pad_value=pad_value)
    return atomic_write_bytes(path, png_bytes(grid))


def save_images(images, folder, prefix: str = "", start: int = 0) -> list[Path]:
    """Write each image as its own PNG (``{prefix}{index:06d}.png``) in ``folder``: the layout clean-fid reads.

    ``images``: float in [-1, 1] (N, C, H, W), or uint8 (N, H, W[, C]).
    """
    import numpy as np
    import torch
    if (torch.is_tensor(images) or isinstance(images, np.ndarray)) and images.dtype in (torch.uint8, np.uint8):
        x = images.cpu().numpy() if torch.is_tensor(images) else images
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 images must be (N, H, W[, C]) with C in (1, 3), got shape {x.shape}")
    else:
        x = to_uint8(images)
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        _raise_for(folder, e)
    paths = []
    for i, im in enumerate(x):
        p = folder / f"{prefix}{start + i:06d}.png"
        try:  # one file per image, thousands for an FID set: plain writes, no fsync per file
            p.write_bytes(png_bytes(im))
        except OSError as e:
            _raise_for(p, e)
        paths.append(p)
    return paths
