"""The clustering E-step, coordinated by a Ray actor beside the training workers.

The actor runs *rounds*: every rank ``contribute``s a payload under the round's key, the ranks
meet in a barrier, and the first ``outcome`` call after the last contribution reduces the
payloads, puts the result in the object store once and hands every rank that one ref. The actor
is synchronous (one call at a time), so no call ever waits for another rank; waiting happens in
the workers' barrier. The actor keeps nothing between rounds that a round needs: if it restarts,
``outcome`` returns None and the workers contribute again (``exchange``).

Two strategies (``clustering.strategy``):
- gather: one round; each rank sends (indices, features) and the actor runs
  ``methods.clustering.run_kmeans`` on the assembled matrix (faiss, one process), or, when it
  holds a GPU (``clustering.gpus: 1``), the sharded algorithm below with one shard, assigning
  by matmul on its GPU (``gather_on_device``).
- sharded: Lloyd's k-means with the features staying on their workers. Per granularity and
  restart: an init round (the rows of a seeded sample of indices, from whichever rank holds
  them), ``niter`` rounds in which the ranks sum their ``ClusterSums`` against the current
  centroids and the actor updates them (``update_centroids``: empty clusters split, seeded),
  then a final round whose summed distances give phi. With the training process group the
  ranks all-reduce the sums among themselves (``all_reduce_sums``: NCCL on GPUs, gloo on CPUs)
  and rank 0 alone sends the total, so the actor receives one K x D payload per round at any
  number of workers; without it (``reduce=None``) every rank sends its own and the actor sums
  them. The actor never holds N x D; each rank keeps the cluster ids of its own images only.

The actor logs per epoch the bytes of the payloads it received (``bytes_in``) and of the results
it handed out (``bytes_out``, once per rank that fetched them).
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable

import numpy as np
import ray

from methods.clustering.kmeans import run_kmeans
from methods.clustering.lloyd import (
    MAX_POINTS_PER_CENTROID,
    ClusterSums,
    init_indices,
    shard_sums,
    training_mask,
    update_centroids,
)
from methods.clustering.prototypes import Prototypes, concentration_from_sums
from orchestration.events import emit


@ray.remote(max_restarts=3, max_task_retries=3)
class PrototypeService:
    def __init__(self, world_size: int, num_clusters: list[int], temperature: float, seed: int,
                 niter: int = 20, nredo: int = 1, plugins: tuple = (), device: str = "faiss"):
        self.world_size = world_size
        self.device = device  # the gather's k-means: faiss on CPU threads, or "cuda"
        self.num_clusters = list(num_clusters)
        self.temperature = temperature
        self.seed = seed
        self.niter, self.nredo = niter, nredo
        self.payloads: dict[tuple, dict[int, object]] = {}  # round key -> rank -> payload
        self.outcomes: dict[tuple, ray.ObjectRef] = {}  # round key -> ref of its result
        self.log: dict[int, dict] = {}  # epoch -> {"ref", "ranks", "seconds", ...}
        self.plugins = plugins  # orchestration.events: on_actor_estep
        self.traffic: dict[int, list[int]] = {}  # epoch -> [bytes in, bytes out]
        self.result_bytes: dict[tuple, int] = {}

    def contribute(self, key: tuple, rank: int, payload) -> None:
        """Keep this rank's payload for round ``key`` (``(kind, epoch, ...)``)."""
        self.payloads.setdefault(key, {})[rank] = payload
        self.traffic.setdefault(key[1], [0, 0])[0] += payload_bytes(payload)

    def outcome(self, key: tuple, rank: int) -> list | None:
        """``[ref]`` to round ``key``'s result, computed on the first call once every rank has
        contributed; None while payloads are missing (after a restart). Idempotent."""
        if key not in self.outcomes:
            parts = self.payloads.get(key, {})
            if len(parts) < self.world_size:
                return None
            epoch = key[1]
            if key[0] in ("gather", "init") and epoch not in self.log:
                emit(self.plugins, "on_actor_estep", epoch=epoch)
                self.log[epoch] = {"ranks": [], "seconds": 0.0, "rounds": 0}
            start = time.perf_counter()
            result = reduce_round(key, [parts[r] for r in range(self.world_size)],
                                  self.num_clusters, self.temperature, self.seed, self.niter,
                                  self.nredo, self.device)
            self.outcomes[key] = ray.put(result)
            self.result_bytes[key] = payload_bytes(result)
            self.payloads.pop(key)
            entry = self.log[epoch]
            entry["seconds"] += time.perf_counter() - start
            entry["rounds"] += 1
            if key[0] in ("gather", "final"):  # the epoch's answer: what tests and MLflow see
                encoded = result.encoded if key[0] == "gather" else result[2]
                entry.update(ref=self.outcomes[key].hex(), encoded=encoded)
            # rounds of earlier epochs are done: keep only the newest epoch's
            self.outcomes = {k: r for k, r in self.outcomes.items() if k[1] >= epoch}
            self.result_bytes = {k: b for k, b in self.result_bytes.items() if k[1] >= epoch}
        if key[0] in ("gather", "final") and rank not in self.log[key[1]]["ranks"]:
            self.log[key[1]]["ranks"].append(rank)
        self.traffic.setdefault(key[1], [0, 0])[1] += self.result_bytes.get(key, 0)
        return [self.outcomes[key]]

    def history(self) -> dict[int, dict]:
        """Per epoch: ranks, seconds, rounds, the answer's ref, ``bytes_in`` and ``bytes_out``."""
        for epoch, entry in self.log.items():
            entry["bytes_in"], entry["bytes_out"] = self.traffic.get(epoch, [0, 0])
        return self.log

    def pid(self) -> int:
        return os.getpid()


