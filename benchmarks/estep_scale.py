"""The sharded E-step's reduction as the number of workers grows: bytes the prototype actor
receives and sends, and wall time per Lloyd round, at 2, 4 and 8 workers.

What is measured
    ``W`` Ray actors stand in for the Train workers: they form a gloo process group, as Ray
    Train's workers do, each holds rows r, r + W, ... of the same synthetic clustered features
    (N x D, float32) and runs ``orchestration.prototypes.sharded_prototypes`` against a real
    ``PrototypeService`` actor, exactly as ``orchestration.worker`` calls it. Two reductions:

    - ``all-reduce``: the ranks sum their per-cluster sums over the process group
      (``methods.clustering.lloyd.all_reduce_sums``) and rank 0 alone sends the total;
    - ``funnel``: every rank sends its own K x D sums and the actor adds them (before issue 46).

    The actor's ``bytes_in`` / ``bytes_out`` come from its own log (``PrototypeService.history``:
    array bytes of every payload it received and every result it handed out), per Lloyd round:
    divided by the ``niter`` + 2 rounds (init, iterations, final) of one restart. Wall time per
    round is the E-step's seconds on rank 0 over the same count, median of ``--repeats``.
    Headline: ``actor_ingress_ratio_w8_w2`` of the all-reduce path (goal: near 1.0: the actor's
    ingress does not grow with the workers); the funnel's ratio beside it (about 4).

Run: ``python benchmarks/estep_scale.py [--quick]`` (``--quick``: N = 8,000, K = 64, 5 rounds,
one repeat; default N = 40,000, K = 256, 10 rounds, 3 repeats). The last line of the output is
one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics

import numpy as np
import ray

WORLDS = (2, 4, 8)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@ray.remote(num_cpus=0)
class Rank:
    """One stand-in Train worker: a member of a gloo group holding its shard of the features."""

    def __init__(self, rank: int, world: int, port: int):
        import torch
        import torch.distributed as dist

        torch.set_num_threads(1)
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                                world_size=world)
        self.rank, self.world = rank, world

    def estep(self, service, features: np.ndarray, k: int, niter: int, all_reduce: bool) -> float:
        import torch.distributed as dist

        from methods.clustering.lloyd import all_reduce_sums
        from methods.training import all_ranks
        from orchestration.prototypes import exchange_with, sharded_prototypes

        indices = np.arange(self.rank, len(features), self.world)
        exchange = exchange_with(service, self.rank, dist.barrier, all_ranks)
        found = sharded_prototypes(exchange, 0, self.rank, indices, features[indices],
                                   len(features), [k], seed=0, niter=niter, nredo=1,
                                   reduce=all_reduce_sums if all_reduce else None)
        return found.seconds


def clustered(n: int, d: int, k: int, seed: int = 0) -> np.ndarray:
    """``n`` unit vectors around ``k`` random centres, float32 ``[n, d]``."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, d))
    x = centres[rng.integers(0, k, n)] + 0.3 * rng.normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def measure(world: int, features_ref, k: int, niter: int, all_reduce: bool) -> dict[str, float]:
    """One E-step at ``world`` ranks: the actor's bytes per round and rank 0's seconds per round."""
    from orchestration.prototypes import PrototypeService

    port = free_port()
    ranks = [Rank.remote(r, world, port) for r in range(world)]
    service = PrototypeService.options(num_cpus=0).remote(world, [k], 0.2, 0, niter, 1)
    seconds = ray.get([r.estep.remote(service, features_ref, k, niter, all_reduce) for r in ranks])
    log = ray.get(service.history.remote())[0]
    for handle in (*ranks, service):
        ray.kill(handle)
    rounds = niter + 2
    return {"in_per_round": log["bytes_in"] / rounds, "out_per_round": log["bytes_out"] / rounds,
            "s_per_round": seconds[0] / rounds}


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    n, d, k, niter, repeats = (8000, 32, 64, 5, 1) if args.quick else (40_000, 64, 256, 10, 3)
    repeats = args.repeats or repeats
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True)
    features_ref = ray.put(clustered(n, d, k))
    print(f"N = {n:,}, D = {d}, K = {k}, {niter} Lloyd iterations, 1 restart; median of {repeats}; "
          f"K x D sums = {k * d * 8 / 1e3:.0f} KB")
    print(f"{'reduction':12}{'workers':>8}{'actor in KB/round':>19}{'actor out KB/round':>20}"
          f"{'ms/round':>10}")
    table: dict[tuple[str, int], dict[str, float]] = {}
    for mode in ("all-reduce", "funnel"):
        for world in WORLDS:
            runs = [measure(world, features_ref, k, niter, mode == "all-reduce")
                    for _ in range(repeats)]
            row = {key: statistics.median(r[key] for r in runs) for key in runs[0]}
            table[mode, world] = row
            print(f"{mode:12}{world:8d}{row['in_per_round'] / 1e3:19.1f}"
                  f"{row['out_per_round'] / 1e3:20.1f}{1e3 * row['s_per_round']:10.1f}", flush=True)
    ray.shutdown()
    summary = {
        "actor_ingress_ratio_w8_w2": round(table["all-reduce", 8]["in_per_round"]
                                           / table["all-reduce", 2]["in_per_round"], 3),
        "funnel_ingress_ratio_w8_w2": round(table["funnel", 8]["in_per_round"]
                                            / table["funnel", 2]["in_per_round"], 3),
        "ms_per_round_w2_allreduce": round(1e3 * table["all-reduce", 2]["s_per_round"], 1),
        "ms_per_round_w8_allreduce": round(1e3 * table["all-reduce", 8]["s_per_round"], 1),
        "ms_per_round_w8_funnel": round(1e3 * table["funnel", 8]["s_per_round"], 1),
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
