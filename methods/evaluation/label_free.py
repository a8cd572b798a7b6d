"""Scores of a representation that need no labels: what a run on unlabelled images can be
monitored and swept by.

- ``rankme``: the effective rank of the embedding matrix (Garrido et al., ICML 2023, "RankMe",
  eq. 1). Higher is better; a collapsed representation scores near 1, at most ``min(N, D)``.
- ``alignment``: mean squared distance between the normalised embeddings of two views of the
  same image (Wang & Isola, ICML 2020, eq. 4 with alpha = 2). Lower is better, in [0, 4].
- ``uniformity``: log of the mean Gaussian potential between normalised embeddings of different
  images (Wang & Isola 2020, eq. 5, t = 2). Lower is better, in [-4, 0].
- ``cluster_entropy``: entropy of the cluster sizes of a k-means assignment over log K, in
  [0, 1]: 1 when every cluster holds as many images, near 0 when one holds them all.

``LABEL_FREE_MODES`` says which way each is better, for a sweep's ``--mode``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from methods.data.views import augment
from methods.losses.uniformity import uniformity as uniformity_loss
from methods.training import encode

LABEL_FREE_MODES = {"rankme": "max", "alignment": "min", "uniformity": "min",
                    "cluster_entropy": "max"}
LABEL_FREE_SAMPLE = 1000  # images a monitor scores: enough for D <= 1000, and uniformity is N^2
RANKME_EPS = 1e-7  # the paper's epsilon, added to the normalised singular values


def _tensor(x: np.ndarray | torch.Tensor) -> torch.Tensor:
    return torch.as_tensor(x).float()


def rankme(embeddings: np.ndarray | torch.Tensor) -> float:
    """exp of the entropy of the singular values of ``embeddings`` ``[N, D]`` normalised to sum
    to one (RankMe, eq. 1). Raises ``ValueError`` for fewer than 2 rows."""
    z = _tensor(embeddings)
    if z.shape[0] < 2:
        raise ValueError(f"rankme needs at least 2 embeddings, got {z.shape[0]}")
    sigma = torch.linalg.svdvals(z.double())
    p = sigma / sigma.sum().clamp_min(1e-12) + RANKME_EPS
    return float(torch.exp(-(p * p.log()).sum()))


def alignment(first: np.ndarray | torch.Tensor, second: np.ndarray | torch.Tensor) -> float:
    """Mean ``||f(x) - f(y)||^2`` over rows of the two views' embeddings ``[N, D]`` (each row
    L2-normalised here)."""
    a, b = F.normalize(_tensor(first), dim=1), F.normalize(_tensor(second), dim=1)
    return float((a - b).pow(2).sum(1).mean())


def uniformity(embeddings: np.ndarray | torch.Tensor, t: float = 2.0) -> float:
    """``log mean_{i != j} exp(-t ||f(x_i) - f(x_j)||^2)`` over rows of ``[N, D]`` (normalised
    here; ``methods.losses.uniformity`` is the same formula). Raises ``ValueError`` for N < 2."""
    return float(uniformity_loss(_tensor(embeddings)[None], t))


def cluster_entropy(assignments: np.ndarray | torch.Tensor, num_clusters: int) -> float:
    """Entropy of the sizes of ``num_clusters`` clusters given each image's cluster ``[N]``
    (-1 left out), divided by ``log(num_clusters)``: 1.0 for equal sizes; NaN when none."""
    if num_clusters < 2:
        raise ValueError(f"cluster_entropy needs at least 2 clusters, got {num_clusters}")
    ids = torch.as_tensor(assignments).long().flatten()
    ids = ids[ids >= 0]  # -1: an image that was not clustered (unreadable, not encoded)
    if len(ids) == 0:
        return math.nan
    counts = torch.bincount(ids, minlength=num_clusters)
    p = counts[counts > 0].double() / counts.sum()
    return float(-(p * p.log()).sum() / math.log(num_clusters))


def label_free_scores(plain: np.ndarray | torch.Tensor, first: np.ndarray | torch.Tensor,
                      second: np.ndarray | torch.Tensor) -> dict[str, float]:
    """``rankme`` and ``uniformity`` of the un-augmented embeddings ``plain`` ``[N, D]``, and
    ``alignment`` of two augmented views' embeddings ``first``, ``second`` ``[N, D]`` of the same
    N images; NaN for each when N < 2."""
    if len(plain) < 2:
        return {"rankme": math.nan, "alignment": math.nan, "uniformity": math.nan}
    return {"rankme": rankme(plain), "alignment": alignment(first, second),
            "uniformity": uniformity(plain)}


def encoder_scores(method, images: torch.Tensor, seed: int = 0,
                   device: str | torch.device = "cpu") -> dict[str, float]:
    """``label_free_scores`` of ``method.embed`` on uint8 ``images`` ``[N, C, H, W]``: the
    un-augmented embedding at the images' own side, and two views drawn from ``method.views``
    with a generator seeded by ``seed`` (the same views every epoch, so epochs compare). Eval
    mode, no gradient; the method's training mode is restored."""
    plain = encode(method.embed, images, method, device=device, native_size=True)
    generator = torch.Generator().manual_seed(seed)
    was_training = method.training
    method.eval()
    with torch.no_grad():
        views = [torch.cat([method.embed(augment(images[i:i + 512].to(device), method.views,
                                                 generator)).float().cpu()
                            for i in range(0, len(images), 512)]) for _ in range(2)]
    method.train(was_training)
    return label_free_scores(plain, *views)
