"""From a validated config to data splits and a method: the pieces the driver, the workers,
``protoray eval`` and the benchmarks all build the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.base import Method
from methods.data import ImageDataset, load_dataset
from orchestration.config import ExperimentConfig


@dataclass
class Splits:
    train: ImageDataset  # what the method trains on and the E-step clusters
    holdout: ImageDataset  # kept out of training, queried by the online kNN each epoch
    test: ImageDataset | None  # final evaluation (None where the dataset has no test split)


def load_splits(cfg: ExperimentConfig, with_test: bool = False) -> Splits:
    """The training split minus a fixed, seeded hold-out slice for online kNN accuracy."""
    d = cfg.data
    full = load_dataset(d.name, "train", d.root, d.image_size, d.torchvision_name)
    if d.limit:
        full = full.subset(torch.arange(min(d.limit, len(full))))
    order = torch.randperm(len(full), generator=torch.Generator().manual_seed(cfg.seed))
    n_hold = min(d.knn_holdout, len(full) // 5)
    test = None
    if with_test:
        try:
            test = load_dataset(d.name, "test", d.root, d.image_size, d.torchvision_name)
        except (FileNotFoundError, ValueError):
            test = None
    return Splits(full.subset(order[n_hold:].sort().values), full.subset(order[:n_hold]), test)


def make_method(cfg: ExperimentConfig, in_channels: int, image_size: int, rank: int = 0) -> Method:
    """The configured method with seeded initialisation; each rank draws its own augmentations."""
    torch.manual_seed(cfg.seed)
    return cfg.build_method(in_channels, image_size, seed=cfg.seed * 1000 + rank)
