"""The E-step of PCL: k-means at several granularities with faiss, plus the concentration phi.

``run_kmeans`` runs anywhere numpy does: in one process for tests, in the Ray prototype actor for
distributed runs. Its result is plain numpy so it can go through Ray's object store zero-copy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import faiss
import numpy as np
import torch


@dataclass
class Prototypes:
    """One entry per granularity: centroids ``[K, C]`` (L2-normalised), concentration phi ``[K]``
    and the cluster id of every clustered sample ``[N]`` (row order of the features given)."""

    centroids: list[np.ndarray]
    density: list[np.ndarray]
    assignments: list[np.ndarray]
    epoch: int = -1
    seconds: float = field(default=0.0, compare=False)

    @property
    def num_clusters(self) -> list[int]:
        return [len(c) for c in self.centroids]

    def state_dict(self) -> dict[str, list[torch.Tensor] | int]:
        """Tensors only, so a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
        return {
            "centroids": [torch.tensor(c) for c in self.centroids],  # copies: Ray's arrays are read-only
            "density": [torch.tensor(d) for d in self.density],
            "assignments": [torch.tensor(a) for a in self.assignments],
            "epoch": self.epoch,
        }

    def on_device(self, device: torch.device | str) -> list[tuple[torch.Tensor, ...]]:
        """(centroids, density, assignments) per granularity as tensors, copied (arrays from
        Ray's object store are read-only)."""
        return [(torch.tensor(c, device=device), torch.tensor(d, device=device),
                 torch.tensor(a, device=device))
                for c, d, a in zip(self.centroids, self.density, self.assignments, strict=True)]

    @classmethod
    def from_state_dict(cls, state: dict) -> Prototypes:
        return cls([c.numpy() for c in state["centroids"]], [d.numpy() for d in state["density"]],
                   [a.numpy() for a in state["assignments"]], int(state["epoch"]))


def concentration(sq_distances: np.ndarray, assignments: np.ndarray, num_clusters: int,
                  temperature: float) -> np.ndarray:
    """phi for every cluster, as PCL's official ``run_kmeans`` computes it (Li et al. 2021, eq. 12).

    phi_c = mean_{z in c} ||z - c||_2 / log(|c| + 10) for clusters with more than one point; a
    cluster with at most one point gets the largest phi; then clip to the 10th..90th percentile
    and rescale so that mean(phi) equals the temperature.

    Args:
        sq_distances: squared L2 distance of every point to its centroid ``[N]`` (faiss's ``D``).
        assignments: cluster id of every point ``[N]``.
    """
    counts = np.bincount(assignments, minlength=num_clusters)
    dist_sum = np.bincount(assignments, weights=np.sqrt(np.maximum(sq_distances, 0)),
                           minlength=num_clusters)
    phi = np.zeros(num_clusters)
    many = counts > 1
    phi[many] = dist_sum[many] / counts[many] / np.log(counts[many] + 10)
    phi[~many] = phi.max()
    phi = phi.clip(np.percentile(phi, 10), np.percentile(phi, 90))
    return (temperature * phi / phi.mean()).astype(np.float32)


def run_kmeans(features: np.ndarray, num_clusters: Sequence[int], temperature: float = 0.2,
               seed: int = 0, niter: int = 20, nredo: int = 5) -> Prototypes:
    """k-means for every K in ``num_clusters`` on ``features`` ``[N, C]``.

    faiss settings follow PCL's official code (20 iterations, 5 restarts keeping the lowest
    objective, at most 1000 and at least 10 points per centroid for the training sample). Fewer
    restarts are faster but can miss even well-separated clusters (benchmarks/RESULTS.md).
    Uses the GPU when this faiss build has one.
    """
    import time

    start = time.perf_counter()
    x = np.ascontiguousarray(features, dtype=np.float32)
    if x.ndim != 2:
        raise ValueError(f"features must be [N, C], got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("features contain NaN or inf; the encoder has diverged")
    if not num_clusters:
        raise ValueError("num_clusters must list at least one cluster count")
    for k in num_clusters:
        if k < 2:
            raise ValueError(f"every cluster count must be >= 2, got {k}")
        if k > len(x):
            raise ValueError(f"cannot make K={k} clusters from N={len(x)} points; lower "
                             f"clustering.num_clusters below the number of samples")
    use_gpu = faiss.get_num_gpus() > 0 if hasattr(faiss, "get_num_gpus") else False
    centroids, density, assignments = [], [], []
    for i, k in enumerate(num_clusters):
        km = faiss.Kmeans(x.shape[1], int(k), niter=niter, nredo=nredo, seed=seed + i,
                          max_points_per_centroid=1000, min_points_per_centroid=10,
                          gpu=use_gpu, verbose=False)
        km.train(x)
        sq_dist, ids = km.index.search(x, 1)
        ids = ids[:, 0].astype(np.int64)
        c = km.centroids / np.linalg.norm(km.centroids, axis=1, keepdims=True).clip(1e-12)
        centroids.append(c.astype(np.float32))
        density.append(concentration(sq_dist[:, 0], ids, int(k), temperature))
        assignments.append(ids)
    return Prototypes(centroids, density, assignments, seconds=time.perf_counter() - start)
