"""The gathered E-step of PCL: faiss k-means at several granularities in one process, plus phi."""

from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np

from methods.clustering.prototypes import Prototypes, concentration


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
