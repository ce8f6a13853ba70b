"""The shared training loop (it owns every optimizer step), checkpoints, exact resume and the export."""
from getfast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from getfast.train.loop import (EMA, DivergenceError, LoopConfig, Method, export_product, fit, load_ema, save_weights,
                                train)

__all__ = ["CheckpointError", "DivergenceError", "EMA", "LoopConfig", "Method", "export_product", "fit",
           "load_checkpoint", "load_ema", "save_checkpoint", "save_weights", "train"]