def payload_bytes(value) -> int:
    """Bytes of the arrays in a round's payload or result (nested tuples, lists, dataclasses);
    an object ref counts as its id only (the gather strategy's features travel by reference,
    through the object store)."""
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, (list, tuple)):
        return sum(payload_bytes(v) for v in value)
    if isinstance(value, ClusterSums):
        return value.sums.nbytes + value.counts.nbytes + value.dist_sums.nbytes + 8
    if isinstance(value, Prototypes):
        return sum(payload_bytes(getattr(value, f)) for f in ("centroids", "density", "assignments"))
    return 8  # a number, None, a ref's id


def reduce_round(key: tuple, parts: list, num_clusters: list[int], temperature: float,
                 seed: int, niter: int, nredo: int, device: str = "faiss"):
    """The result of round ``key`` from every rank's payload (``parts[r]`` from rank r).

    gather: [indices_ref, features_ref, num_samples] -> Prototypes (faiss in this process, or
    ``gather_on_device`` when ``device`` is a torch device).
    init: (positions in the seeded sample, their rows) -> the starting centroids ``[K, D]``.
    iter: (ClusterSums, centroids from rank 0, None from the others) -> (next centroids, this
    assignment's objective); where the ranks all-reduced their sums, rank 0 sends the total and
    the others None.
    final: the same payloads -> (unit centroids, phi, images clustered).
    """
    kind = key[0]
    if kind == "gather":
        num_samples = parts[0][2]
        present, features = assemble([ray.get(p[:2]) for p in parts], num_samples)
        if device != "faiss":
            return gather_on_device(present, features, num_samples, key[1], num_clusters,
                                    temperature, seed, niter, nredo, device)
        found = run_kmeans(features, num_clusters, temperature, seed + key[1], niter, nredo)
        found.assignments = [expand(present, a, num_samples) for a in found.assignments]
        found.epoch, found.encoded = key[1], len(present)
        return found
    if kind == "init":
        k = sum(len(positions) for positions, _ in parts)
        centroids = np.empty((k, parts[0][1].shape[1]), dtype=np.float32)
        for positions, rows in parts:
            centroids[positions] = rows
        return centroids
    given = [sums for sums, _ in parts if sums is not None]
    total = sum(given[1:], given[0])
    if kind == "iter":
        split_seed = int(np.random.SeedSequence([seed, *key[1:]]).generate_state(1)[0])
        return update_centroids(total, parts[0][1], split_seed), total.objective
    # final: phi from the summed distances; centroids L2-normalised, as PCL's
    centroids = parts[0][1]
    unit = centroids / np.linalg.norm(centroids, axis=1, keepdims=True).clip(1e-12)
    return (unit.astype(np.float32),
            concentration_from_sums(total.dist_sums, total.counts, temperature),
            int(total.counts.sum()))


