"""Datasets as in-memory uint8 tensors, items ``(index, image, label)``.

Why in memory: the built-in sets (Fashion-MNIST, digits, a torchvision root) fit in a few hundred
MB, and the augmentation in ``views.py`` works on whole uint8 batches, so a DataLoader with
per-image workers would only add copies. Larger image folders and parquet files stream through
Ray Data instead (``orchestration.streaming``). The index travels with every item because PCL
needs to know which cluster each training image was assigned to in the E-step.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from methods.data.image_files import ImageTable, check_channels, decode_units, list_image_folder

FASHION_MNIST_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_INSTALL = "apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where the config says; the message says how to get them."""


@dataclass
class ImageDataset:
    """Images ``[N, C, H, W]`` uint8 and labels ``[N]`` int64 (``-1`` where unlabelled)."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: tuple[str, ...] = ()
    skipped: int = 0  # images of the source that could not be decoded and were left out

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} "
                             f"{tuple(self.images.shape)}")
        if len(self.labels) != len(self.images):
            raise ValueError(f"{len(self.images)} images but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[int, torch.Tensor, int]:
        return index, self.images[index], int(self.labels[index])

    @property
    def in_channels(self) -> int:
        return self.images.shape[1]

    @property
    def image_size(self) -> int:
        return self.images.shape[-1]

    @property
    def num_classes(self) -> int:
        """1 + the largest label; 0 when no image is labelled."""
        return int(self.labels.max()) + 1 if self.is_labelled else 0

    @property
    def is_labelled(self) -> bool:
        """Whether any image has a label (``-1`` is never a class)."""
        return bool((self.labels >= 0).any())

    def subset(self, indices: torch.Tensor | np.ndarray | list[int]) -> ImageDataset:
        """A new dataset of the given rows; its items are re-indexed from 0."""
        indices = torch.as_tensor(indices, dtype=torch.long)
        return ImageDataset(self.images[indices], self.labels[indices], self.classes)


def _read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not, checking its header."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", raw[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("not an unsigned-byte IDX file")
        shape = struct.unpack(f">{ndim}I", raw[4 : 4 + 4 * ndim])
        data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
        return data.reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise ValueError(f"{path} is not a readable IDX file ({exc}); reinstall it with "
                         f"`{FASHION_MNIST_INSTALL} --reinstall`") from exc


def _find(root: Path, stem: str) -> Path:
    for candidate in (root / f"{stem}.gz", root / stem):
        if candidate.exists():
            return candidate
    raise DatasetNotFoundError(
        f"Fashion-MNIST file {stem}(.gz) not found under {root}. Install the Debian package "
        f"with `{FASHION_MNIST_INSTALL}` or point data.root at a folder holding the idx files."
    )


def load_fashion_mnist(root: str | Path = FASHION_MNIST_ROOT, split: str = "train") -> ImageDataset:
    """Fashion-MNIST (60k train / 10k test, 28x28 grayscale) from the idx files on disk."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root)
    images = _read_idx(_find(root, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"))
    return ImageDataset(
        torch.from_numpy(images.copy()).unsqueeze(1),
        torch.from_numpy(labels.astype(np.int64)),
        FASHION_MNIST_CLASSES,
    )


def load_digits(split: str = "train", test_fraction: float = 0.25, seed: int = 0) -> ImageDataset:
    """scikit-learn's bundled 8x8 digits (1797 images), for tests that must run in seconds.

    The 0..16 intensities are scaled to 0..255; the split is a fixed stratified one so train and
    test never overlap whatever the caller's seed.
    """
    from sklearn.datasets import load_digits as sk_digits
    from sklearn.model_selection import train_test_split

    bunch = sk_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)
    train_idx, test_idx = train_test_split(
        np.arange(len(images)), test_size=test_fraction, random_state=seed, stratify=bunch.target
    )
    rows = {"train": train_idx, "test": test_idx}.get(split)
    if rows is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    return ImageDataset(
        torch.from_numpy(images[rows]).unsqueeze(1),
        torch.from_numpy(bunch.target[rows].astype(np.int64)),
        tuple(str(d) for d in range(10)),
    )


def decode_table(table: ImageTable, image_size: int, channels: int) -> ImageDataset:
    """Every image of ``table`` (``methods.data.image_files``) decoded in this process, resized to a
    square ``image_size``; unreadable ones are left out and counted in ``skipped``."""
    out = decode_units(table.units, image_size, channels, table.image_column, table.label_column)
    return ImageDataset(torch.from_numpy(out["image"]), torch.from_numpy(out["label"]),
                        table.classes, skipped=len(table) - len(out["index"]))


def load_image_folder(root: str | Path, image_size: int = 32, channels: int | None = None,
                      labels: str = "auto") -> ImageDataset:
    """An image folder (``root/<class>/<image>``, or a flat or nested folder without classes:
    ``list_image_folder``'s ``labels``) decoded into memory (``decode_table``); ``channels``
    None: the files' own (they must agree). For folders larger than memory, stream them
    (``data.loader: stream``)."""
    try:
        table = list_image_folder(root, labels)
    except ValueError as exc:
        raise DatasetNotFoundError(str(exc)) from None
    return decode_table(table, image_size, channels or check_channels(table))


def load_torchvision_root(name: str, root: str | Path, split: str = "train") -> ImageDataset:
    """A torchvision dataset class (``CIFAR10``, ``MNIST``, ``STL10``...) already on disk.

    ``download`` is always off: nothing is fetched at run time.
    """
    import torchvision.datasets as tvd

    cls = getattr(tvd, name, None)
    if cls is None:
        raise ValueError(f"torchvision.datasets has no dataset {name!r}")
    root = Path(root)
    try:
        if name == "STL10" or name == "SVHN":
            ds = cls(str(root), split=split, download=False)
        else:
            ds = cls(str(root), train=(split == "train"), download=False)
    except RuntimeError as exc:
        raise DatasetNotFoundError(f"torchvision {name} not found under {root} ({exc}); place the "
                                   "dataset files there (downloads are disabled)") from exc
    data = torch.as_tensor(np.asarray(ds.data))
    if data.ndim == 3:  # [N, H, W] grayscale
        data = data.unsqueeze(1)
    elif data.shape[-1] in (1, 3):  # [N, H, W, C]
        data = data.permute(0, 3, 1, 2)
    labels = getattr(ds, "targets", None)
    if labels is None:
        labels = ds.labels
    return ImageDataset(data.contiguous().to(torch.uint8), torch.as_tensor(np.asarray(labels)).long(),
                        tuple(getattr(ds, "classes", ())))


DATASETS = ("fashion_mnist", "digits", "image_folder", "parquet", "torchvision")


def load_dataset(name: str, split: str = "train", root: str | Path | None = None,
                 image_size: int = 32, torchvision_name: str = "CIFAR10",
                 labels: str = "auto") -> ImageDataset:
    """Dispatch on the config's ``data.name`` (the built-in sets and image folders; parquet
    sources load through ``orchestration.builders.load_splits``)."""
    if name == "fashion_mnist":
        return load_fashion_mnist(root or FASHION_MNIST_ROOT, split)
    if name == "digits":
        return load_digits(split)
    if name == "image_folder":
        if root is None:
            raise ValueError("data.root is required for data.name='image_folder'")
        return load_image_folder(Path(root) / split if (Path(root) / split).is_dir() else root,
                                 image_size, labels=labels)
    if name == "torchvision":
        if root is None:
            raise ValueError("data.root is required for data.name='torchvision'")
        return load_torchvision_root(torchvision_name, root, split)
    raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)}")


