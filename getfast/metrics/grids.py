"""Sample grids as PNG, and the float → uint8 image conversion shared with FID.

The implementations live in :mod:`getfast.io` (the training loop writes grids too, and sits below the
metrics); this module keeps the metrics-side names.
"""
from getfast.io import make_grid, save_grid, save_images, to_uint8

__all__ = ["make_grid", "save_grid", "save_images", "to_uint8"]
