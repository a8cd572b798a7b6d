"""State that outlives a step: EMA encoders and feature queues, all checkpointable buffers."""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F


@torch.no_grad()
def ema_update(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """theta_k <- m * theta_k + (1 - m) * theta_q (MoCo, He et al. 2020, eq. 2).

    BatchNorm running statistics are not averaged: the key encoder keeps its own, as in MoCo.
    """
    t_params = list(target.parameters())
    o_params = list(online.parameters())
    torch._foreach_mul_(t_params, momentum)
    torch._foreach_add_(t_params, o_params, alpha=1 - momentum)


def check_momentum(value: float, field: str = "method.momentum") -> None:
    """An EMA or memory-bank momentum must lie in [0, 1): at 1 nothing would ever update."""
    if not 0 <= value < 1:
        raise ValueError(f"{field} must be in [0, 1), got {value}")


def cosine_momentum(base: float, progress: float) -> float:
    """tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2 with k / K = ``progress``: BYOL's target
    momentum schedule (Grill et al. 2020, sec. 3.2), also MoCo v3's and DINO's."""
    return 1 - (1 - base) * (math.cos(math.pi * progress) + 1) / 2


def momentum_copy(online: nn.Module) -> nn.Module:
    """A frozen copy of ``online`` to be updated only by ``ema_update``."""
    import copy

    target = copy.deepcopy(online)
    for p in target.parameters():
        p.requires_grad_(False)
    return target


class FeatureQueue(nn.Module):
    """A FIFO of L2-normalised keys ``[K, C]`` (MoCo's dictionary), kept as buffers so it is in
    the state dict and therefore in every checkpoint."""

    def __init__(self, size: int, dim: int):
        super().__init__()
        if size < 1:
            raise ValueError(f"queue size must be >= 1, got {size}")
        self.register_buffer("keys", F.normalize(torch.randn(size, dim), dim=1))
        self.register_buffer("ptr", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest entries with ``keys`` (wrapping round; any batch size)."""
        keys = keys[-len(self.keys):]
        idx = (self.ptr + torch.arange(len(keys), device=keys.device)) % len(self.keys)
        self.keys[idx] = keys.to(self.keys.dtype)
        self.ptr.copy_((self.ptr + len(keys)) % len(self.keys))


class MemoryBank(nn.Module):
    """One L2-normalised feature per training image (InstDisc's memory bank, Wu et al. 2018,
    sec. 3.1), holding only this rank's shard.

    Rank r owns images r, r + W, r + 2W, ... (the fixed shard ``training.epoch_batches`` gives
    it), so image i is row i // W and a rank reads and writes only its own rows: no traffic
    between ranks. Empty until ``allocate``, which needs the dataset size and the rank. The rows
    are a non-persistent buffer: they differ by rank, so they go into each rank's own checkpoint
    file (``Method.rank_state``), not into the model state that rank 0 saves.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim, self.rank, self.world_size = dim, 0, 1
        self.register_buffer("features", torch.empty(0, dim), persistent=False)

    @torch.no_grad()
    def allocate(self, num_samples: int, rank: int, world_size: int,
                 generator: torch.Generator) -> None:
        """Random unit rows for the images ``rank::world_size`` of ``num_samples``."""
        self.rank, self.world_size = rank, world_size
        rows = len(range(rank, num_samples, world_size))
        init = F.normalize(torch.randn(rows, self.dim, generator=generator), dim=1)
        self.features = init.to(self.features.device)

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        if len(self.features) == 0:
            raise RuntimeError("the memory bank is empty: call Method.bind_data before training")
        if bool((indices % self.world_size != self.rank).any()):
            raise ValueError(f"rank {self.rank} of {self.world_size} was given images outside its "
                             "shard; batches must come from training.epoch_batches")
        return indices // self.world_size

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The stored features of dataset images ``indices`` (all in this rank's shard)."""
        return self.features[self.rows(indices)]

    def sample(self, count: int, generator: torch.Generator) -> torch.Tensor:
        """``count`` rows drawn uniformly with replacement: the noise distribution P_n = 1/n."""
        picks = torch.randint(len(self.features), (count,), generator=generator)
        return self.features[picks.to(self.features.device)]

    @torch.no_grad()
    def update(self, indices: torch.Tensor, features: torch.Tensor, momentum: float) -> None:
        """v_i <- normalise(m * v_i + (1 - m) * f_i): the proximal update of sec. 3.4 in the
        authors' code's form (m = 0.5)."""
        rows = self.rows(indices)
        mixed = momentum * self.features[rows] + (1 - momentum) * features.to(self.features.dtype)
        self.features[rows] = F.normalize(mixed, dim=1)
