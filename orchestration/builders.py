"""From a validated config to data and a method: the pieces the driver, the workers,
``protoray eval`` and the benchmarks all build the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from methods.base import Method
from methods.data.datasets import ImageDataset, decode_table, load_dataset
from methods.data.image_files import ImageTable, check_channels, list_image_folder, list_parquet, split_folder
from orchestration.config import STREAMED, ExperimentConfig

KNN_BANK_SIZE = 5000  # training images the online kNN compares the hold-out slice against


@dataclass
class Splits:
    train: ImageDataset  # what the method trains on and the E-step clusters
    holdout: ImageDataset  # kept out of training, queried by the online kNN each epoch
    test: ImageDataset | None  # final evaluation (None where the dataset has no test split)


@dataclass
class TableSplits:
    """An image-folder or parquet source, listed but not decoded (``methods.data.image_files``)."""

    train: ImageTable
    holdout: ImageTable
    channels: int  # every image decodes to this many channels
    streams: bool  # training streams through Ray Data (``DataSection.streams``)

    @property
    def unlabelled(self) -> bool:
        """No image has a label: image files all listed -1, or parquet without a label column."""
        files = self.train.units["row_group"] < 0
        return bool((self.train.units["label"][files] < 0).all()
                    and (files.all() or self.train.label_column is None))

    @property
    def knn_bank(self) -> ImageTable:
        return _first_images(self.train, KNN_BANK_SIZE)


def _first_images(table: ImageTable, n: int) -> ImageTable:
    """The leading units holding at least ``n`` images (all of them if fewer)."""
    enough = int(np.searchsorted(np.cumsum(table.units["num_rows"]), n)) + 1
    return table.take(np.arange(min(enough, table.num_units)))


def _sample_images(table: ImageTable, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A seeded random set of units holding at least ``n`` images, and the other units (both as
    sorted positions)."""
    order = np.random.default_rng(seed).permutation(table.num_units)
    k = int(np.searchsorted(np.cumsum(table.units["num_rows"][order]), n)) + 1 if n else 0
    return np.sort(order[:k]), np.sort(order[k:])


def list_split(cfg: ExperimentConfig, split: str) -> ImageTable:
    """The units of ``split`` of an image-folder or parquet source. Raises
    ``methods.data.image_files.ImageSourceError`` (one line naming the path) when it is unusable and
    ``FileNotFoundError`` for a missing test split."""
    d = cfg.data
    root = Path(d.root)
    if d.name == "image_folder":
        return list_image_folder(split_folder(root, split), d.labels)
    folder = split_folder(root, split) if root.is_dir() else root
    return list_parquet(folder, d.image_column, d.label_column, d.labels)