def assemble(parts: list, num_samples: int) -> tuple[np.ndarray, np.ndarray]:
    """(indices [n], features [n, D]) of every image the ranks encoded, in index order. Images
    that could not be decoded are absent (n < ``num_samples``); an index out of range or sent
    twice raises ``ValueError``."""
    seen = np.zeros(num_samples, dtype=np.int64)
    for idx, _ in parts:
        if len(idx) and (idx.min() < 0 or idx.max() >= num_samples):
            raise ValueError(f"worker shards hold indices outside 0..{num_samples - 1}")
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


def expand(present: np.ndarray, assignments: np.ndarray, num_samples: int) -> np.ndarray:
    """Cluster ids for every index; -1 for images that were not encoded (never trained on)."""
    full = np.full(num_samples, -1, dtype=np.int64)
    full[present] = assignments
    return full


Exchange = Callable[[tuple, object], object]


def exchange_with(service, rank: int, barrier: Callable[[], None],
                  all_ok: Callable[[bool], bool]) -> Exchange:
    """``exchange(key, payload)``: contribute to round ``key``, wait for every rank, return the
    round's result (the same object on every rank). ``barrier()`` synchronises the ranks;
    ``all_ok(flag)`` is True only if every rank's flag is. Contributes again while the actor has
    restarted and lost the round's payloads."""

    def exchange(key: tuple, payload):
        for _ in range(10):
            found = None
            with contextlib.suppress(ray.exceptions.RayError):  # restarting: the next try resends
                ray.get(service.contribute.remote(key, rank, payload))
            barrier()
            try:
                answer = ray.get(service.outcome.remote(key, rank))
                found = ray.get(answer[0]) if answer else None
            except ray.exceptions.RayError:
                found = None
            if all_ok(found is not None):
                return found
        raise RuntimeError(f"the prototype actor lost round {key} ten times")

    return exchange


def gathered_prototypes(exchange: Exchange, epoch: int, indices: np.ndarray,
                        features: np.ndarray, num_samples: int) -> Prototypes:
    """The gather strategy: this rank's (indices, features) go to the actor as object refs."""
    return exchange(("gather", epoch), [ray.put(indices), ray.put(features), num_samples])


