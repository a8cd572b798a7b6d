"""From a validated config to data splits and a method: the pieces the driver, the workers,
``protoray eval`` and the benchmarks all build the same way."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from methods.backbones import build_backbone
from methods.base import Method
from methods.data import ImageDataset, load_dataset
from methods.registry import build_method
from methods.views import view_spec
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
    overrides = {} if cfg.data.crop_min_scale is None else {"crop_scale": (cfg.data.crop_min_scale, 1.0)}
    size = cfg.data.view_size or image_size  # below the images' side: more epochs per hour
    views = view_spec(cfg.data.views, size=size, **overrides)
    backbone = build_backbone(cfg.model.backbone, in_channels, size)
    method = build_method(cfg.method.name, backbone, views, seed=cfg.seed * 1000 + rank,
                          regularizer=cfg.method.regularizer, **cfg.method.hparams)
    return method
