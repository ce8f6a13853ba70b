"""Sampling: one entry point for every checkpoint (``load(ckpt) -> Sampler``), CUDA-graph replay, and
pair generation (a teacher-sampling job that writes :mod:`getfast.data.pairs` sets).

``getfast.sampling.sample_grid(SampleConfig(...))`` is the body of ``getfast sample``.
"""
from getfast.sampling.sampler import NonFiniteError, Sampler, load, resolve_device
from getfast.sampling.grid import SampleConfig, sample_grid
from getfast.sampling.pairs import PairsConfig, make_pairs

__all__ = ["NonFiniteError", "PairsConfig", "SampleConfig", "Sampler", "load", "make_pairs", "resolve_device",
           "sample_grid"]
