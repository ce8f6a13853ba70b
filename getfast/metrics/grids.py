"""Sample grids as PNG, and the float → uint8 image conversion shared with FID."""
from __future__ import annotations

import math
import io
from pathlib import Path

import numpy as np
import torch

from getfast.train.checkpoint import atomic_write_bytes


def to_uint8(images) -> np.ndarray:
    """Float images in [-1, 1], (N, C, H, W) → uint8 (N, H, W, C).

    Values outside [-1, 1] are clipped; the rounding is ``floor((x + 1) · 127.5 + 0.5)``, as when an
    EDM sample (Karras et al. 2022) is written to PNG. A torch tensor or a numpy array is accepted.
    """
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


def make_grid(images, nrow: int | None = None, pad: int = 1, pad_value: int = 0) -> np.ndarray:
    """Tile images in [-1, 1] (N, C, H, W) into one uint8 array (H', W', C), ``nrow`` images per row."""
    x = to_uint8(images)
    n, h, w, c = x.shape
    if n == 0:
        raise ValueError("images is empty")
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


def save_grid(images, path, nrow: int | None = None, pad: int = 1, pad_value: int = 0) -> Path:
    """Write images in [-1, 1] (N, C, H, W) as one PNG grid (grey or RGB), ``nrow`` per row (default: square).

    The file is written atomically (temporary file + rename). Returns the path.
    """
    from PIL import Image
    grid = make_grid(images, nrow=nrow, pad=pad, pad_value=pad_value)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img = Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return path


def save_images(images, folder, prefix: str = "", start: int = 0) -> list[Path]:
    """Write each image as its own PNG (``{prefix}{index:06d}.png``) in ``folder``: the layout clean-fid reads.

    ``images``: float in [-1, 1] (N, C, H, W), or uint8 (N, H, W[, C]).
    """
    from PIL import Image
    if (torch.is_tensor(images) or isinstance(images, np.ndarray)) and images.dtype in (torch.uint8, np.uint8):
        x = images.cpu().numpy() if torch.is_tensor(images) else images
        if x.ndim == 3:
            x = x[..., None]
        if x.ndim != 4 or x.shape[-1] not in (1, 3):
            raise ValueError(f"uint8 images must be (N, H, W[, C]) with C in (1, 3), got shape {x.shape}")
    else:
        x = to_uint8(images)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, im in enumerate(x):
        p = folder / f"{prefix}{start + i:06d}.png"
        Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(p)
        paths.append(p)
    return paths
