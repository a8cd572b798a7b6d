"""What an E-step produces: prototypes, their concentration phi (PCL eq. 12) and each rank's
cluster ids."""

from __future__ import annotations

from dataclasses import dataclass, field

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