def check_dataset(name: str, root: str | Path | None = None) -> None:
    """Raise ``DatasetNotFoundError`` (one line, naming the path and how to fix it) when the
    training data of ``load_dataset(name, "train", root)`` is missing or unreadable, without
    decoding it: what a driver checks before it starts any worker."""
    if name == "fashion_mnist":
        root = Path(root or FASHION_MNIST_ROOT)
        for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
            path = _find(root, stem)
            opener = gzip.open if path.suffix == ".gz" else open
            try:
                with opener(path, "rb") as f:
                    header = f.read(4)
            except (OSError, EOFError) as exc:
                raise DatasetNotFoundError(f"{path} is unreadable ({type(exc).__name__}); reinstall "
                                           f"it with `{FASHION_MNIST_INSTALL} --reinstall`") from None
            if len(header) < 4 or header[:3] != b"\x00\x00\x08":
                raise DatasetNotFoundError(f"{path} is not an unsigned-byte IDX file; reinstall it "
                                           f"with `{FASHION_MNIST_INSTALL} --reinstall`")
    elif name in ("image_folder", "parquet", "torchvision"):
        if root is None:
            raise DatasetNotFoundError(f"data.root is required for data.name='{name}'")
        if not Path(root).is_dir():
            if name == "parquet" and Path(root).is_file():
                return
            what = {"image_folder": "class-per-folder image tree",
                    "parquet": "parquet file or folder of them"}.get(name, "dataset root")
            raise DatasetNotFoundError(f"data.root {root} is not a folder; point it at the {what}")