def sharded_prototypes(exchange: Exchange, epoch: int, rank: int, indices: np.ndarray,
                       features: np.ndarray, num_samples: int, num_clusters: list[int],
                       seed: int, niter: int, nredo: int, device: str = "faiss",
                       reduce: Callable[[ClusterSums], ClusterSums] | None = None) -> Prototypes:
    """The sharded strategy, run identically on every rank: k-means over every rank's features
    with only K x D numbers exchanged per round. Like faiss, the iterations see a seeded sample
    of at most ``MAX_POINTS_PER_CENTROID`` K points (``training_mask``) and restarts keep the
    lowest objective. Returns Prototypes whose assignments cover this rank's ``indices`` only.
    ``device``: where this rank assigns its points (``shard_sums``: faiss, or its GPU).
    ``reduce``: sums the ranks' ``ClusterSums`` among themselves (``all_reduce_sums``), so
    only rank 0 sends them to the actor; None: every rank sends its own."""

    def payload(sums: ClusterSums, centroids: np.ndarray) -> tuple:
        if reduce is not None:
            sums = reduce(sums)
            return (sums, centroids) if rank == 0 else (None, None)
        return sums, centroids if rank == 0 else None  # the centroids travel once, from rank 0

    start = time.perf_counter()
    if np.any(np.diff(indices) <= 0):  # sorted already when shards are r, r + W, ...: no copy
        order = np.argsort(indices)
        indices, features = indices[order], features[order]
    centroids_out, density, own, encoded = [], [], [], 0
    for i, k in enumerate(num_clusters):
        run_seed = seed + epoch * 1009 + i * 101
        # like faiss: iterate on a sample of at most 1000 K points, then assign every point
        sample = features[training_mask(indices, num_samples, k, run_seed, MAX_POINTS_PER_CENTROID)]
        best, best_objective = None, float("inf")
        for redo in range(nredo):
            chosen = init_indices(num_samples, k, run_seed + redo)
            mine = np.flatnonzero(np.isin(chosen, indices))
            rows = features[np.searchsorted(indices, chosen[mine])]
            centroids = exchange(("init", epoch, i, redo), (mine, rows))
            objective = float("inf")
            for it in range(niter):
                sums, _ = shard_sums(sample, centroids, device)
                centroids, objective = exchange(("iter", epoch, i, redo, it),
                                                payload(sums, centroids))
            if objective < best_objective:
                best, best_objective = centroids, objective
        sums, ids = shard_sums(features, best, device)
        unit, phi, encoded = exchange(("final", epoch, i), payload(sums, best))
        centroids_out.append(unit)
        density.append(phi)
        own.append(ids)
    return Prototypes(centroids_out, density, own, epoch=epoch, indices=indices,
                      seconds=time.perf_counter() - start, encoded=encoded)


def gather_on_device(present: np.ndarray, features: np.ndarray, num_samples: int, epoch: int,
                     num_clusters: list[int], temperature: float, seed: int, niter: int,
                     nredo: int, device: str) -> Prototypes:
    """The gathered k-means on the actor's GPU: ``sharded_prototypes`` with one shard (every
    encoded image, ``present`` ``[n]`` and ``features`` ``[n, D]``), its rounds reduced here,
    each assignment a matmul on ``device`` in blocks of ``chunk_rows``. The same seeds, sample
    and restarts as the sharded strategy; assignments expanded to all ``num_samples`` (-1 where
    not encoded)."""

    def exchange(key: tuple, payload):
        return reduce_round(key, [payload], num_clusters, temperature, seed, niter, nredo)

    found = sharded_prototypes(exchange, epoch, 0, present, features, num_samples, num_clusters,
                               seed, niter, nredo, device)
    found.assignments = [expand(present, a, num_samples) for a in found.assignments]
    found.indices = None
    return found


def sharded_in_threads(features: np.ndarray, world: int, num_clusters: list[int],
                       temperature: float, seed: int, niter: int, nredo: int) -> list[Prototypes]:
    """The sharded E-step in this process, threads standing in for ``world`` Train workers and
    each round reduced by ``reduce_round`` as the actor does: every rank's Prototypes, rank r
    holding rows r, r + world, ... of ``features`` ``[N, D]``. For checking the protocol (tests,
    benchmarks) without Ray."""
    payloads: dict = {}
    results: dict = {}
    lock, barrier = threading.Lock(), threading.Barrier(world)
    out: list = [None] * world

    def rank(r: int) -> None:
        def exchange(key, payload):
            with lock:
                payloads.setdefault(key, {})[r] = payload
            barrier.wait()
            with lock:
                if key not in results:
                    parts = [payloads[key][s] for s in range(world)]
                    results[key] = reduce_round(key, parts, num_clusters, temperature, seed, niter,
                                                nredo)
            barrier.wait()
            return results[key]

        indices = np.arange(r, len(features), world)
        out[r] = sharded_prototypes(exchange, 0, r, indices, features[indices], len(features),
                                    num_clusters, seed, niter, nredo)

    threads = [threading.Thread(target=rank, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out
