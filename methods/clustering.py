"""The E-step of PCL: k-means at several granularities with faiss, plus the concentration phi.

``run_kmeans`` runs anywhere numpy does: in one process for tests, in the Ray prototype actor for
distributed runs. Its result is plain numpy so it can go through Ray's object store zero-copy.
"""

from __future__ import annotations

import functools
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
    # the sorted dataset indices ``assignments`` cover, where they cover one rank's images only
    # (the sharded E-step); None: ``assignments[i]`` is image i's cluster
    indices: np.ndarray | None = None
    seconds: float = field(default=0.0, compare=False)
    encoded: int = field(default=0, compare=False)  # images clustered

    @property
    def num_clusters(self) -> list[int]:
        return [len(c) for c in self.centroids]

    def state_dict(self) -> dict[str, list[torch.Tensor] | int]:
        """Tensors only, so a checkpoint holding it loads with ``torch.load(weights_only=True)``."""
        state = {
            "centroids": [torch.tensor(c) for c in self.centroids],  # copies: Ray's arrays are read-only
            "density": [torch.tensor(d) for d in self.density],
            "assignments": [torch.tensor(a) for a in self.assignments],
            "epoch": self.epoch,
        }
        if self.indices is not None:
            state["indices"] = torch.tensor(self.indices)
        return state

    def on_device(self, device: torch.device | str) -> list[tuple[torch.Tensor, ...]]:
        """(centroids, density, assignments) per granularity on ``device``, copied (arrays from
        Ray's object store are read-only); ``assignments[batch_indices]`` gives the clusters."""
        indices = None if self.indices is None else torch.tensor(self.indices, device=device)
        out = []
        for c, d, a in zip(self.centroids, self.density, self.assignments, strict=True):
            ids = torch.tensor(a, device=device)
            out.append((torch.tensor(c, device=device), torch.tensor(d, device=device),
                        ids if indices is None else ShardAssignments(indices, ids)))
        return out

    @classmethod
    def from_state_dict(cls, state: dict) -> Prototypes:
        indices = state.get("indices")
        return cls([c.numpy() for c in state["centroids"]], [d.numpy() for d in state["density"]],
                   [a.numpy() for a in state["assignments"]], int(state["epoch"]),
                   None if indices is None else indices.numpy())


class ShardAssignments:
    """Cluster ids of one rank's images, looked up by dataset index: ``self[batch_indices]``
    for indices in ``indices`` (sorted ``[n]``), so a rank never holds an array over all N."""

    def __init__(self, indices: torch.Tensor, ids: torch.Tensor):
        self.indices, self.ids = indices, ids

    def __getitem__(self, query: torch.Tensor) -> torch.Tensor:
        position = torch.searchsorted(self.indices, query).clamp(max=len(self.indices) - 1)
        if not bool((self.indices[position] == query).all()):
            raise IndexError("an image outside this rank's shard has no cluster here")
        return self.ids[position]


def concentration(sq_distances: np.ndarray, assignments: np.ndarray, num_clusters: int,
                  temperature: float) -> np.ndarray:
    """phi for every cluster, as PCL's official ``run_kmeans`` computes it (Li et al. 2021, eq. 12),
    from every point's squared distance ``[N]`` (faiss's ``D``) and cluster id ``[N]``."""
    counts = np.bincount(assignments, minlength=num_clusters)
    dist_sums = np.bincount(assignments, weights=np.sqrt(np.maximum(sq_distances, 0)),
                            minlength=num_clusters)
    return concentration_from_sums(dist_sums, counts, temperature)


def concentration_from_sums(dist_sums: np.ndarray, counts: np.ndarray, temperature: float
                            ) -> np.ndarray:
    """phi from per-cluster sums of L2 distances ``[K]`` and point counts ``[K]``: the formula
    needs nothing else, so shards' sums add up to the gathered result (PCL eq. 12).

    phi_c = mean_{z in c} ||z - c||_2 / log(|c| + 10) for clusters with more than one point; a
    cluster with at most one point gets the largest phi; then clip to the 10th..90th percentile
    and rescale so that mean(phi) equals the temperature.
    """
    phi = np.zeros(len(counts))
    many = counts > 1
    phi[many] = dist_sums[many] / counts[many] / np.log(counts[many] + 10)
    phi[~many] = phi.max()
    phi = phi.clip(np.percentile(phi, 10), np.percentile(phi, 90))
    return (temperature * phi / phi.mean()).astype(np.float32)


# Lloyd's k-means in pieces that shard: each shard assigns its own points and sums them per
# cluster (``shard_stats``); the sums of all shards give the update (``update_centroids``).
SPLIT_EPS = 1 / 1024  # faiss's perturbation when it splits a cluster into an empty one


@dataclass
class ClusterSums:
    """Sufficient statistics of one assignment step, additive over shards: per cluster the sum
    of its points ``[K, D]`` (float64), their count ``[K]``, the sum of their L2 distances to the
    centroid ``[K]`` (for phi), and the objective (sum of squared distances)."""

    sums: np.ndarray
    counts: np.ndarray
    dist_sums: np.ndarray
    objective: float

    def __add__(self, other: ClusterSums) -> ClusterSums:
        return ClusterSums(self.sums + other.sums, self.counts + other.counts,
                           self.dist_sums + other.dist_sums, self.objective + other.objective)


