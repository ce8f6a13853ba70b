"""The run folder: an exclusive lock, the refusal to mix a fresh run with an earlier one (or, asked, its
deletion), and the JSONL log that a resume trims back to its checkpoint."""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
from pathlib import Path

from getfast.io import atomic_write_bytes
from getfast.train.checkpoint import list_checkpoints

LOCK_NAME = ".getfast.lock"
_held_locks: dict[str, list] = {}  # folder -> [file object, depth]: re-entrant within one process


@contextlib.contextmanager
def run_lock(out: Path):
    """Hold an exclusive lock on the run folder ``out`` (``flock`` on ``out/.getfast.lock``; released when the
    process exits, also by SIGKILL). A second run into the same folder is refused instead of racing."""
    key = str(Path(out).resolve())
    if key in _held_locks:
        _held_locks[key][1] += 1
        try:
            yield
        finally:
            _held_locks[key][1] -= 1
        return
    Path(out).mkdir(parents=True, exist_ok=True)
    f = open(Path(out) / LOCK_NAME, "a+")
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.seek(0)
        holder = f.read().strip() or "another process"
        f.close()
        raise ValueError(f"{out} is in use by another training run ({holder}); wait for it to finish or "
                         "choose another --out") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()}\n")
    f.flush()
    _held_locks[key] = [f, 1]
    try:
        yield
    finally:
        _held_locks.pop(key, None)
        fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        f.close()


def _run_files(out: Path, product: str | None) -> list[Path]:
    """Files a previous run of the loop left in ``out`` (never anything else)."""
    if not out.is_dir():
        return []
    found = list_checkpoints(out)
    for p in out.iterdir():
        if p.name in ("log.jsonl", "config.json") or (p.name.startswith("grid-") and p.suffix == ".png") \
                or (p.name.startswith(".ckpt-") and ".tmp" in p.name) or (product and p.name == product):
            found.append(p)
    return found


def prepare_out(out: Path, product: str | None, *, resume: bool, overwrite: bool) -> None:
    """Refuse to mix a fresh run with an earlier one in ``out``; with ``overwrite``, delete the earlier one."""
    earlier = [p for p in _run_files(out, product) if p.name != product]
    if overwrite:
        for p in _run_files(out, product):
            p.unlink(missing_ok=True)
    elif earlier and not resume:
        what = "checkpoints" if list_checkpoints(out) else "a log"
        raise ValueError(f"{out} already holds a training run ({what}); pass --resume to continue it, or "
                         "--overwrite to replace it, or choose a new --out")


class JsonlLog:
    """``log.jsonl``: one JSON record per line, written by rank 0 only (``enabled``)."""

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
            atomic_write_bytes(path, "".join(kept).encode())
        self.f = open(path, "a") if enabled else None

    def write(self, record: dict):
        if self.enabled:
            self.f.write(json.dumps(record, allow_nan=False) + "\n")
            self.f.flush()

    def close(self):
        if self.f is not None:
            self.f.close()
            self.f = None
