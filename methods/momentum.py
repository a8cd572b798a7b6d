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
