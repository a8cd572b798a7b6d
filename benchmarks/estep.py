"""E-step wall time through the ``PrototypeService`` actor over a direct ``run_kmeans`` call on the
same 60,000 x 128 features, for K in 10, 50, 100.

What is measured
    Features: Fashion-MNIST's 60,000 training images projected on their top 128 principal
    components and L2-normalised (real structure, no training needed, identical for both paths).
    Direct: ``run_kmeans(features, [K])`` in this process with ``--threads`` faiss threads.
    Actor: what every epoch of a PCL run does with ``--workers`` ranks. Each simulated rank puts
    its shard (indices, features) in the object store, submits the refs to the actor, asks for
    the prototypes and fetches them; the actor (``num_cpus=--threads``, so faiss gets the same
    threads) assembles the shards, runs the same ``run_kmeans`` and puts the result once. The
    ranks run concurrently in threads of this process, as workers would, and a rank's idle time is
    from its ``submit`` until it holds the prototypes: the time a Train worker waits per epoch.

    Each figure is the median of ``--repeats`` runs, the two paths interleaved so outside load
    hits both. The ratio is actor wall / direct wall, target <= 1.15.

Run: ``python benchmarks/estep.py [--repeats 3 --threads 2 --workers 2]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import ray
import torch

from methods.clustering import run_kmeans
from methods.data import load_fashion_mnist
from orchestration.prototypes import PrototypeService

TEMPERATURE = 0.2


def pca_features(dim: int = 128) -> np.ndarray:
    images = load_fashion_mnist(split="train").images
    x = images.reshape(len(images), -1).float().div(255)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x[:10_000], full_matrices=False)  # components from a sample
    z = x @ v[:dim].T
    return torch.nn.functional.normalize(z, dim=1).numpy().astype(np.float32)


def direct(features: np.ndarray, k: int, seed: int, nredo: int) -> float:
    start = time.perf_counter()
    run_kmeans(features, [k], TEMPERATURE, seed, nredo=nredo)
    return time.perf_counter() - start


def through_actor(service, features: np.ndarray, epoch: int, workers: int) -> tuple[float, list[float]]:
    """Wall time until every rank holds the prototypes, and each rank's idle time."""
    shards = [np.arange(len(features))[r::workers] for r in range(workers)]

    def rank(r: int) -> float:
        payload = [ray.put(shards[r]), ray.put(features[shards[r]]), len(features)]
        start = time.perf_counter()
        ray.get(service.contribute.remote(("gather", epoch), r, payload))
        answer = None
        while answer is None:  # the real workers meet in a barrier; here the last submit wins
            answer = ray.get(service.outcome.remote(("gather", epoch), r))
            if answer is None:
                time.sleep(0.005)
        ray.get(answer[0])
        return time.perf_counter() - start

    start = time.perf_counter()
    with ThreadPoolExecutor(workers) as pool:
        idle = list(pool.map(rank, range(workers)))
    return time.perf_counter() - start, idle


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--ks", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--nredo", type=int, default=5, help="k-means restarts (PCL's official value)")
    args = p.parse_args()

    features = pca_features()
    import faiss

    faiss.omp_set_num_threads(args.threads)
    ray.init(num_cpus=args.threads + args.workers, include_dashboard=False)
    print(f"features {features.shape}, faiss threads {args.threads}, {args.workers} ranks, "
          f"nredo {args.nredo}, median of {args.repeats}")
    rows, epoch = {}, 0
    for k in args.ks:
        service = PrototypeService.options(num_cpus=args.threads).remote(
            args.workers, [k], TEMPERATURE, 0, 20, args.nredo)
        ray.get(service.history.remote())  # actor started before timing
        d_times, a_times, idles = [], [], []
        for repeat in range(args.repeats):
            if repeat % 2 == 0:
                d_times.append(direct(features, k, epoch, args.nredo))
            wall, idle = through_actor(service, features, epoch, args.workers)
            a_times.append(wall)
            idles.append(max(idle))
            if repeat % 2 == 1:
                d_times.append(direct(features, k, epoch, args.nredo))
            epoch += 1
        kmeans_in_actor = statistics.median(h["seconds"] for h in ray.get(service.history.remote()).values())
        ray.kill(service)
        rows[k] = {"direct_s": statistics.median(d_times), "actor_s": statistics.median(a_times),
                   "idle_s": statistics.median(idles), "kmeans_in_actor_s": kmeans_in_actor}
        rows[k]["ratio"] = rows[k]["actor_s"] / rows[k]["direct_s"]

    print(f"\n{'K':>5}{'direct s':>10}{'actor s':>10}{'k-means in actor s':>20}"
          f"{'worker idle s':>15}{'ratio':>8}")
    for k, r in rows.items():
        print(f"{k:5d}{r['direct_s']:10.2f}{r['actor_s']:10.2f}{r['kmeans_in_actor_s']:20.2f}"
              f"{r['idle_s']:15.2f}{r['ratio']:8.3f}")
    headline = {f"ratio_k{k}": round(r["ratio"], 3) for k, r in rows.items()}
    headline.update({f"worker_idle_s_k{k}": round(r["idle_s"], 2) for k, r in rows.items()})
    headline["max_ratio"] = round(max(r["ratio"] for r in rows.values()), 3)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
