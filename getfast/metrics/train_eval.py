"""Evaluation during training: FID of the EMA every ``--fid-every`` kimg, and TensorBoard logging.

The FID records go to the run's ``log.jsonl`` beside the training records (``{"step", "kimg", "fid", "fid_n",
"fid_seconds"}``) and are plotted to ``fid.png`` in the run folder after each evaluation; the training curves of
the official codes (EDM, SiD, GDD) are read the same way, FID against kimg. The images are the method's own
``sample_grid`` of the EMA network (classes cycling 0..K−1, so a conditional model is evaluated class-balanced),
from a fixed seed at every evaluation, drawn without touching the training noise stream. Features are the bundled
clean-fid Inception (Parmar et al. 2022, :mod:`getfast.metrics.fid`); the reference is any ``getfast fid --ref``:
an ``.npz`` of ready statistics (``mu``, ``sigma``: clean-fid's, or NVlabs/edm's ``fid-refs/*.npz``, whose
features come from their TensorFlow-ported Inception: comparable, not bit-identical), images, or a dataset name.

``--tensorboard`` writes every numeric value of every log record (and the FID) as scalars to ``out/tensorboard``
with ``torch.utils.tensorboard`` (the ``tensorboard`` package: ``pip install 'getfast[tensorboard]'``).
Rank 0 evaluates and writes; the other ranks go on (they meet rank 0 again at the next collective).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from getfast.options import check_bool, check_number, check_text

__all__ = ["EvalConfig", "Evaluator"]


@dataclass
class EvalConfig:
    """Evaluation during training (FID of the EMA, TensorBoard)."""

    fid_every: float = 0.0      # kimg between FID evaluations of the EMA, and one at the end (0: off)
    fid_ref: str = ""           # FID reference: .npz with mu/sigma (clean-fid or NVlabs/edm fid-refs), images (.npz/folder) or a dataset name
    fid_n: int = 10000          # generated images per FID evaluation
    fid_batch: int = 50         # images per sampling and Inception batch
    tensorboard: bool = False   # also write every log record as TensorBoard scalars to <out>/tensorboard

    def __post_init__(self):
        check_number("fid_every", self.fid_every, lo=0)
        check_number("fid_n", self.fid_n, lo=2, integer=True)
        check_number("fid_batch", self.fid_batch, lo=1, integer=True)
        check_bool("tensorboard", self.tensorboard)
        check_text("fid_ref", self.fid_ref, "a path or dataset name", empty=True)
        if self.fid_every and not self.fid_ref:
            raise ValueError("--fid-every needs --fid-ref (reference statistics .npz with mu/sigma, or images)")
        if self.fid_ref and not self.fid_every:
            raise ValueError("--fid-ref is only read with --fid-every KIMG (how often to measure FID)")
        if self.fid_ref:
            from getfast.metrics.fid import _NAMED_DATASETS
            if self.fid_ref.lower() not in _NAMED_DATASETS and not Path(self.fid_ref).expanduser().exists():
                raise ValueError(f"fid_ref (--fid-ref) {self.fid_ref!r}: no such file or folder (and not a known "
                                 f"dataset: {', '.join(sorted(set(_NAMED_DATASETS.values())))})")
        if self.tensorboard:
            try:
                import tensorboard  # noqa: F401
            except ImportError:
                raise ValueError("--tensorboard needs the tensorboard package: pip install 'getfast[tensorboard]'") \
                    from None

    @property
    def active(self) -> bool:
        return bool(self.fid_every or self.tensorboard)


class Evaluator:
    """Called by the training loop: :meth:`log` with each record it writes, :meth:`after_step` after each step.

    ``extractor`` replaces the Inception network (a callable uint8 NHWC/float images → features; tests).
    """

    def __init__(self, cfg: EvalConfig, extractor=None, device=None):
        self.cfg = cfg
        self.extractor = extractor
        self.device = device
        self._ref = None
        self._tb = None
        self.out: Path | None = None
        self.enabled = True

    # --- the loop's calls ----------------------------------------------------------------------------------

    def start(self, out: Path, rank: int) -> None:
        self.out, self.enabled = Path(out), rank == 0
        if self.enabled and self.cfg.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.out / "tensorboard"))

    def log(self, record: dict) -> None:
        """TensorBoard scalars of a log record, at its step."""
        if self._tb is None or "step" not in record:
            return
        for k, v in record.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                self._tb.add_scalar(k, v, record["step"])
        self._tb.flush()

    def due(self, nimg_before: int, nimg: int, last: bool) -> bool:
        """Whether a multiple of ``fid_every`` kimg was passed in this step (or it is the last step)."""
        if not self.cfg.fid_every:
            return False
        every = self.cfg.fid_every * 1000
        return last or math.floor(nimg / every) > math.floor(nimg_before / every)

    def after_step(self, method, ema_module, step: int, nimg_before: int, nimg: int, last: bool, logger) -> None:
        if not self.enabled or not self.due(nimg_before, nimg, last):
            return
        if not hasattr(method, "sample_grid"):
            raise ValueError(f"--fid-every: {type(method).__name__} cannot sample images (no sample_grid)")
        rec = {"step": step, "kimg": nimg / 1000, **self.fid(method, ema_module)}
        logger.write(rec)
        self.log(rec)
        self.plot()

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    # --- FID ------------------------------------------------------------------------------------------------

    def fid(self, method, ema_module) -> dict:
        """FID of ``cfg.fid_n`` images of ``method.sample_grid(ema_module, b)`` (seed 0 each time) against the
        reference; the training RNG streams are restored afterwards."""
        from getfast.metrics.fid import _resolve_extractor, fid_from_generator, reference_stats
        t0 = time.time()
        ext = _resolve_extractor(self.extractor, False, self.device)
        if self._ref is None:
            self._ref = reference_stats(self.cfg.fid_ref, n=self.cfg.fid_n, batch_size=self.cfg.fid_batch,
                                        extractor=ext, device=self.device, progress=False)
        cpu = torch.get_rng_state()
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
        torch.manual_seed(0)
        try:
            with torch.no_grad():
                value = fid_from_generator(lambda b: method.sample_grid(ema_module, b).float(), self.cfg.fid_n,
                                           self._ref, self.cfg.fid_batch, extractor=ext, progress=False)
        finally:
            torch.set_rng_state(cpu)
            if cuda is not None:
                torch.cuda.set_rng_state_all(cuda)
        return {"fid": float(value), "fid_n": self.cfg.fid_n, "fid_seconds": round(time.time() - t0, 3)}

    def plot(self) -> Path | None:
        """``fid.png``: FID against kimg from the run's log."""
        from getfast.metrics.plots import plot_curves
        return plot_curves(self.out / "log.jsonl", self.out / "fid.png", keys=["fid"], x="kimg",
                           title=f"FID ({self.cfg.fid_n} images) vs. {self.cfg.fid_ref}")
