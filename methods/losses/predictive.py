"""Losses without negatives: a predictor regresses the other view's target (BYOL, SimSiam)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -p/||p|| . z/||z||, averaged (SimSiam, Chen & He 2021, arXiv 2011.10566, eq. 1);
    ``z`` is detached here: the stop-gradient of their eq. 3 is part of the loss's definition."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()
