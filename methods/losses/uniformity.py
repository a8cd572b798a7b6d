"""The uniformity term of Wang & Isola 2020 as a loss (ICL-MSR's L_uni)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def uniformity(vectors: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Gaussian-potential uniformity (Wang & Isola 2020, arXiv 2005.10242, eq. 5) among the n
    vectors of each row, as ICL-MSR's L_uni:

        L_uni = log mean_{i != j} exp(-t ||a_i - a_j||^2) = log mean_{i != j} exp(2t a_i.a_j - 2t)

    for L2-normalised a_i; averaged over rows.

    Args:
        vectors: ``[B, n, c]`` (normalised here), n >= 2.
    """
    n = vectors.shape[1]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 vectors per row, got {n}")
    a = F.normalize(vectors, dim=2)
    energy = 2 * t * (a @ a.transpose(1, 2)) - 2 * t  # [B, n, n]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=a.device)
    per_row = energy[:, off_diagonal].logsumexp(dim=1) - math.log(n * (n - 1))
    return per_row.mean()
