"""What a run asks of the Ray cluster, checked before anything trains: the embedded cluster
started for it, GPUs, custom resources, and how many runs (sweep trials) fit at once."""

from __future__ import annotations

import logging
import os
import sys

import ray

from orchestration.config import STREAMED, ConfigError, ExperimentConfig


def ensure_ray(address: str | None, cpus_needed: float, verbose: bool = True,
               resources: dict[str, float] | None = None) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start an embedded local cluster.

    The embedded cluster gets at least ``cpus_needed`` logical CPUs: on a 2-core laptop two
    workers plus the prototype actor still fit (they take turns on the cores), whereas a Train V2
    run that cannot be placed waits forever. ``verbose=False`` keeps the workers' and the Train
    controller's output (per-report dumps, library warnings) out of this console; it stays in
    the Ray session's log files. The embedded cluster's one node also offers the custom
    ``resources`` (``custom_resources``), so a command meant for a cluster runs here unchanged.
    """
    if ray.is_initialized():
        return
    # A worker process importing torch on a busy small machine can exceed Train's 60 s default;
    # set before ray.init so the embedded cluster's processes inherit it.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    address = address or os.environ.get("RAY_ADDRESS")
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING}
    if address:
        ray.init(address=address, **quiet)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
                 resources=resources or None, dashboard_host="127.0.0.1", **quiet)


# Train's controller retries a worker group it cannot start (each try waits for the start
# timeout); capped, so a run asking for resources that never come ends with an error
CONTROLLER_FAILURE_LIMIT = 3


def check_gpus(cfg: ExperimentConfig, joining: bool) -> None:
    """``scaling.use_gpu`` needs a GPU per worker. For an embedded cluster (this machine) the
    answer is known before Ray starts: raise ``ConfigError`` naming the field. A cluster being
    joined may add GPU nodes by autoscaling; ``check_cluster`` says what it has."""
    s = cfg.scaling
    actor = actor_gpus(cfg)
    if (s.use_gpu or actor) and not joining:
        import torch

        found = torch.cuda.device_count()
        if s.use_gpu and found < s.num_workers:
            raise ConfigError(f"scaling.use_gpu: {s.num_workers} workers need {s.num_workers} "
                              f"GPUs and this machine has {found}; set scaling.use_gpu: false or "
                              "join a GPU cluster with --address")
        if found < s.num_workers * s.use_gpu + actor:
            raise ConfigError(f"clustering.gpus: the prototype actor needs a GPU besides the "
                              f"workers' and this machine has {found}; set clustering.gpus: 0 "
                              "or join a GPU cluster with --address")


def actor_gpus(cfg: ExperimentConfig) -> int:
    """GPUs the prototype actor holds: ``clustering.gpus`` for methods that cluster."""
    return cfg.clustering.gpus if cfg.method.schedule() is not None else 0


def check_cluster(cfg: ExperimentConfig) -> None:
    """On the cluster just joined: ``ConfigError`` naming the field when no node offers a custom
    resource the config asks for (the actor or workers would wait forever), and one line when the
    cluster has fewer GPUs than the run asks for right now (the run waits for autoscaled nodes,
    at most ``CONTROLLER_FAILURE_LIMIT`` worker-group start timeouts)."""
    s = cfg.scaling
    nodes = [n["Resources"] for n in ray.nodes() if n["Alive"]]
    for field_name, wanted, copies in _asked_resources(cfg):
        for name, amount in wanted.items():
            slots = sum(int(node.get(name, 0) // amount) for node in nodes)
            if slots < copies:
                raise ConfigError(
                    f"{field_name}: {copies} x {{{name}: {amount:g}}} asked for, the cluster's nodes "
                    f"hold {slots}; start nodes with `ray start --resources "
                    f"'{{\"{name}\": {amount:g}}}'` or remove the setting")
    have = ray.cluster_resources().get("GPU", 0)
    if s.use_gpu and have < s.num_workers:
        print(f"protoray: note: scaling.use_gpu asks for {s.num_workers} GPUs and the cluster "
              f"has {have:g} now; waiting for the autoscaler (the run fails after "
              f"{CONTROLLER_FAILURE_LIMIT} worker-group start timeouts)", file=sys.stderr)


def _asked_resources(cfg: ExperimentConfig) -> list[tuple[str, dict[str, float], int]]:
    """(config field, custom resources, copies) one run asks for: the prototype actor's once
    (for methods that cluster), each Train worker's ``num_workers`` times."""
    asked = [("clustering.actor_resources", cfg.clustering.actor_resources, 1)] if (
        cfg.method.schedule() is not None) else []
    return [*asked, ("scaling.worker_resources", cfg.scaling.worker_resources,
                     cfg.scaling.num_workers)]


def custom_resources(cfg: ExperimentConfig, runs: int = 1) -> dict[str, float]:
    """The custom Ray resources ``runs`` concurrent runs ask for at most: what an embedded
    cluster's node offers so that a config written for a cluster runs on this machine too."""
    total: dict[str, float] = {}
    for _, wanted, copies in _asked_resources(cfg):
        for name, amount in wanted.items():
            total[name] = total.get(name, 0) + runs * copies * amount
    return total


def cpus_per_run(cfg: ExperimentConfig) -> float:
    """Logical CPUs one run reserves: its driver, its Train workers, for methods that cluster
    the prototype actor, and for sources that may stream Ray Data's decoding tasks."""
    s, d = cfg.scaling, cfg.data
    actor = cfg.clustering.cpus if cfg.method.schedule() is not None else 0
    decode = s.num_workers * d.decode_cpus if d.name in STREAMED and d.loader != "memory" else 0
    return 1 + s.num_workers * s.cpus_per_worker + actor + decode


def run_resources(cfg: ExperimentConfig) -> dict[str, float]:
    """Every Ray resource one run (or sweep trial) holds while it trains: ``cpus_per_run``'s
    CPUs, a GPU per Train worker with ``scaling.use_gpu`` and the actor's ``clustering.gpus``,
    and the custom resources of the workers and the prototype actor."""
    need = {"CPU": cpus_per_run(cfg), **custom_resources(cfg)}
    gpus = cfg.scaling.num_workers * cfg.scaling.use_gpu + actor_gpus(cfg)
    if gpus:
        need["GPU"] = float(gpus)
    return need


def runs_that_fit(need: dict[str, float], cluster: dict[str, float]) -> tuple[int, str]:
    """How many runs each holding ``need`` fit in ``cluster``'s totals at once, and the resource
    that limits them. Totals, not per node: a trial whose workers span nodes is placed by Ray;
    on an autoscaling cluster the count is of the nodes up now (pass --max-concurrent to plan
    for more)."""
    counts = {name: int(cluster.get(name, 0) // amount) for name, amount in need.items() if amount > 0}
    limit = min(counts, key=counts.get)
    return counts[limit], limit


def live_cluster() -> tuple[dict[str, float], bool]:
    """The joined Ray cluster's schedulable resources (CPU, GPU, custom; not memory or the
    per-node ``node:`` markers) and whether it has more than one alive node."""
    resources = {k: float(v) for k, v in ray.cluster_resources().items()
                 if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
    return resources, len([node for node in ray.nodes() if node["Alive"]]) > 1
