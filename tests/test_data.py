"""Datasets: Fashion-MNIST IDX files, digits, image folders, npz arrays; their errors; padding/resizing.

Nothing is downloaded: Fashion-MNIST comes from Debian's package location (tests skip if it is absent)
or from small IDX files written here.
"""
import gzip
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from getfast.data import DatasetError, ImageDataset, load_dataset, load_digits, load_fashion_mnist, load_image_folder, \
    load_npz, resize


pytestmark = pytest.mark.usefixtures("one_thread_module")  # fixture in conftest.py

FMNIST = Path("/usr/share/datasets/fashion-mnist")
IDX = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
       "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
needs_fmnist = pytest.mark.skipif(not (FMNIST / IDX["test"][0]).exists(), reason="dataset-fashion-mnist not installed")


# ---------------------------------------------------------------------------------------------- helpers

def write_idx(path: Path, arr: np.ndarray, magic: int | None = None, dims=None) -> Path:
    """An IDX file (big-endian header: magic 0x08 0x0<ndim>, then one uint32 per dimension), gzipped."""
    arr = np.asarray(arr, dtype=np.uint8)
    magic = 0x800 + arr.ndim if magic is None else magic
    dims = arr.shape if dims is None else dims
    raw = struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + arr.tobytes()
    path.write_bytes(gzip.compress(raw))
    return path


def small_fmnist(folder: Path, n=5, n_labels=None, split="train") -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for s in ("train", "test") if split == "both" else (split,):
        write_idx(folder / IDX[s][0], rng.integers(0, 256, (n, 4, 4)))
        write_idx(folder / IDX[s][1], rng.integers(0, 10, (n if n_labels is None else n_labels,)))
    return folder


def write_png(path: Path, arr: np.ndarray):
    from PIL import Image
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def check_range(ds: ImageDataset):
    x, _ = ds.batch(torch.arange(len(ds)))
    assert x.dtype == torch.float32
    assert x.min() >= -1 and x.max() <= 1
    return x


# ---------------------------------------------------------------------------------------------- Fashion-MNIST

@needs_fmnist
def test_fashion_mnist_from_debian_location():
    ds = load_fashion_mnist("test")
    assert ds.images.shape == (10000, 1, 28, 28) and ds.images.dtype == torch.uint8
    assert ds.labels.shape == (10000,) and ds.labels.dtype == torch.int64
    assert ds.num_classes == 10 and sorted(ds.labels.unique().tolist()) == list(range(10))
    assert torch.bincount(ds.labels).tolist() == [1000] * 10  # the test split is balanced
    x = check_range(ds)
    assert x.min() == -1 and x.max() == 1  # 0 -> -1 and 255 -> 1 exactly
    train = load_dataset("fashion-mnist")
    assert len(train) == 60000 and train.resolution == 28 and train.channels == 1


@needs_fmnist
def test_fashion_mnist_from_a_named_folder(tmp_path):
    for split in ("train", "test"):
        for f in IDX[split]:
            shutil.copy(FMNIST / f, tmp_path / f)
    ref = load_fashion_mnist("test")
    for ds in (load_fashion_mnist("test", root=tmp_path), load_dataset(str(tmp_path), split="test")):
        assert torch.equal(ds.images, ref.images) and torch.equal(ds.labels, ref.labels)
    assert len(load_dataset(str(tmp_path))) == 60000


def test_fashion_mnist_layout_small_files(tmp_path):
    d = small_fmnist(tmp_path / "fm", n=5, split="both")
    ds = load_dataset(str(d), split="test")
    assert ds.images.shape == (5, 1, 4, 4) and ds.num_classes == 10
    raw = np.frombuffer(gzip.decompress((d / IDX["test"][0]).read_bytes())[16:], np.uint8).reshape(5, 4, 4)
    assert np.array_equal(ds.images[:, 0].numpy(), raw)  # row-major, no transpose
    # a folder holding only the test split still loads its test split
    only_test = tmp_path / "only-test"
    small_fmnist(only_test, split="test")
    assert len(load_fashion_mnist("test", root=only_test)) == 5


