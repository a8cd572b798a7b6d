"""Checkpoint files: rank 0's ``state.pt`` (model, optimiser, schedule, epoch, prototypes,
config, the online probe) and, for methods with per-rank state (memory-bank shards), one ``rank_<r>.pt`` each.

Everything is tensors and plain types, so every file loads with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from methods.base import Method

CHECKPOINT_FILE = "state.pt"


def save_state(path: Path, method: Method, optimizer, scheduler, epoch: int, prototypes=None,
               config: dict | None = None, probe: dict | None = None) -> None:
    """Everything a resumed run needs, as tensors and plain types (loads with weights_only=True).
    ``probe``: the online probe's ``checkpoint_state`` (None: the run has none)."""
    torch.save({"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "epoch": epoch, "prototypes": prototypes.state_dict() if prototypes else None,
                "config": config, "probe": probe}, path)


def checkpoint_file(path: Path) -> Path:
    """``path`` itself, or the ``state.pt`` inside a checkpoint directory (the form Ray Train
    writes); ``FileNotFoundError`` naming what is missing."""
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (give a state.pt file or a "
                                "checkpoint directory that holds one)")
    return path


def load_state(path: Path) -> dict:
    """Read a checkpoint file; a damaged one is a clear error naming it."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise
    except Exception as exc:  # torch raises several types, with pages of advice, for bad files
        raise ValueError(f"checkpoint {path} is unreadable ({type(exc).__name__}): it is damaged "
                         "or not a protoray checkpoint; use an earlier checkpoint") from None


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
