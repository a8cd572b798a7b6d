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

``--strategies``: gather against sharded (issue 36)
    Each (N, K, strategy) is one Ray Train run of ``--workers`` workers (1 CPU each) beside the
    prototype actor (``--threads`` CPUs), running the E-step the PCL workers run
    (``gathered_prototypes`` / ``sharded_prototypes`` through ``exchange_with``), 20 iterations,
    one restart. Rank r holds images r, r + W, ...: at N = 60,000 the Fashion-MNIST features
    above, beyond that synthetic ones (D = 128, 1,000 Gaussian clusters, L2-normalised, drawn
    per index so every strategy sees the same points). Printed: E-step wall time (rank 0,
    between barriers), the peak RSS of one worker (``ru_maxrss``, features included) and of the
    actor (sampled every 0.2 s). Also the AMI against the labels of the sharded protocol
    (threads as ranks) and of faiss in one process, N = 60,000, K = 10, over 5 seeds.
    Run: ``python benchmarks/estep.py --strategies [--ns 60000 600000 6000000 --ks 100 1000]``.
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

from methods.clustering.kmeans import run_kmeans
from methods.data.datasets import load_fashion_mnist
from orchestration.prototypes import PrototypeService

TEMPERATURE = 0.2


def pca_features(dim: int = 128) -> np.ndarray:
    images = load_fashion_mnist(split="train").images
    x = images.reshape(len(images), -1).float().div(255)
    x = x - x.mean(0)
    _, _, v = torch.linalg.svd(x[:10_000], full_matrices=False)  # components from a sample
    z = x @ v[:dim].T
    return torch.nn.functional.normalize(z, dim=1).numpy().astype(np.float32)


def synthetic_features(indices: np.ndarray, dim: int = 128, centres: int = 1000) -> np.ndarray:
    """Clustered points, each drawn from a generator seeded by its own index (so any shard of
    the index space gives the same rows), L2-normalised."""
    means = np.random.default_rng(12345).normal(size=(centres, dim)).astype(np.float32)
    out = np.empty((len(indices), dim), dtype=np.float32)
    for start in range(0, len(indices), 65536):
        chunk = indices[start : start + 65536]
        rng = np.random.default_rng(int(chunk[0]))  # per chunk of the shard: cheap and fixed
        out[start : start + len(chunk)] = (means[chunk % centres]
                                           + 0.5 * rng.normal(size=(len(chunk), dim)))
    return out / np.linalg.norm(out, axis=1, keepdims=True)


def estep_worker(config: dict) -> None:
    """Ray Train loop: build this rank's shard, run one E-step with ``config["strategy"]``."""
    import resource
    import tempfile

    import ray.train
    import torch.distributed as dist

    from methods.training import all_ranks
    from orchestration.prototypes import exchange_with, gathered_prototypes, sharded_prototypes

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    n, k = config["n"], config["k"]
    indices = np.arange(rank, n, world)
    features = (np.asarray(ray.get(config["fmnist"]))[indices] if config["fmnist"] is not None
                else synthetic_features(indices))
    exchange = exchange_with(config["service"], rank, dist.barrier, all_ranks)
    dist.barrier()
    start = time.perf_counter()
    if config["strategy"] == "gather":
        gathered_prototypes(exchange, 0, indices, features, n)
    else:
        sharded_prototypes(exchange, 0, rank, indices, features, n, [k], 0, 20, 1)
    dist.barrier()
    metrics = {"estep_s": time.perf_counter() - start,
               "worker_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with tempfile.TemporaryDirectory() as d:  # Train V2 keeps metrics with a checkpoint
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(d)
                         if rank == 0 else None)


def peak_rss(pid: int, stop, out: list) -> None:
    import psutil

    process, peak = psutil.Process(pid), 0
    while not stop.is_set():
        peak = max(peak, process.memory_info().rss)
        stop.wait(0.2)
    out.append(peak / 2**20)


def one_estep(n: int, k: int, strategy: str, workers: int, threads: int, fmnist_ref, storage: str
              ) -> dict[str, float]:
    import threading

    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    service = PrototypeService.options(num_cpus=threads).remote(workers, [k], TEMPERATURE, 0, 20, 1)
    stop, actor_peak = threading.Event(), []
    watcher = threading.Thread(target=peak_rss, args=(ray.get(service.pid.remote()), stop,
                                                      actor_peak))
    watcher.start()
    trainer = TorchTrainer(
        estep_worker, scaling_config=ScalingConfig(num_workers=workers,
                                                   resources_per_worker={"CPU": 1}),
        train_loop_config={"n": n, "k": k, "strategy": strategy, "service": service,
                           "fmnist": fmnist_ref if n == 60_000 else None},
        run_config=RunConfig(storage_path=storage))
    result = trainer.fit()
    stop.set()
    watcher.join()
    ray.kill(service)
    if result.error:
        raise result.error
    return {**result.metrics, "actor_peak_mb": actor_peak[0]}


