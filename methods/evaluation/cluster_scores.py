"""How well k-means with K = number of classes recovers the labels: AMI, NMI, ARI."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def cluster_scores(features: np.ndarray, labels: np.ndarray, num_clusters: int | None = None,
                   seed: int = 0, repeats: int = 5) -> dict[str, float]:
    """AMI, NMI and ARI of faiss k-means (K = number of classes) on L2-normalised features, each
    the median over ``repeats`` k-means seeds (``seed``, ``seed + 1``, ...).

    Why a median: on fixed PCL features of the Fashion-MNIST test images, single k-means seeds
    moved the AMI by several points, and keeping the lowest objective of 10 restarts did not
    settle it, a spread as large as the differences between training settings
    (benchmarks/RESULTS.md, PCL evaluation-side checks).
    """
    from sklearn.metrics import (
        adjusted_mutual_info_score,
        adjusted_rand_score,
        normalized_mutual_info_score,
    )

    from methods.clustering.kmeans import run_kmeans

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    x = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1).numpy()
    if len(x) < 2:  # nothing to partition
        return {"ami": float("nan"), "nmi": float("nan"), "ari": float("nan")}
    k = max(2, min(num_clusters or int(np.max(labels)) + 1, len(x)))  # a few images: one each
    runs = []
    for i in range(repeats):
        pred = run_kmeans(x, [k], seed=seed + i, nredo=3).assignments[0]
        runs.append((adjusted_mutual_info_score(labels, pred),
                     normalized_mutual_info_score(labels, pred), adjusted_rand_score(labels, pred)))
    ami, nmi, ari = np.median(np.asarray(runs), axis=0)
    return {"ami": float(ami), "nmi": float(nmi), "ari": float(ari)}
