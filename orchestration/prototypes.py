"""The clustering E-step as a Ray actor beside the training workers.

Each worker encodes its own shard and ``submit``s (indices, features) as object refs; once every
rank has submitted, the first ``prototypes`` call runs ``methods.clustering.run_kmeans`` on the
assembled matrix, puts the result in the object store once, and every rank gets that same ref.
The actor is synchronous (one call at a time), so no call ever waits for another rank: waiting
happens in the workers' barrier. If the actor restarts it has lost the shards; ``prototypes``
then returns None and the workers submit again.
"""

from __future__ import annotations

import contextlib
import os
import time

import numpy as np
import ray

from methods.clustering import Prototypes, run_kmeans


@ray.remote(max_restarts=3, max_task_retries=3)
class PrototypeService:
    def __init__(self, world_size: int, num_clusters: list[int], temperature: float, seed: int,
                 niter: int = 20, nredo: int = 1, faults: dict | None = None):
        self.world_size = world_size
        self.num_samples = 0  # the training set's size, as the workers submit it
        self.num_clusters = list(num_clusters)
        self.temperature = temperature
        self.seed = seed
        self.niter, self.nredo = niter, nredo
        self.shards: dict[int, dict[int, list]] = {}  # epoch -> rank -> [indices_ref, features_ref]
        self.results: dict[int, ray.ObjectRef] = {}  # epoch -> ref of Prototypes
        self.log: dict[int, dict] = {}  # epoch -> {"ref", "ranks", "seconds"} for tests and MLflow
        self.faults = faults or {}

    def submit(self, epoch: int, rank: int, refs: list, num_samples: int) -> None:
        """Keep this rank's shard refs (passed inside a list so Ray does not resolve them) and
        the training set's size (indices run from 0 to ``num_samples - 1``)."""
        self.shards.setdefault(epoch, {})[rank] = refs
        self.num_samples = num_samples

    def prototypes(self, epoch: int, rank: int) -> list | None:
        """``[ref]`` to this epoch's Prototypes, computed on the first call; None if shards are
        missing (after a restart). Idempotent: a retried call returns the same ref."""
        if epoch not in self.results:
            shards = self.shards.get(epoch, {})
            if len(shards) < self.world_size:
                return None
            present, features = self._assemble([ray.get(shards[r]) for r in range(self.world_size)])
            self._inject_death(epoch)
            start = time.perf_counter()
            found = run_kmeans(features, self.num_clusters, self.temperature,
                               self.seed + epoch, self.niter, self.nredo)
            found.assignments = [self._expand(present, a) for a in found.assignments]
            found.epoch = epoch
            self.results[epoch] = ray.put(found)
            self.log[epoch] = {"ref": self.results[epoch].hex(), "ranks": [],
                               "seconds": time.perf_counter() - start,
                               "encoded": len(present)}
            self.shards.pop(epoch, None)
            self.results = {e: r for e, r in self.results.items() if e >= epoch - 1}
        self.log[epoch]["ranks"].append(rank)
        return [self.results[epoch]]

    def _assemble(self, parts: list) -> tuple[np.ndarray, np.ndarray]:
        """(indices [n], features [n, D]) of every image the ranks encoded, in index order.
        Images that could not be decoded are absent (n < ``num_samples``); an index out of
        range or sent twice raises ``ValueError``."""
        seen = np.zeros(self.num_samples, dtype=np.int64)
        for idx, _ in parts:
            if len(idx) and (idx.min() < 0 or idx.max() >= self.num_samples):
                raise ValueError(f"worker shards hold indices outside 0..{self.num_samples - 1}")
            np.add.at(seen, idx, 1)
        if (seen > 1).any():
            raise ValueError(f"worker shards encoded {int((seen > 1).sum())} images twice")
        present = np.flatnonzero(seen)
        # scatter every shard's rows straight to their place: one copy of the matrix
        position = np.cumsum(seen) - 1
        features = np.empty((len(present), parts[0][1].shape[1]), dtype=np.float32)
        for idx, feat in parts:
            features[position[idx]] = feat
        return present, features

    def _expand(self, present: np.ndarray, assignments: np.ndarray) -> np.ndarray:
        """Cluster ids for every index; -1 for images that were not encoded (never trained on)."""
        full = np.full(self.num_samples, -1, dtype=np.int64)
        full[present] = assignments
        return full

    def _inject_death(self, epoch: int) -> None:
        """Test hook: die once in the middle of ``faults["kill_actor_epoch"]``'s E-step."""
        from pathlib import Path

        if self.faults.get("kill_actor_epoch") == epoch:
            marker = Path(self.faults["marker_dir"]) / "actor_killed"
            if not marker.exists():
                marker.write_text(str(epoch))
                os._exit(1)

    def history(self) -> dict[int, dict]:
        return self.log

    def pid(self) -> int:
        return os.getpid()


def fetch_prototypes(service, epoch: int, rank: int, refs: list, num_samples: int, barrier,
                     all_ok) -> Prototypes:
    """Submit this rank's shard, wait for every rank, fetch the shared Prototypes.

    ``barrier()`` synchronises the ranks; ``all_ok(flag)`` is True only if every rank's flag is.
    Retries while the actor has restarted and lost shards.
    """
    for _ in range(10):
        found = None
        with contextlib.suppress(ray.exceptions.RayError):  # restarting: the next round resubmits
            ray.get(service.submit.remote(epoch, rank, refs, num_samples))
        barrier()
        try:
            answer = ray.get(service.prototypes.remote(epoch, rank))
            found = ray.get(answer[0]) if answer else None
        except ray.exceptions.RayError:
            found = None
        if all_ok(found is not None):
            return found
    raise RuntimeError(f"the prototype actor lost the shards of epoch {epoch} ten times")
