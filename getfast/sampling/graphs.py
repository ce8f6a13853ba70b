"""Explicit CUDA-graph capture of a whole sampling call, one graph per input signature.

A one-step student at batch 1 is launch-bound: its time is the host cost of launching hundreds of small
kernels (GET: fixed-point iterations × blocks). Capturing the call once with ``torch.cuda.graph`` on static
input buffers and replaying it turns that into one launch. ``torch.compile(mode="reduce-overhead")`` is not
used because Inductor skips its CUDA graphs when a custom op mutates its inputs (the Anderson step does).

Rules for a function captured here:
* it takes ``(z, labels)`` tensors (``labels`` may be None) and returns a tuple of tensors;
* it does not read device values on the host (no ``.item()``, ``bool(tensor)``, ``tolist``): the DEQ solve
  runs in its zero-sync mode ``tol=None``;
* its random numbers come from torch's CUDA generator, which graphs support (each replay draws new ones).

A signature is (z shape, dtype, device, labels shape/dtype or None). The first call with a new signature
runs the function ``warmup`` times on a side stream (lazy initialisation, cuDNN/cuBLAS handles), then
captures it; later calls copy their inputs into the static buffers and replay. When a capture raises, the
signature is remembered as failed with the reason and runs eagerly from then on: sampling never stops
because a graph could not be made, and ``reasons`` says why it was not made.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["GraphCache", "CudaGraphBackend", "Captured"]


@dataclass
class Captured:
    """One captured call: static inputs, static outputs and the replay function."""
    static_z: torch.Tensor
    static_labels: torch.Tensor | None
    static_out: tuple
    replay: Callable[[], None]


class CudaGraphBackend:
    """Capture with ``torch.cuda.graph`` after a warm-up on a side stream (PyTorch's documented recipe)."""

    name = "cuda"

    def __init__(self, warmup: int = 2):
        if warmup < 1:
            raise ValueError(f"warmup must be >= 1 (lazy initialisation cannot happen during capture), got {warmup}")
        self.warmup = warmup

    def unavailable(self, z: torch.Tensor) -> str | None:
        """Why ``z`` cannot run in a CUDA graph, or None."""
        if z.device.type != "cuda":
            return f"CUDA graphs need CUDA tensors; the input is on {z.device}"
        return None

    def capture(self, fn, static_z, static_labels) -> Captured:
        side = torch.cuda.Stream(device=static_z.device)
        side.wait_stream(torch.cuda.current_stream(static_z.device))
        with torch.cuda.stream(side):
            for _ in range(self.warmup):
                fn(static_z, static_labels)
        torch.cuda.current_stream(static_z.device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn(static_z, static_labels)
        return Captured(static_z, static_labels, tuple(out), graph.replay)


class GraphCache:
    """``fn(z, labels) -> tuple[Tensor, ...]`` replayed from a captured graph per input signature.

    ``max_graphs`` bounds the number of kept graphs (each holds its own memory pool); the least recently
    used is dropped first. Outputs are cloned after a replay, so results stay valid after the next call.
    ``backend`` does the capture (``CudaGraphBackend``; tests give a stand-in that runs on the CPU).
    """

    def __init__(self, fn: Callable, backend=None, max_graphs: int = 8, log=None):
        if max_graphs < 1:
            raise ValueError(f"max_graphs must be >= 1, got {max_graphs}")
        self.fn = fn
        self.backend = backend if backend is not None else CudaGraphBackend()
        self.max_graphs = max_graphs
        self.graphs: OrderedDict[tuple, Captured] = OrderedDict()
        self.reasons: dict[tuple, str] = {}   # signature -> why it runs eagerly
        self.captures = 0                     # graphs captured so far (a dropped one captured again counts twice)
        self.replays = 0
        self.eager_calls = 0
        self._log = log

    @staticmethod
    def signature(z: torch.Tensor, labels: torch.Tensor | None) -> tuple:
        lab = None if labels is None else (tuple(labels.shape), labels.dtype)
        return (tuple(z.shape), z.dtype, str(z.device), lab)

    def _eager(self, key, z, labels, reason: str | None):
        if reason is not None and key not in self.reasons:
            self.reasons[key] = reason
            msg = f"CUDA graph not used for input {key[0]} {key[1]}: {reason}; sampling eagerly"
            if self._log is not None:
                self._log(msg)
            else:
                warnings.warn(msg, RuntimeWarning, stacklevel=3)
        self.eager_calls += 1
        return tuple(self.fn(z, labels))

    def __call__(self, z: torch.Tensor, labels: torch.Tensor | None = None) -> tuple:
        key = self.signature(z, labels)
        if key in self.reasons:
            return self._eager(key, z, labels, None)
        why = self.backend.unavailable(z)
        if why is None and labels is not None and labels.device != z.device:
            why = f"labels are on {labels.device}, the input on {z.device}"
        if why is not None:
            return self._eager(key, z, labels, why)
        cap = self.graphs.get(key)
        if cap is None:
            static_z = z.detach().clone()
            static_labels = None if labels is None else labels.detach().clone()
            try:
                cap = self.backend.capture(self.fn, static_z, static_labels)
            except Exception as e:  # noqa: BLE001  (any capture failure means: run this signature eagerly)
                _clear_capture_error(z.device)
                return self._eager(key, z, labels, f"capture failed ({type(e).__name__}: {str(e).strip()[:300]})")
            self.captures += 1
            self.graphs[key] = cap
            while len(self.graphs) > self.max_graphs:
                self.graphs.popitem(last=False)
        else:
            self.graphs.move_to_end(key)
        cap.static_z.copy_(z)
        if labels is not None:
            cap.static_labels.copy_(labels)
        cap.replay()
        self.replays += 1
        return tuple(o.clone() for o in cap.static_out)


def _clear_capture_error(device: torch.device) -> None:
    """After a failed capture, wait for the device so the error does not surface on a later, unrelated call."""
    if device.type == "cuda":
        try:
            torch.cuda.synchronize(device)
        except RuntimeError:
            pass
