"""Atomic, checksummed checkpoints: temp file + fsync + rename, sha256 over the payload.

File layout: one header line ``GETFAST-CKPT v1 <sha256>\\n`` followed by a ``torch.save`` payload.
A torn or edited file fails the checksum and is refused with a message naming it.

The training state in it (:func:`save_state`, :func:`restore_state`): format ``getfast-train-v1``, the
method's config, the loop position, every module and optimizer, the EMA and each rank's RNG states; a resume
refuses a checkpoint of another configuration, seed, batch, data or number of processes.
"""
from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import re
from pathlib import Path

import torch
import torch.distributed as dist

from getfast.io import atomic_write_bytes, atomic_write_with  # noqa: F401  (atomic_write_bytes re-exported)
from getfast.options import flag
from getfast.train.distributed import dist_info, unwrap
from getfast.train.rng import rng_state, set_rng_state

MAGIC = b"GETFAST-CKPT v1 "


class CheckpointError(RuntimeError, ValueError):
    """A checkpoint is corrupt, truncated or does not belong to this run.

    Also a ``ValueError`` (bad input, not a bug), so the CLI reports it in one line with exit code 2.
    """


def save_checkpoint(path, state: dict) -> None:
    """``torch.save(state)`` behind the header line, streamed into the atomic writer and hashed as it is written
    (the header's digest is filled in last), so the payload is never a second copy in memory."""
    def write(f):
        f.write(MAGIC + b"0" * 64 + b"\n")
        f.digest = hashlib.sha256()
        torch.save(state, f)
        digest, f.digest = f.digest.hexdigest().encode(), None
        os.lseek(f.fd, len(MAGIC), os.SEEK_SET)
        f.write(digest)
    atomic_write_with(path, write)


class _Payload(io.RawIOBase):
    """The bytes of an open file after ``start``, as a file of their own (what ``torch.load`` reads)."""

    def __init__(self, f, start: int):
        self.f, self.start = f, start
        f.seek(start)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        return self.f.readinto(b)

    def seek(self, pos: int, whence: int = 0) -> int:
        return self.f.seek(pos + self.start if whence == 0 else pos, whence) - self.start

    def tell(self) -> int:
        return self.f.tell() - self.start


