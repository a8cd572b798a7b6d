"""What an E-step costs, before it runs: the rule ``clustering.strategy: auto`` chooses by and
``protoray plan`` prints.

One Lloyd iteration assigns each point of the training sample to its nearest of K centroids:
``2 n K D`` FLOP for the distance matmul (n = min(N, 1000 K), the sample faiss and
``methods.clustering.lloyd.training_mask`` draw), and the final assignment of all N points
another ``2 N K D``; per granularity ``nredo`` restarts of ``niter`` iterations.

- gather: the workers' N x D float32 features travel to the prototype actor (object store,
  across the network from other nodes) and faiss runs there on ``clustering.cpus`` threads, or
  the same arithmetic by matmul on its GPU (``clustering.gpus: 1``), its rounds in-process.
- sharded: every worker does 1/W of the arithmetic on its own device (faiss on its CPUs, a
  matmul on its GPU), and each of the ``nredo (niter + 1) + 1`` rounds per granularity adds
  the round's fixed cost (Ray calls, the barrier), a ring all-reduce of the K x D float64 sums
  and the fetch of the next K x D centroids.

The constants are measured: ``benchmarks/cost_constants.py`` on the CPU machine the tests run
on, ``benchmarks/gpu_check.py`` for the GPU (RESULTS.md, "E-step cost model"). Where no GPU has
been measured yet, ``GPU_FLOPS`` is the H100's fp32 peak at the fraction a large matmul reaches.
"""

from __future__ import annotations

from dataclasses import dataclass

from methods.clustering.lloyd import MAX_POINTS_PER_CENTROID

CPU_FLOPS_PER_THREAD = 9.9e10  # faiss exact assignment, one thread (cost_constants.py)
# no GPU lent yet: H100 SXM fp32 peak (67 TFLOP/s) x 0.6, until gpu_check.py measures it
GPU_FLOPS = 4.0e13
OBJECT_STORE_BYTES_PER_S = 1.85e9  # ray.put + get of a 256 MB matrix on one node (cost_constants.py)
NETWORK_BYTES_PER_S = 1.25e9  # 10 Gb/s between nodes: the slowest link a cluster recipe sets up
ROUND_OVERHEAD_S = 0.016  # one sharded round's fixed cost at 2 workers (cost_constants.py)


@dataclass(frozen=True)
class EStepCost:
    """Estimated seconds of one E-step by each strategy, and the FLOP behind them."""

    gather_s: float
    sharded_s: float
    flop: float  # every granularity, restart and iteration, plus the final assignments
    rounds: int  # sharded rounds

    @property
    def cheaper(self) -> str:
        return "gather" if self.gather_s <= self.sharded_s else "sharded"


def lloyd_flop(num_samples: int, k: int, dim: int, niter: int, nredo: int) -> float:
    """FLOP of one granularity's k-means: ``nredo * niter`` iterations on the training sample of
    at most ``MAX_POINTS_PER_CENTROID * k`` points, then one assignment of all of them."""
    sample = min(num_samples, MAX_POINTS_PER_CENTROID * k)
    return 2.0 * dim * k * (nredo * niter * sample + num_samples)


def estep_cost(num_samples: int, dim: int, num_clusters: list[int], niter: int, nredo: int,
               workers: int, worker_gpu: bool, worker_cpus: float, actor_cpus: float,
               multi_node: bool = True, actor_gpu: bool = False) -> EStepCost:
    """Seconds of one E-step gathered on the actor and sharded over ``workers``.

    ``worker_gpu``: the workers assign on their GPUs (else faiss on ``worker_cpus`` threads
    each); ``actor_cpus``: the actor's faiss threads, unless ``actor_gpu`` (its GPU);
    ``multi_node``: the features cross the network to reach the actor (else the object store
    of one node)."""
    flop = sum(lloyd_flop(num_samples, k, dim, niter, nredo) for k in num_clusters)
    actor_rate = GPU_FLOPS if actor_gpu else CPU_FLOPS_PER_THREAD * max(1, int(actor_cpus))
    link = min(NETWORK_BYTES_PER_S, OBJECT_STORE_BYTES_PER_S) if multi_node else \
        OBJECT_STORE_BYTES_PER_S
    gather = flop / actor_rate + num_samples * dim * 4 / link
    worker_rate = GPU_FLOPS if worker_gpu else CPU_FLOPS_PER_THREAD * max(1, int(worker_cpus))
    rounds, traffic = 0, 0.0
    for k in num_clusters:
        per_k = nredo * (niter + 1) + 1
        rounds += per_k
        # ring all-reduce: 2 (W - 1) / W of the float64 sums per rank; then the float32 centroids
        allreduce = 2 * (workers - 1) / workers * k * dim * 8 if workers > 1 else 0.0
        traffic += per_k * (allreduce + k * dim * 4) / link
    sharded = flop / workers / worker_rate + rounds * ROUND_OVERHEAD_S + traffic
    return EStepCost(gather, sharded, flop, rounds)


def config_estep_cost(cfg, num_samples: int, dim: int, multi_node: bool) -> EStepCost:
    """``estep_cost`` with the config's clustering and scaling settings (``cfg``:
    ``orchestration.config.ExperimentConfig``)."""
    c, s = cfg.clustering, cfg.scaling
    return estep_cost(num_samples, dim, c.num_clusters, c.niter, c.nredo, s.num_workers,
                      s.use_gpu, s.cpus_per_worker, c.cpus, multi_node, actor_gpu=c.gpus > 0)


def choose_strategy(cfg, num_samples: int, dim: int, multi_node: bool) -> str:
    """``clustering.strategy``, where ``auto`` is the cheaper by ``estep_cost``: digits or
    Fashion-MNIST gather (the rounds' fixed cost dominates), ImageNet-size PCL on GPU workers is
    sharded (one CPU process would take hours per E-step)."""
    if cfg.clustering.strategy != "auto":
        return cfg.clustering.strategy
    return config_estep_cost(cfg, num_samples, dim, multi_node).cheaper
