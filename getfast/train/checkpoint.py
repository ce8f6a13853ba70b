"""Atomic, checksummed checkpoints: temp file + fsync + rename, sha256 over the payload.

File layout: one header line ``GETFAST-CKPT v1 <sha256>\\n`` followed by a ``torch.save`` payload.
A torn or edited file fails the checksum and is refused with a message naming it.
"""
from __future__ import annotations

import hashlib
import io
import os
import re
from pathlib import Path

import torch

from getfast.io import atomic_write_bytes  # noqa: F401  (re-exported: the package's one atomic writer)

MAGIC = b"GETFAST-CKPT v1 "


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint is corrupt, truncated or does not belong to this run.

    Also a ``ValueError`` (bad input, not a bug), so the CLI reports it in one line with exit code 2.
    """


def save_checkpoint(path, state: dict) -> None:
    buf = io.BytesIO()
    torch.save(state, buf)
    payload = buf.getvalue()
    digest = hashlib.sha256(payload).hexdigest().encode()
    atomic_write_bytes(path, MAGIC + digest + b"\n" + payload)


def load_checkpoint(path, map_location="cpu") -> dict:
    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    if not raw.startswith(MAGIC) or len(raw) < len(MAGIC) + 65:
        raise CheckpointError(f"{path} is not a getfast checkpoint (bad header)")
    digest, payload = raw[len(MAGIC):len(MAGIC) + 64], raw[len(MAGIC) + 65:]
    if raw[len(MAGIC) + 64:len(MAGIC) + 65] != b"\n" or hashlib.sha256(payload).hexdigest().encode() != digest:
        raise CheckpointError(f"{path} is corrupt: sha256 of its payload does not match its header")
    try:
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)
    except Exception as e:  # checksum fine but the payload is not a loadable state (written by something else)
        raise CheckpointError(f"{path}: payload cannot be loaded ({type(e).__name__}: {e})") from e


_CKPT_RE = re.compile(r"ckpt-(\d+)\.pt")
_TMP_RE = re.compile(r"\.ckpt-\d+\.pt\.tmp\d+")


def list_checkpoints(run_dir) -> list[Path]:
    """Checkpoints in ``run_dir``, newest (highest step) first."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run_dir.iterdir() if (m := _CKPT_RE.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def latest_good_checkpoint(run_dir, log=print):
    """Newest checkpoint that passes its checksum; corrupt ones are reported and skipped, never deleted."""
    for p in list_checkpoints(run_dir):
        try:
            return p, load_checkpoint(p)
        except CheckpointError as e:
            log(f"warning: skipping {e}")
    return None, None


def checkpoint_step(path) -> int:
    """The step number in a checkpoint's file name."""
    return int(_CKPT_RE.fullmatch(Path(path).name).group(1))


def prune_checkpoints(run_dir, keep: int, current_step: int | None = None) -> None:
    """Keep the ``keep`` newest checkpoints at or before ``current_step`` (default: all), delete older ones.

    Checkpoints *after* ``current_step`` exist only when a run resumed from an older one because they were corrupt:
    they are left alone and do not count, so pruning never deletes the good checkpoint just written while
    keeping a corrupt newer one. Temp files of writes that crashed (``.ckpt-*.pt.tmp<pid>``) are removed.
    """
    keep = max(int(keep), 1)
    found = list_checkpoints(run_dir)
    if current_step is not None:
        found = [p for p in found if checkpoint_step(p) <= current_step]
    for p in found[keep:]:
        p.unlink(missing_ok=True)
    own = f".tmp{os.getpid()}"
    for p in Path(run_dir).iterdir():
        if _TMP_RE.fullmatch(p.name) and not p.name.endswith(own):
            p.unlink(missing_ok=True)
