"""Heads attached after the backbone's pooled feature."""

from __future__ import annotations

import torch.nn as nn


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                   batch_norm: bool = False) -> nn.Sequential:
    """The MLP projection head g(.) of SimCLR (Chen et al. 2020, sec. 2.1) and MoCo v2.

    ``num_layers=1`` is MoCo v1's linear head. BatchNorm in hidden layers is the SimCLR v2 / BYOL
    variant; MoCo v2 and PCL use none.
    """
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim))
    return nn.Sequential(*layers)
