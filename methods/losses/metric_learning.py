"""Metric-learning losses on distances: margin contrastive and triplet."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_contrastive(x0: torch.Tensor, x1: torch.Tensor, similar: torch.Tensor,
                       margin: float = 1.0) -> torch.Tensor:
    """Hadsell, Chopra & LeCun 2006, eq. 4, with D the Euclidean distance of a pair:

    L = similar * 1/2 D^2 + (1 - similar) * 1/2 max(0, margin - D)^2, averaged over pairs.
    """
    d = F.pairwise_distance(x0, x1)
    s = similar.to(d.dtype)
    return (s * 0.5 * d.pow(2) + (1 - s) * 0.5 * F.relu(margin - d).pow(2)).mean()


def triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
            margin: float = 0.2) -> torch.Tensor:
    """FaceNet's triplet loss (Schroff et al. 2015, eq. 1) on squared Euclidean distances:
    max(0, ||a - p||^2 - ||a - n||^2 + margin), averaged."""
    pos = (anchor - positive).pow(2).sum(1)
    neg = (anchor - negative).pow(2).sum(1)
    return F.relu(pos - neg + margin).mean()