def ami_check(features: np.ndarray, labels: np.ndarray, seeds: int = 5) -> tuple[float, float]:
    """Median AMI vs the labels over ``seeds`` seeds, K = 10: the sharded protocol (2 threads as
    ranks, the reduction the actor runs) and faiss in one process (``run_kmeans``)."""
    from sklearn.metrics import adjusted_mutual_info_score

    from orchestration.prototypes import sharded_in_threads

    sharded, single = [], []
    for seed in range(seeds):
        out = sharded_in_threads(features, 2, [10], TEMPERATURE, seed, 20, 1)
        ids = np.empty(len(features), dtype=np.int64)
        for found in out:
            ids[found.indices] = found.assignments[0]
        sharded.append(adjusted_mutual_info_score(labels, ids))
        faiss_ids = run_kmeans(features, [10], TEMPERATURE, seed, nredo=1).assignments[0]
        single.append(adjusted_mutual_info_score(labels, faiss_ids))
    return statistics.median(sharded), statistics.median(single)


def compare_strategies(args) -> None:
    import tempfile

    features = pca_features()
    labels = load_fashion_mnist(split="train").labels.numpy()
    # the dashboard serves the state API that Train's PlacementGroupCleaner polls: without it a
    # finished run's cleaner removed the next run's placement group under its workers
    ray.init(num_cpus=args.threads + args.workers + 1, include_dashboard=True,
             dashboard_host="127.0.0.1", log_to_driver=False)
    fmnist_ref = ray.put(features)
    print(f"{args.workers} workers x 1 CPU, actor {args.threads} CPUs; 20 iterations, 1 restart",
          flush=True)
    rows = {}
    with tempfile.TemporaryDirectory() as storage:
        for n in args.ns:
            for k in args.ks:
                for strategy in ("gather", "sharded"):
                    out = one_estep(n, k, strategy, args.workers, args.threads, fmnist_ref,
                                    storage)
                    rows[(n, k, strategy)] = out
                    print(f"  N={n:>9,} K={k:>6,} {strategy:8} {out['estep_s']:8.1f} s  worker "
                          f"{out['worker_peak_mb']:7.0f} MB  actor {out['actor_peak_mb']:7.0f} MB",
                          flush=True)
    print(f"\n{'N':>10}{'K':>7}{'gather s':>10}{'sharded s':>11}{'ratio':>7}"
          f"{'worker MB g/s':>16}{'actor MB g/s':>15}")
    for n in args.ns:
        for k in args.ks:
            g, s = rows[(n, k, "gather")], rows[(n, k, "sharded")]
            print(f"{n:10,}{k:7,}{g['estep_s']:10.1f}{s['estep_s']:11.1f}"
                  f"{s['estep_s'] / g['estep_s']:7.2f}"
                  f"{g['worker_peak_mb']:8.0f}/{s['worker_peak_mb']:<7.0f}"
                  f"{g['actor_peak_mb']:8.0f}/{s['actor_peak_mb']:<7.0f}")
    ami_sharded, ami_faiss = ami_check(features, labels)
    print(f"\nAMI vs labels, N=60,000, K=10, median of 5 seeds: sharded {ami_sharded:.4f}, "
          f"faiss {ami_faiss:.4f}")
    lo, hi = min(args.ns), max(args.ns)
    headline = {f"{st}_s_n{n}_k{k}": round(r["estep_s"], 2) for (n, k, st), r in rows.items()}
    headline.update({
        "actor_peak_growth_sharded": round(
            max(rows[(hi, k, "sharded")]["actor_peak_mb"] / rows[(lo, k, "sharded")]["actor_peak_mb"]
                for k in args.ks) - 1, 3),
        "ami_sharded": round(ami_sharded, 4), "ami_faiss": round(ami_faiss, 4)})
    print(json.dumps(headline))


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
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help="cluster counts (default 10 50 100; --strategies: 100 1000)")
    p.add_argument("--ns", type=int, nargs="+", default=[60_000, 600_000, 6_000_000],
                   help="--strategies: dataset sizes")
    p.add_argument("--strategies", action="store_true", help="gather against sharded (issue 36)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--nredo", type=int, default=5, help="k-means restarts (PCL's official value)")
    args = p.parse_args()
    if args.strategies:
        args.ks = args.ks or [100, 1000]
        compare_strategies(args)
        return
    args.ks = args.ks or [10, 50, 100]

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
