"""Score functions s(a, b) of the energy exp(s / t) (Le-Khac et al. 2020, sec. 4.3)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dot_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.T


def cosine_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def bilinear_score(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a^T W b, the score of CPC (van den Oord et al. 2018, eq. 3, W_k) with ``weight`` [D, D]."""
    return a @ weight @ b.T


def euclidean_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Negative squared Euclidean distance, so that larger is more similar like the others."""
    return -torch.cdist(a, b).pow(2)
