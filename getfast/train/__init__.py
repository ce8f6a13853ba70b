"""The shared training loop, checkpoints and exact resume."""
from getfast.train.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from getfast.train.loop import EMA, LoopConfig, clip_and_step, load_ema, train

__all__ = ["CheckpointError", "EMA", "LoopConfig", "clip_and_step", "load_checkpoint", "load_ema",
           "save_checkpoint", "train"]