def load_checkpoint(path, map_location="cpu") -> dict:
    """The state in a checkpoint after checking its header and the sha256 of its payload, read in chunks (memory:
    the loaded state, not the file's bytes besides)."""
    path = Path(path)
    start = len(MAGIC) + 65
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
    with f:
        try:
            head, h = f.read(start), hashlib.sha256()
            for chunk in iter(lambda: f.read(1 << 24), b""):
                h.update(chunk)
        except OSError as e:
            raise CheckpointError(f"cannot read checkpoint {path}: {e}") from e
        if not head.startswith(MAGIC) or len(head) < start:
            raise CheckpointError(f"{path} is not a getfast checkpoint (bad header)")
        if head[-1:] != b"\n" or h.hexdigest().encode() != head[len(MAGIC):len(MAGIC) + 64]:
            raise CheckpointError(f"{path} is corrupt: sha256 of its payload does not match its header")
        try:
            return torch.load(_Payload(f, start), map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:  # torch's text advises weights_only=False: the one thing not to do here
            found = re.search(r"GLOBAL (\S+)", str(e))
            what = f" ({found.group(1)})" if found else ""
            raise CheckpointError(f"{path}: refused: its payload holds Python objects{what} that are not tensors or plain "
                                  f"data, which getfast never unpickles (that could run code); getfast writes no such "
                                  f"checkpoint, so this file was made or altered by something else") from None
        except Exception as e:  # checksum fine but the payload is not a loadable state (written by something else)
            lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
            raise CheckpointError(f"{path}: payload cannot be loaded ({type(e).__name__}: "
                                  f"{lines[0] if lines else ''})") from None


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


# --- the training state ------------------------------------------------------------------------------

FORMAT = "getfast-train-v1"
SCHEDULE = ("warmup_kimg", "ema_halflife_kimg", "ema_rampup")  # loop options a resume must keep


def save_state(method, ema, out: Path, step: int, nimg: int, cfg, rank: int) -> None:
    """Write ``out/ckpt-<step>.pt`` (rank 0, with every rank's RNG state) and prune older checkpoints."""
    _, world = dist_info()
    rngs = [rng_state()]
    if world > 1:
        rngs = [None] * world
        dist.all_gather_object(rngs, rng_state())
    if rank == 0:
        state = {"format": FORMAT, "config": json.loads(json.dumps(method.config(), default=str)),
                 "loop": {"step": step, "nimg": nimg, "batch": cfg.batch, "seed": cfg.seed, "world": world,
                          **{k: getattr(cfg, k) for k in SCHEDULE}},
                 "modules": {k: unwrap(m).state_dict() for k, m in method.modules.items()},
                 "optimizers": {k: o.state_dict() for k, o in method.optimizers.items()},
                 "ema": ema.module.state_dict(), "rng": rngs}
        if hasattr(method, "data_fingerprint"):
            state["data"] = method.data_fingerprint()
        if hasattr(method, "frozen"):
            state["frozen"] = frozen_digests(method)
        save_checkpoint(out / f"ckpt-{step:09d}.pt", state)
        prune_checkpoints(out, cfg.keep_ckpts, current_step=step)
    if world > 1:
        dist.barrier()


def restore_state(method, ema, state: dict, rank: int, cfg, path) -> None:
    """Load a checkpoint's modules, optimizers, EMA and this rank's RNG state into a run, after checking that
    it belongs to this run (``CheckpointError`` naming what differs otherwise)."""
    want = json.loads(json.dumps(method.config(), default=str))
    if state.get("format") != FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r} is not {FORMAT}")
    # An option added to the method after the checkpoint was written is compatible when this run leaves it
    # at its default (the checkpoint's run behaved as the default does); anything else must match exactly.
    added = _added_at_default(method, set(want) - set(state["config"]))
    # Options that only say where the stored training data is (GET's --pairs) may change when the data's
    # fingerprint is the same: the identical pair set moved to another folder is the same run.
    moved = set()
    if state.get("data") is not None and hasattr(method, "data_fingerprint") \
            and method.data_fingerprint() == state["data"]:
        moved = set(getattr(method, "data_location_options", ()))
    skip = added | moved
    if {k: v for k, v in state["config"].items() if k not in moved} != \
            {k: v for k, v in want.items() if k not in skip}:
        diff = {k: (state["config"].get(k), want.get(k)) for k in sorted(set(want) | set(state["config"]))
                if k not in skip and state["config"].get(k) != want.get(k)}
        raise CheckpointError(f"{path} was written by a different configuration, refusing to resume: "
                              f"{diff} (checkpoint, now)")
    # The data order and the per-sample noise depend on seed and batch; the learning-rate warm-up and the EMA
    # on the schedule options: continuing with others is not a resume (the run would be one that no single
    # command describes). Checkpoints written before the schedule was recorded carry none of it.
    loop_diff = {k: (state["loop"][k], getattr(cfg, k)) for k in ("seed", "batch", *SCHEDULE)
                 if k in state["loop"] and state["loop"][k] != getattr(cfg, k)}
    if loop_diff:
        flags = ", ".join(f"--{k.replace('_', '-')}" for k in loop_diff)
        raise CheckpointError(f"{path} was written with different loop settings, refusing to resume: "
                              f"{loop_diff} (checkpoint, now); resume with the checkpoint's {flags}, or start a new run")
    trained = int(state["loop"].get("step", 0))
    if cfg.total_steps() < trained:  # the export would be this later checkpoint, not a --kimg run
        raise CheckpointError(f"{path} has trained {state['loop'].get('nimg', 0) / 1000:g} kimg, more than "
                              f"--kimg {cfg.kimg:g}: resume with --kimg of at least that, or start a new run")
    # Stored training data (GET's pairs) can grow or be regenerated under the same path: a run continued on
    # other data is not a resume. Checkpoints written before this check carry no fingerprint and are trusted.
    if state.get("data") is not None and hasattr(method, "data_fingerprint"):
        now = method.data_fingerprint()
        if now != state["data"]:
            raise CheckpointError(f"{path} was trained on different data, refusing to resume: {state['data']} "
                                  f"(checkpoint) vs {now} (now); train on the original data, or start a new run")
    # The frozen networks (teacher, the round's --init) are read again from their path on resume; the file or
    # the run folder behind it may have changed since (a newer export, a teacher run that trained on): continuing
    # under another teacher is not a resume. Checkpoints written before this check carry no digests.
    if state.get("frozen") is not None and hasattr(method, "frozen"):
        now, then = frozen_digests(method), state["frozen"]
        changed = [k for k in sorted(set(now) | set(then)) if now.get(k) != then.get(k)]
        if changed:
            raise CheckpointError(f"{path} was trained from other weights than {', '.join(map(flag, changed))} "
                                  f"holds now (the file or run folder changed since the run started), refusing to "
                                  f"resume: restore those weights, or start a new run (--warm-start continues from "
                                  f"this run's student)")
    rngs = state["rng"]
    if len(rngs) != dist_info()[1]:
        raise CheckpointError(f"{path} holds RNG states of {len(rngs)} processes, this run has {dist_info()[1]}")
    for k, m in method.modules.items():
        unwrap(m).load_state_dict(state["modules"][k])
    for k, o in method.optimizers.items():
        o.load_state_dict(state["optimizers"][k])
    ema.module.load_state_dict(state["ema"])
    set_rng_state(rngs[rank])


def frozen_digests(method) -> dict[str, str]:
    """{option: weights.state_digest} of the frozen networks ``method.frozen()`` names, computed once per run."""
    from getfast.weights import state_digest
    if getattr(method, "_frozen_digests", None) is None:
        method._frozen_digests = {k: state_digest(m) for k, m in method.frozen().items() if m is not None}
    return method._frozen_digests


def _added_at_default(method, missing: set[str]) -> set[str]:
    """The options in ``missing`` that ``method.cfg`` (a dataclass) holds at their declared defaults."""
    cfg = getattr(method, "cfg", None)
    if not missing or cfg is None or not dataclasses.is_dataclass(cfg):
        return set()
    out = set()
    for f in dataclasses.fields(cfg):
        if f.name not in missing:
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            continue
        if getattr(cfg, f.name) == default:
            out.add(f.name)
    return out


def load_ema(path, map_location="cpu") -> tuple[dict, dict]:
    """(EMA state_dict, method config) of a training checkpoint file or the newest good one in a folder."""
    p = Path(path)
    if p.is_dir():
        found, state = latest_good_checkpoint(p)
        if state is None:
            raise CheckpointError(f"no readable checkpoint in {p}")
    else:
        state = load_checkpoint(p, map_location)
    return state["ema"], state["config"]