def table_splits(cfg: ExperimentConfig) -> TableSplits:
    """Training units minus a seeded hold-out of whole units (at least ``data.knn_holdout``
    images, at most a fifth), the channel count and whether training streams. Reads file
    listings, parquet footers and (without ``data.channels``) image headers: no decoding."""
    d = cfg.data
    table = list_split(cfg, "train")
    if d.limit:
        table = _first_images(table, d.limit)
    channels = d.channels or check_channels(table)
    hold, rest = _sample_images(table, min(d.knn_holdout, len(table) // 5), cfg.seed)
    train = table.take(rest)
    return TableSplits(train, table.take(hold), channels, d.streams(len(train), channels))


def load_splits(cfg: ExperimentConfig, with_test: bool = False) -> Splits:
    """The training split minus a fixed, seeded hold-out slice for online kNN accuracy, decoded
    into memory. A streamed source (``TableSplits.streams``) with ``with_test`` gives the final
    evaluation a seeded sample of ``data.eval_limit`` training and test images instead."""
    if cfg.data.name in STREAMED:
        return _decoded_table_splits(cfg, with_test)
    d = cfg.data
    full = load_dataset(d.name, "train", d.root, d.image_size, d.torchvision_name, d.labels)
    if d.limit:
        full = full.subset(torch.arange(min(d.limit, len(full))))
    if d.labels == "none":  # a labelled set trained as unlabelled: its labels are never read
        full = _without_labels(full)
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed))
    n_hold = min(d.knn_holdout, len(full) // 5)
    test = None
    if with_test:
        try:
            test = load_dataset(d.name, "test", d.root, d.image_size, d.torchvision_name, d.labels)
        except (FileNotFoundError, ValueError):
            test = None
        if test is not None and d.labels == "none":
            test = _without_labels(test)
    return Splits(full.subset(order[n_hold:].sort().values), full.subset(order[:n_hold]), test)


def _without_labels(dataset: ImageDataset) -> ImageDataset:
    return ImageDataset(dataset.images, torch.full_like(dataset.labels, -1), (), dataset.skipped)


def _decoded_table_splits(cfg: ExperimentConfig, with_test: bool) -> Splits:
    d = cfg.data
    tables = table_splits(cfg)
    train, test = tables.train, None
    if with_test:
        try:
            test = list_split(cfg, "test")
        except FileNotFoundError:
            test = None
        if tables.streams:
            train = train.take(_sample_images(train, d.eval_limit, cfg.seed)[0])
            if test is not None:
                test = test.take(_sample_images(test, d.eval_limit, cfg.seed)[0])
    size, channels = d.image_size, tables.channels
    return Splits(decode_table(train, size, channels), decode_table(tables.holdout, size, channels),
                  decode_table(test, size, channels) if test is not None else None)


def eval_config(cfg: ExperimentConfig) -> ExperimentConfig | None:
    """The experiment with ``eval_data`` in place of ``data`` (what ``load_splits`` reads), or
    None without an ``eval_data`` section. Not re-validated: the training checks do not apply."""
    if cfg.eval_data is None:
        return None
    return cfg.model_copy(update={"data": cfg.eval_data, "eval_data": None})


def labelled_splits(cfg: ExperimentConfig, channels: int, side: int, with_test: bool = False,
                    own: Splits | None = None) -> Splits | None:
    """The labelled images kNN, probes and AMI/NMI/ARI are scored on: ``eval_data``'s splits
    converted to the trained encoder's ``channels`` and ``side`` (``match_images``), else the
    training source's own (``own``, already loaded, else loaded here) where its training and
    test (or hold-out) images are labelled, else None (nothing to score). ``ValueError`` for
    an ``eval_data`` set without labels."""
    other = eval_config(cfg)
    if other is None:
        splits = own or load_splits(cfg, with_test)
    else:
        splits = load_splits(other, with_test)
        splits = Splits(*(None if part is None else match_images(part, channels, side)
                          for part in (splits.train, splits.holdout, splits.test)))
        if not splits.train.is_labelled:
            raise ValueError(f"eval_data: {cfg.eval_data.name} at {cfg.eval_data.root} has no "
                             "labels; give a labelled set (class sub-folders, a label column)")
    queries = splits.test or splits.holdout
    return splits if splits.train.is_labelled and queries.is_labelled else None


def match_images(dataset: ImageDataset, channels: int, side: int) -> ImageDataset:
    """``dataset`` with ``channels`` (grayscale repeated to RGB, RGB to its ITU-R 601 luma) and a
    square ``side`` (antialiased bilinear resize), so an encoder trained on one source can be
    scored on another."""
    images = dataset.images
    if images.shape[1] != channels:
        if channels == 3:
            images = images.repeat(1, 3, 1, 1)
        else:
            weights = torch.tensor([0.299, 0.587, 0.114]).view(1, 3, 1, 1)
            images = (images.float() * weights).sum(1, keepdim=True).round().clamp(0, 255).byte()
    if images.shape[-1] != side or images.shape[-2] != side:
        images = torch.nn.functional.interpolate(images.float(), size=(side, side), mode="bilinear",
                                                 antialias=True, align_corners=False)
        images = images.round().clamp(0, 255).byte()
    return ImageDataset(images.contiguous(), dataset.labels, dataset.classes, dataset.skipped)


def make_method(cfg: ExperimentConfig, in_channels: int, image_size: int, rank: int = 0) -> Method:
    """The configured method with seeded initialisation; each rank draws its own augmentations."""
    torch.manual_seed(cfg.seed)
    return cfg.build_method(in_channels, image_size, seed=cfg.seed * 1000 + rank)
