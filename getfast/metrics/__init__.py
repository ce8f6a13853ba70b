"""FID, sample grids and training curves."""
