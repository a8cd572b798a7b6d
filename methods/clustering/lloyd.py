"""Lloyd's k-means in pieces that shard: assign, per-cluster sums that add over shards, the update,
the seeded start and training sample."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np
import torch

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


def flat_index(centroids: np.ndarray) -> faiss.IndexFlatL2:
    index = faiss.IndexFlatL2(centroids.shape[1])
    index.add(np.ascontiguousarray(centroids, dtype=np.float32))
    return index


def nearest_faiss(index: faiss.IndexFlatL2, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sq_dist, ids = index.search(np.ascontiguousarray(features, dtype=np.float32), 1)
    return ids[:, 0].astype(np.int64), sq_dist[:, 0]


def assign(features: np.ndarray, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Nearest centroid (L2) of every row: ids ``[n]`` int64 and squared distances ``[n]``, by
    an exact faiss search (what ``faiss.Kmeans`` does each iteration)."""
    return nearest_faiss(flat_index(centroids), features)


SUMS_CHUNK = 65536  # rows per step: the float64 copy stays small however large the shard
# bytes of the [rows, K] float32 distance block a torch assignment holds at once: at K = 100k a
# full SUMS_CHUNK block would be 26 GB
DISTANCE_BYTES = 1 << 30


def chunk_rows(k: int, device: str | torch.device) -> int:
    """Rows ``shard_sums`` assigns per step: ``SUMS_CHUNK``, fewer on a torch device so the
    distance block stays within ``DISTANCE_BYTES`` whatever K (faiss blocks its own search)."""
    if device == "faiss":
        return SUMS_CHUNK
    return max(1, min(SUMS_CHUNK, DISTANCE_BYTES // (4 * k)))


def nearest_torch(centroids: torch.Tensor, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``nearest_faiss`` as one matmul on ``centroids``' device (a worker's GPU):
    ||x - c||^2 = ||x||^2 - 2 x.c + ||c||^2, clamped at 0 against rounding."""
    x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32)).to(centroids.device)
    norms = (x * x).sum(1, keepdim=True) + (centroids * centroids).sum(1)
    sq = torch.addmm(norms, x, centroids.T, alpha=-2)  # two [rows, K] blocks in all: norms, sq
    sq_dist, ids = sq.clamp_min_(0).min(dim=1)
    return ids.cpu().numpy(), sq_dist.cpu().numpy()


def shard_sums(features: np.ndarray, centroids: np.ndarray, device: str | torch.device = "faiss"
               ) -> tuple[ClusterSums, np.ndarray]:
    """This shard's ``ClusterSums`` against ``centroids`` ``[K, D]``, and its points' ids,
    computed ``chunk_rows`` rows at a time. ``device``: ``"faiss"`` (an exact faiss search on
    the CPU) or a torch device such as ``"cuda"`` (a matmul there)."""
    k, d = centroids.shape
    if device == "faiss":
        index = flat_index(centroids)
        nearest = functools.partial(nearest_faiss, index)
    else:
        on_device = torch.from_numpy(np.ascontiguousarray(centroids, dtype=np.float32)).to(device)
        nearest = functools.partial(nearest_torch, on_device)
    sums = torch.zeros(k, d, dtype=torch.float64)
    counts, dist_sums = np.zeros(k, dtype=np.int64), np.zeros(k)
    ids, objective = np.empty(len(features), dtype=np.int64), 0.0
    rows = chunk_rows(k, device)
    for start in range(0, len(features), rows):
        part = np.ascontiguousarray(features[start : start + rows])
        part_ids, sq_dist = nearest(part)
        ids[start : start + len(part)] = part_ids
        # index_add_ rather than np.add.at: the same float64 sums, a fraction of the time
        sums.index_add_(0, torch.from_numpy(part_ids), torch.from_numpy(part).double())
        counts += np.bincount(part_ids, minlength=k)
        dist_sums += np.bincount(part_ids, weights=np.sqrt(np.maximum(sq_dist, 0)), minlength=k)
        objective += float(sq_dist.astype(np.float64).sum())
    return ClusterSums(sums.numpy(), counts, dist_sums, objective), ids


def all_reduce_sums(sums: ClusterSums, device: str | torch.device = "cpu") -> ClusterSums:
    """``sums`` summed over every rank of the default torch.distributed group, in one
    all-reduce of ``K * D + 2K + 1`` float64 numbers on ``device`` (the group's: a CUDA device
    for NCCL, the CPU for gloo). Ring all-reduce moves about twice that per rank whatever the
    number of ranks, so no process receives W copies. Counts stay exact below 2^53."""
    import torch.distributed as dist

    k, d = sums.sums.shape
    packed = torch.cat([torch.from_numpy(sums.sums).flatten(),
                        torch.from_numpy(sums.counts.astype(np.float64)),
                        torch.from_numpy(sums.dist_sums.astype(np.float64)),
                        torch.tensor([sums.objective], dtype=torch.float64)]).to(device)
    dist.all_reduce(packed)
    packed = packed.cpu().numpy()
    return ClusterSums(packed[: k * d].reshape(k, d), np.rint(packed[k * d : k * d + k]).astype(np.int64),
                       packed[k * d + k : k * d + 2 * k], float(packed[-1]))


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
