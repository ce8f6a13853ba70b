"""Datasets (local files only) and noise/image pair shards."""
from getfast.data.datasets import (DatasetError, ImageDataset, load_dataset, load_digits, load_fashion_mnist,
                                   load_image_folder, load_npz, resize)

__all__ = ["DatasetError", "ImageDataset", "load_dataset", "load_digits", "load_fashion_mnist",
           "load_image_folder", "load_npz", "resize"]
from getfast.data.pairs import PairDataError, PairDataset, noise_batch, sample_noise  # noqa: E402
__all__ += ["PairDataError", "PairDataset", "noise_batch", "sample_noise"]
