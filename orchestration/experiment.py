"""From a validated config to data splits and a method: the pieces the driver, the workers and
``protoray eval`` all build the same way."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

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


def save_state(path: Path, method: Method, optimizer, scheduler, epoch: int, prototypes=None,
               config: dict | None = None) -> None:
    """Everything a resumed run needs, as tensors and plain types (loads with weights_only=True)."""
    torch.save({"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch, "prototypes": prototypes.state_dict() if prototypes else None,
                "config": config}, path)


def load_state(path: Path) -> dict:
    """Read a checkpoint file; a damaged one is a clear error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types for truncated or foreign files
        raise ValueError(f"checkpoint {path} cannot be read ({type(exc).__name__}: {exc}); it is "
                         "damaged or not a protoray checkpoint. Use an earlier checkpoint.") from exc


def rank_state_path(directory: Path, rank: int) -> Path:
    return directory / f"rank_{rank}.pt"


def save_rank_state(directory: Path, rank: int, world_size: int, state: dict) -> None:
    """One rank's own state (its memory bank shard) beside rank 0's ``state.pt``."""
    torch.save({"rank": rank, "world_size": world_size, "state": state},
               rank_state_path(directory, rank))


def load_rank_state(directory: Path, rank: int, world_size: int) -> dict:
    """This rank's file of a checkpoint; a missing file or another worker count is a clear error
    (a bank sharded W ways cannot be read by a different number of workers)."""
    path = rank_state_path(directory, rank)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {directory} has no {path.name} for rank {rank}: it was "
                                "written by fewer workers; resume with the same scaling.num_workers")
    saved = load_state(path)
    if saved["world_size"] != world_size:
        raise ValueError(f"{path} holds a memory bank shard of {saved['world_size']} workers, this "
                         f"run has {world_size}; resume with scaling.num_workers: "
                         f"{saved['world_size']}")
    return saved["state"]
