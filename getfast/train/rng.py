"""Random state of a run: per-rank seeding, the per-sample noise generators, the data order, and the
process RNG states a checkpoint stores so a resumed run draws what an uninterrupted one would."""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class RunInfo:
    seed: int           # LoopConfig.seed
    batch: int          # global batch
    rank: int
    world: int

    @property
    def local_batch(self) -> int:
        return self.batch // self.world


def _mix64(x: int) -> int:
    # SplitMix64 finaliser: decorrelates nearby integers (seeds of neighbouring samples).
    x &= 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return x ^ (x >> 31)


def sample_generators(info: RunInfo, step: int, stream: int = 0) -> list[torch.Generator]:
    """One CPU generator per local sample of ``step``, seeded by (seed, stream, global sample position).

    Rank r's samples are positions ``step·batch + r·local_batch + j`` of the global batch, so a 2-process
    run draws exactly the noise of the 1-process run's corresponding rows, and a resumed run the noise of
    an uninterrupted one. ``stream`` separates independent uses within one step.
    """
    first = step * info.batch + info.rank * info.local_batch
    base = _mix64(_mix64(info.seed) ^ (stream * 0x9E3779B97F4A7C15))
    return [torch.Generator().manual_seed(_mix64(base + first + j) >> 1) for j in range(info.local_batch)]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    np_state = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
            "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
            "python": {"version": random.getstate()[0], "state": list(random.getstate()[1]),
                       "gauss": random.getstate()[2]}}


def set_rng_state(s: dict) -> None:
    torch.set_rng_state(s["torch"])
    if s["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(s["cuda"])
    n = s["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), *n[2:]))
    py = s["python"]
    random.setstate((py["version"], tuple(py["state"]), py["gauss"]))


def data_indices(n: int, batch: int, position: int, seed: int) -> torch.Tensor:
    """The global batch starting at ``position`` of an endless stream of seeded per-epoch permutations."""
    parts, pos, got = [], position, 0
    while got < batch:
        epoch, offset = divmod(pos, n)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        part = perm[offset:offset + min(batch - got, n - offset)]
        parts.append(part)
        pos, got = pos + len(part), got + len(part)
    return torch.cat(parts)