def _flat_index(centroids: np.ndarray) -> faiss.IndexFlatL2:
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def _nearest(index: faiss.IndexFlatL2, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sq_dist, ids = index.search(np.ascontiguousarray(features, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), sq_dist[:, 0]


def assign(features: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of every row: ids ``[n]`` int64 and squared distances ``[n]``, by
    an exact faiss search (what ``faiss.Kmeans`` does each iteration)."""
    return _nearest(_flat_index(centroids), features)


SUMS_CHUNK = 65536  # rows per step: the float64 copy stays small however large the shard


def _nearest_torch(centroids: torch.Tensor, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``_nearest`` as one matmul on ``centroids``' device (a worker's GPU):
    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clamped at 0 against rounding."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(centroids.device)
    sq = (x * x).sum(1, keepdim=True) - 2 * x @ centroids.T + (centroids * centroids).sum(1)
    sq_dist, ids = sq.clamp_min_(0).min(dim=1)
    return ids.cpu().numpy(), sq_dist.cpu().numpy()


def shard_sums(features: np.ndarray, centroids: np.ndarray, device: str | torch.device = "faiss"
               ) -> tuple[ClusterSums, np.ndarray]:
    """This shard's ``ClusterSums`` against ``centroids`` ``[K, D]``, and its points' ids,
    computed ``SUMS_CHUNK`` rows at a time. ``device``: ``"faiss"`` (an exact faiss search on
    the CPU) or a torch device such as ``"cuda"`` (a matmul there)."""
    k, d = centroids.shape
    if device == "faiss":
        index = _flat_index(centroids)
        nearest = functools.partial(_nearest, index)
    else:
        on_device = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
        nearest = functools.partial(_nearest_torch, on_device)
    sums = torch.zeros(k, d, dtype=torch.float64)
    counts, dist_sums = np.zeros(k, dtype=np.int64), np.zeros(k)
    ids, objective = np.empty(len(features), dtype=np.int64), 0.0
    for start in range(0, len(features), SUMS_CHUNK):
        part = np.ascontiguousarray(features[start : start + SUMS_CHUNK])
        part_ids, sq_dist = nearest(part)
        ids[start : start + len(part)] = part_ids
        # index_add_ rather than np.add.at: the same float64 sums, a fraction of the time
        sums.index_add_(0, torch.from_numpy(part_ids), torch.from_numpy(part).double())
        counts += np.bincount(part_ids, minlength=k)
        dist_sums += np.bincount(part_ids, weights=np.sqrt(np.maximum(sq_dist, 0)), minlength=k)
        objective += float(sq_dist.astype(np.float64).sum())
    return ClusterSums(sums.numpy(), counts, dist_sums, objective), ids


def update_centroids(total: ClusterSums, previous: np.ndarray, seed: int) -> np.ndarray:
    """The next centroids ``[K, D]`` from the sums over every shard. An empty cluster takes a
    slightly perturbed copy of a cluster drawn with probability growing with its size, which
    keeps both halves (faiss's ``split_clusters``); no centroid is ever NaN."""
    counts = total.counts.astype(np.float64)
    centroids = previous.astype(np.float64).copy()
    full = counts > 0
    centroids[full] = total.sums[full] / counts[full, None]
    n, k = counts.sum(), len(counts)
    rng = np.random.default_rng(seed)
    sign = np.where(np.arange(centroids.shape[1]) % 2 == 0, 1.0, -1.0)
    for empty in np.flatnonzero(counts == 0):
        j = 0
        while rng.random() >= (counts[j] - 1) / max(n - k, 1):  # faiss's pick, in turn
            j = (j + 1) % k
        centroids[empty] = centroids[j] * (1 + SPLIT_EPS * sign)
        centroids[j] = centroids[j] * (1 - SPLIT_EPS * sign)
        counts[empty] = counts[j] / 2
        counts[j] -= counts[empty]
    return centroids.astype(np.float32)


MAX_POINTS_PER_CENTROID = 1000  # PCL's faiss setting: k-means trains on at most 1000 K points


def training_mask(indices: np.ndarray, num_samples: int, k: int, seed: int,
                  max_points_per_centroid: int = MAX_POINTS_PER_CENTROID) -> np.ndarray:
    """Which of ``indices`` (a shard's dataset indices) k-means trains on: each index with the
    same seeded probability ``max_points_per_centroid * k / num_samples`` (capped at 1), decided
    by a hash of the index, so the sample is the same however the indices are sharded (faiss
    subsamples the same way, to about that many points, before its iterations)."""
    fraction = min(1.0, max_points_per_centroid * k / num_samples)
    if fraction >= 1.0:
        return np.ones(len(indices), dtype=bool)
    # splitmix64 of (index, seed): uniform bits from an integer, without holding all N
    with np.errstate(over="ignore"):  # wrapping uint64 arithmetic is the hash
        z = indices.astype(np.uint64) + np.uint64(seed) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z >> np.uint64(11)).astype(np.float64) / 2.0**53 < fraction


def init_indices(num_samples: int, k: int, seed: int) -> np.ndarray:
    """The dataset indices of the ``k`` points that start one k-means run: a seeded sample of
    every index, so the start does not depend on how the points are sharded."""
    return np.sort(np.random.default_rng(seed).choice(num_samples, size=k, replace=False))


def lloyd(shards: Sequence[np.ndarray], centroids: np.ndarray, niter: int, seed: int = 0
          ) -> tuple[np.ndarray, float]:
    """``niter`` Lloyd iterations over ``shards`` (each ``[n_s, D]``) from ``centroids``:
    per iteration every shard's sums, added, one update. Returns the centroids and the
    objective of the last assignment (what faiss compares across restarts). One process runs
    all shards here; ``orchestration.prototypes`` runs the same steps with one shard per worker."""
    objective = float("inf")
    for it in range(niter):
        parts = [shard_sums(x, centroids)[0] for x in shards]
        total = parts[0]
        for part in parts[1:]:
            total = total + part
        objective = total.objective
        centroids = update_centroids(total, centroids, seed * 1_000_003 + it)
    return centroids, objective


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