def test_fashion_mnist_missing_file_named(tmp_path):
    d = small_fmnist(tmp_path / "fm")
    (d / IDX["train"][1]).unlink()
    with pytest.raises(DatasetError, match=IDX["train"][1]) as e:
        load_fashion_mnist("train", root=d)
    assert "missing" in str(e.value)
    with pytest.raises(DatasetError, match="missing"):
        load_fashion_mnist("train", root=tmp_path / "nowhere")


def test_fashion_mnist_truncated_gzip_named(tmp_path):
    d = small_fmnist(tmp_path / "fm", n=50)
    f = d / IDX["train"][0]
    f.write_bytes(f.read_bytes()[: len(f.read_bytes()) // 2])
    with pytest.raises(DatasetError, match=f"{f.name}.*truncated"):
        load_fashion_mnist("train", root=d)


def test_fashion_mnist_not_gzip_named(tmp_path):
    d = small_fmnist(tmp_path / "fm")
    (d / IDX["train"][0]).write_bytes(b"this is not gzip data at all")
    with pytest.raises(DatasetError, match=IDX["train"][0]):
        load_fashion_mnist("train", root=d)


def test_fashion_mnist_wrong_magic_named(tmp_path):
    d = small_fmnist(tmp_path / "fm")
    # images and labels swapped: the image file then has the label magic
    write_idx(d / IDX["train"][0], np.zeros((5, 4, 4)), magic=0x801, dims=(5, 4, 4))
    with pytest.raises(DatasetError, match=rf"{IDX['train'][0]}.*magic 0x801, expected 0x803"):
        load_fashion_mnist("train", root=d)


def test_fashion_mnist_count_mismatch_named(tmp_path):
    d = small_fmnist(tmp_path / "fm", n=5, n_labels=4)
    with pytest.raises(DatasetError, match=r"5 images.*4 labels") as e:
        load_fashion_mnist("train", root=d)
    assert IDX["train"][0] in str(e.value) and IDX["train"][1] in str(e.value)


def test_fashion_mnist_header_body_mismatch_named(tmp_path):
    d = small_fmnist(tmp_path / "fm", n=5)
    write_idx(d / IDX["train"][0], np.zeros((4, 4, 4)), dims=(5, 4, 4))  # header claims 5 images, body has 4
    with pytest.raises(DatasetError, match=rf"{IDX['train'][0]}.*header says"):
        load_fashion_mnist("train", root=d)


def test_fashion_mnist_bad_label_value(tmp_path):
    d = small_fmnist(tmp_path / "fm", n=5)
    write_idx(d / IDX["train"][1], np.array([0, 1, 2, 3, 200]))
    with pytest.raises(DatasetError, match=rf"{IDX['train'][1]}.*out of range"):
        load_fashion_mnist("train", root=d)


# ---------------------------------------------------------------------------------------------- digits

def test_digits():
    from sklearn.datasets import load_digits as skl
    ds = load_digits()
    assert ds.images.shape == (1797, 1, 8, 8) and ds.num_classes == 10 and ds.name == "digits"
    ref = skl()
    assert torch.equal(ds.labels, torch.from_numpy(ref.target.astype(np.int64)))
    x = check_range(ds)
    assert x.min() == -1 and x.max() == 1
    # 0..16 mapped linearly onto [-1, 1] (to uint8 precision)
    assert torch.allclose(x[:, 0], torch.from_numpy(ref.images).float() / 8 - 1, atol=1 / 127.5)
    xi, yi = ds[7]
    assert torch.equal(xi, x[7]) and yi == int(ref.target[7])


# ---------------------------------------------------------------------------------------------- image folders

def test_image_folder_class_subfolders(tmp_path):
    rng = np.random.default_rng(1)
    imgs = {}
    for cls, n in (("cat", 2), ("ant", 3), ("bee", 1)):  # labels follow sorted names: ant=0, bee=1, cat=2
        for i in range(n):
            a = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
            write_png(tmp_path / cls / f"{i}.png", a)
            imgs[(cls, i)] = a
    (tmp_path / "cat" / "notes.txt").write_text("not an image, ignored")
    ds = load_image_folder(tmp_path)
    assert ds.images.shape == (6, 3, 6, 6) and ds.num_classes == 3
    assert ds.labels.tolist() == [0, 0, 0, 1, 2, 2]
    assert np.array_equal(ds.images[3].permute(1, 2, 0).numpy(), imgs[("bee", 0)])
    assert np.array_equal(ds.images[5].permute(1, 2, 0).numpy(), imgs[("cat", 1)])
    check_range(ds)
    assert load_dataset(str(tmp_path)).labels.tolist() == ds.labels.tolist()


def test_image_folder_flat_grey_no_labels(tmp_path):
    a = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    write_png(tmp_path / "a.png", a)
    write_png(tmp_path / "b.png", 255 - a)
    ds = load_image_folder(tmp_path)
    assert ds.images.shape == (2, 1, 8, 8) and ds.labels is None and ds.num_classes == 0
    assert np.array_equal(ds.images[0, 0].numpy(), a)
    x, y = ds[0]
    assert y == -1


def test_image_folder_mixed_grey_and_colour(tmp_path):
    write_png(tmp_path / "a.png", np.full((4, 4), 200, np.uint8))
    write_png(tmp_path / "b.png", np.zeros((4, 4, 3), np.uint8))
    ds = load_image_folder(tmp_path)
    assert ds.images.shape == (2, 3, 4, 4) and (ds.images[0] == 200).all()


@pytest.mark.parametrize("content", [b"garbage, not a PNG", "truncated"])
def test_image_folder_unreadable_image_named(tmp_path, content):
    write_png(tmp_path / "c0" / "good.png", np.zeros((8, 8), np.uint8))
    bad = tmp_path / "c1" / "bad.png"
    write_png(bad, np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8))
    if content == "truncated":
        bad.write_bytes(bad.read_bytes()[:100])
    else:
        bad.write_bytes(content)
    with pytest.raises(DatasetError, match=r"bad\.png.*unreadable image"):
        load_image_folder(tmp_path)


def test_image_folder_errors(tmp_path):
    with pytest.raises(DatasetError, match="not a folder"):
        load_image_folder(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        load_image_folder(tmp_path / "empty")
    write_png(tmp_path / "sizes" / "a.png", np.zeros((4, 4), np.uint8))
    write_png(tmp_path / "sizes" / "b.png", np.zeros((5, 5), np.uint8))
    with pytest.raises(DatasetError, match="differ in size"):
        load_image_folder(tmp_path / "sizes")


# ---------------------------------------------------------------------------------------------- npz

def test_npz_with_labels_cifar_layout(tmp_path):
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (10, 5, 5, 3), dtype=np.uint8)  # N, H, W, C as CIFAR-10 arrays come
    y = rng.integers(0, 7, (10, 1)).astype(np.uint8)         # (N, 1) labels, as some CIFAR dumps store them
    y[0] = 6
    np.savez(tmp_path / "cifar.npz", x=x, y=y)
    ds = load_npz(tmp_path / "cifar.npz")
    assert ds.images.shape == (10, 3, 5, 5) and ds.num_classes == 7
    assert np.array_equal(ds.images.permute(0, 2, 3, 1).numpy(), x)
    assert ds.labels.dtype == torch.int64 and ds.labels.tolist() == y[:, 0].tolist()
    check_range(ds)
    assert torch.equal(load_dataset(str(tmp_path / "cifar.npz")).images, ds.images)


def test_npz_without_labels_grey(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, (4, 6, 6), dtype=np.uint8)
    np.savez_compressed(tmp_path / "g.npz", x=x)
    ds = load_npz(tmp_path / "g.npz")
    assert ds.images.shape == (4, 1, 6, 6) and ds.labels is None and ds.num_classes == 0
    assert np.array_equal(ds.images[:, 0].numpy(), x)


def test_npz_errors_name_the_file(tmp_path):
    f = tmp_path / "data.npz"
    with pytest.raises(DatasetError, match=r"missing file .*data\.npz"):
        load_npz(f)
    np.savez(f, images=np.zeros((2, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match=r"data\.npz: no array 'x'.*images"):
        load_npz(f)
    np.savez(f, x=np.zeros((2, 4, 4), np.float32))
    with pytest.raises(DatasetError, match=r"data\.npz: 'x' must be uint8.*float32"):
        load_npz(f)
    np.savez(f, x=np.zeros((2, 3, 4, 4), np.uint8))
    with pytest.raises(DatasetError, match=r"data\.npz.*channels-first"):
        load_npz(f)
    np.savez(f, x=np.zeros((2, 4, 4), np.uint8), y=np.zeros(3, np.int64))
    with pytest.raises(DatasetError, match=r"data\.npz: 3 labels in 'y' for 2 images"):
        load_npz(f)
    np.savez(f, x=np.zeros((2, 4, 4), np.uint8), y=np.array([0.5, 1.0]))
    with pytest.raises(DatasetError, match=r"data\.npz: 'y' must hold integer"):
        load_npz(f)
    np.savez(f, x=np.zeros((50, 8, 8), np.uint8))
    f.write_bytes(f.read_bytes()[:300])
    with pytest.raises(DatasetError, match=r"data\.npz: not a readable \.npz"):
        load_npz(f)
    np.save(tmp_path / "arr.npy", np.zeros((2, 4, 4), np.uint8))
    (tmp_path / "arr.npy").rename(tmp_path / "arr.npz")
    with pytest.raises(DatasetError, match=r"arr\.npz: a single \.npy"):
        load_npz(tmp_path / "arr.npz")


def test_unknown_dataset():
    with pytest.raises(DatasetError, match="unknown dataset 'no/such/thing'"):
        load_dataset("no/such/thing")


# ---------------------------------------------------------------------------------------------- pad / resize

def test_pad_to_resolution():
    ds = load_digits()
    big = load_dataset("digits", resolution=12)
    assert big.images.shape == (1797, 1, 12, 12) and big.resolution == 12
    assert torch.equal(big.images[:, :, 2:10, 2:10], ds.images)  # centred
    border = big.images.clone()
    border[:, :, 2:10, 2:10] = 0
    assert (border == 0).all()  # padding is black, i.e. -1 after scaling
    x, _ = big.batch(torch.arange(3))
    assert (x[:, :, 0] == -1).all()
    assert torch.equal(big.labels, ds.labels)
    odd = resize(ds, 11)  # odd padding: 1 before, 2 after
    assert odd.images.shape[-2:] == (11, 11) and torch.equal(odd.images[:, :, 1:9, 1:9], ds.images)
    assert resize(ds, 8) is ds


def test_resize_to_resolution():
    ds = load_digits()
    small = resize(ds, 4)
    assert small.images.shape == (1797, 1, 4, 4) and small.images.dtype == torch.uint8
    check_range(small)
    # a 2x antialiased downsampling of a constant image is the constant
    const = ImageDataset(torch.full((2, 3, 8, 8), 77, dtype=torch.uint8), None, name="c")
    assert (resize(const, 4).images == 77).all() and (resize(const, 16, mode="resize").images == 77).all()
    with pytest.raises(ValueError, match="mode"):
        resize(ds, 16, mode="crop")


def test_non_square_images():
    ds = ImageDataset(torch.zeros((2, 1, 4, 6), dtype=torch.uint8), None, name="wide")
    with pytest.raises(DatasetError, match="not square"):
        ds.resolution
    padded = resize(ds, 6)
    assert padded.images.shape == (2, 1, 6, 6) and padded.resolution == 6


def test_imagedataset_validation():
    with pytest.raises(DatasetError, match="uint8"):
        ImageDataset(torch.zeros((2, 1, 4, 4)), None, name="f")
    with pytest.raises(DatasetError, match="3 labels for 2 images"):
        ImageDataset(torch.zeros((2, 1, 4, 4), dtype=torch.uint8), torch.zeros(3, dtype=torch.int64), name="f")
