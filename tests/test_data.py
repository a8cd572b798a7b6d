"""Dataset loaders: shapes, labels, and error messages that say how to get the data."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from methods.data.datasets import (
    DATASETS,
    FASHION_MNIST_INSTALL,
    FASHION_MNIST_ROOT,
    DatasetNotFoundError,
    ImageDataset,
    load_dataset,
    load_digits,
    load_fashion_mnist,
    load_image_folder,
)


def test_load_digits_split():
    train, test = load_digits("train"), load_digits("test")
    assert len(train) + len(test) == 1797
    assert len(test) == 450  # ceil(0.25 * 1797)
    for ds in (train, test):
        assert ds.images.dtype == torch.uint8
        assert ds.images.shape[1:] == (1, 8, 8)
        assert ds.labels.dtype == torch.int64
        assert set(ds.labels.tolist()) == set(range(10))
        assert ds.num_classes == 10 and ds.in_channels == 1 and ds.image_size == 8
        assert int(ds.images.max()) == 255
    # disjoint: no test image appears among the training images (digits has no exact duplicates
    # across this split, so a leak would show up as a shared row)
    train_rows = {bytes(r) for r in train.images.flatten(1).numpy()}
    test_rows = [bytes(r) for r in test.images.flatten(1).numpy()]
    assert sum(r in train_rows for r in test_rows) == 0
    # the split is fixed: a second load gives the same rows
    assert torch.equal(load_digits("test").images, test.images)
    with pytest.raises(ValueError, match="split"):
        load_digits("val")


def test_dataset_item_and_subset():
    ds = load_digits("test")
    index, image, label = ds[3]
    assert index == 3 and torch.equal(image, ds.images[3]) and label == int(ds.labels[3])
    sub = ds.subset([5, 1])
    assert len(sub) == 2 and torch.equal(sub.images[0], ds.images[5]) and sub[1][2] == int(ds.labels[1])
    with pytest.raises(ValueError, match="uint8"):
        ImageDataset(torch.zeros(2, 1, 4, 4), torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        ImageDataset(torch.zeros(2, 1, 4, 4, dtype=torch.uint8), torch.zeros(3, dtype=torch.long))


def test_fashion_mnist_missing_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_fashion_mnist(root=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert "apt-get install -y dataset-fashion-mnist" in message
    assert FASHION_MNIST_INSTALL in message
    assert isinstance(info.value, FileNotFoundError)


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_fashion_mnist_corrupt_file_is_named(tmp_path):
    bad = tmp_path / "train-images-idx3-ubyte.gz"
    bad.write_bytes(b"\x13\x37 this is not gzip at all" * 10)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", np.arange(10) % 10)
    with pytest.raises(ValueError, match="not a readable IDX file") as info:
        load_fashion_mnist(root=tmp_path)
    assert str(bad) in str(info.value)


def test_fashion_mnist_wrong_header_is_named(tmp_path):
    # a valid gzip holding an IDX header whose type code is not unsigned byte
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    with gzip.open(path, "wb") as f:
        f.write(struct.pack(">HBB", 0, 0x0D, 1) + struct.pack(">I", 4) + bytes(16))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(4))
    with pytest.raises(ValueError, match=str(path)):
        load_fashion_mnist(root=tmp_path, split="test")


def test_fashion_mnist_from_small_idx_files(tmp_path):
    images = np.arange(3 * 28 * 28).reshape(3, 28, 28) % 256
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array([9, 0, 4]))
    ds = load_fashion_mnist(root=tmp_path, split="test")
    assert ds.images.shape == (3, 1, 28, 28) and ds.images.dtype == torch.uint8
    np.testing.assert_array_equal(ds.images[:, 0].numpy(), images)
    assert ds.labels.tolist() == [9, 0, 4]
    assert ds.classes[9] == "Ankle boot"
    with pytest.raises(ValueError, match="split"):
        load_fashion_mnist(root=tmp_path, split="valid")


def test_fashion_mnist_installed_test_split():
    if not (FASHION_MNIST_ROOT / "t10k-images-idx3-ubyte.gz").exists():
        pytest.skip(f"Fashion-MNIST is not installed under {FASHION_MNIST_ROOT} ({FASHION_MNIST_INSTALL})")
    ds = load_fashion_mnist(split="test")
    assert ds.images.shape == (10000, 1, 28, 28)
    assert ds.images.dtype == torch.uint8
    assert ds.num_classes == 10
    assert torch.bincount(ds.labels).tolist() == [1000] * 10
    assert len(ds.classes) == 10


def _write_folder(root: Path, counts: dict[str, int], size: int = 12) -> None:
    rng = np.random.default_rng(0)
    for name, n in counts.items():
        (root / name).mkdir(parents=True)
        for i in range(n):
            pixels = rng.integers(0, 256, (size, size + 4, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_load_image_folder(tmp_path):
    _write_folder(tmp_path, {"cat": 3, "dog": 2})
    ds = load_image_folder(tmp_path, image_size=10)
    assert ds.images.shape == (5, 3, 10, 10)
    assert ds.images.dtype == torch.uint8
    assert ds.classes == ("cat", "dog")
    assert ds.labels.tolist() == [0, 0, 0, 1, 1]


def test_load_image_folder_missing_or_empty(tmp_path):
    with pytest.raises(DatasetNotFoundError, match="does not exist") as info:
        load_image_folder(tmp_path / "nope")
    assert str(tmp_path / "nope") in str(info.value)
    # an empty tree is reported as missing too, with our error naming the folder
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetNotFoundError, match="holds no images") as info:
        load_image_folder(tmp_path / "empty")
    assert str(tmp_path / "empty") in str(info.value)


def test_load_dataset_dispatch(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset") as info:
        load_dataset("imagenet-9000")
    for name in DATASETS:
        assert name in str(info.value)
    assert len(load_dataset("digits", "test")) == 450
    with pytest.raises(ValueError, match="data.root"):
        load_dataset("image_folder")
    # image_folder prefers root/<split> when it exists
    _write_folder(tmp_path / "train", {"a": 1, "b": 1})
    _write_folder(tmp_path / "test", {"a": 2, "b": 1, "c": 1})
    assert len(load_dataset("image_folder", "train", root=tmp_path, image_size=8)) == 2
    ds = load_dataset("image_folder", "test", root=tmp_path, image_size=8)
    assert len(ds) == 4 and ds.classes == ("a", "b", "c")
    with pytest.raises(DatasetNotFoundError):
        load_dataset("fashion_mnist", "train", root=tmp_path / "empty")
