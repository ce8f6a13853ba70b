"""The shared training loop (it owns every optimizer step), checkpoints, exact resume and the export."""
from getfast.train.checkpoint import CheckpointError, load_checkpoint, load_ema, save_checkpoint
from getfast.train.export import export_product, save_weights
from getfast.train.loop import LoopConfig, Method, fit, train
from getfast.train.step import EMA, DivergenceError

__all__ = ["CheckpointError", "DivergenceError", "EMA", "LoopConfig", "Method", "export_product", "fit",
           "load_checkpoint", "load_ema", "save_checkpoint", "save_weights", "train"]
