"""``protoray plan``: what a run or sweep will ask for and do, before anything trains.

Resources per worker and per run (``orchestration.run.run_resources``), trials in parallel for a
sweep (``orchestration.sweep.trials_in_parallel``), the data loader (``DataSection.streams``),
each worker's memory, and the E-step: the strategy ``clustering.strategy`` resolves to and the
estimated seconds of each (``orchestration.cost_model``). ``protoray train`` and ``sweep`` print
``one_line`` of it when they start.
"""

from __future__ import annotations

import os

import torch

from orchestration.builders import TableSplits
from orchestration.config import ConfigError, ExperimentConfig, input_shape
from orchestration.cost_model import config_estep_cost
from orchestration.resources import live_cluster, run_resources, runs_that_fit

MODEL_STATE_FACTOR = 4  # weights, gradients and two SGD momentum buffers (momentum encoder ~ 1 more)


def parse_cluster(text: str) -> dict[str, float]:
    """``"CPU=96,GPU=8,train_slot=8"`` -> resources; ``ConfigError`` naming ``--cluster``."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, value = part.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            raise ConfigError(f"--cluster {text!r}: expected NAME=NUMBER,... (got {part!r})") from None
    return out


def local_cluster(cpus_needed: float) -> dict[str, float]:
    """What the embedded Ray cluster ``protoray train`` starts on this machine would have: at
    least ``cpus_needed`` logical CPUs (``orchestration.run.ensure_ray``), its GPUs."""
    return {"CPU": float(max(os.cpu_count() or 1, int(cpus_needed + 0.999))),
            "GPU": float(torch.cuda.device_count())}


def cluster_embed_dim(cfg: ExperimentConfig, method) -> int:
    """Width of the features ``method`` (built from ``cfg``) clusters: a forward of two images
    on the CPU."""
    channels, side = input_shape(cfg.data)
    method.eval()
    with torch.no_grad():
        return int(method.cluster_embed(torch.zeros(2, channels, cfg.data.view_size or side,
                                                    cfg.data.view_size or side)).shape[1])


def make_plan(cfg: ExperimentConfig, num_samples: int, cluster: dict[str, float],
              multi_node: bool, num_trials: int | None = None,
              max_concurrent: int | None = None) -> dict:
    """The plan as a dict (``--json`` prints it). ``num_samples``: training images;
    ``cluster``: the resources assumed; ``num_trials``: a sweep's samples (None: one run)."""
    s, d = cfg.scaling, cfg.data
    channels, side = input_shape(d)
    worker = {"CPU": s.cpus_per_worker, **({"GPU": 1.0} if s.use_gpu else {}), **s.worker_resources}
    need = run_resources(cfg)
    fits, limit = runs_that_fit(need, cluster)
    streams = d.streams(num_samples, channels)
    method = cfg.build_method(channels, side)
    params = sum(p.numel() for p in method.parameters())
    data_bytes = (d.object_store_mb * 2**20 if streams else num_samples * channels * side * side)
    plan = {
        "samples": num_samples, "cluster": cluster,
        "resources": {"per_worker": worker, "per_run": need, "workers": s.num_workers},
        "runs_that_fit": fits, "limited_by": limit,
        "loader": "stream" if streams else "memory",
        "worker_memory_bytes": int(data_bytes + MODEL_STATE_FACTOR * 4 * params),
    }
    if num_trials is not None:
        plan["trials_in_parallel"] = max(0, min(fits, num_trials, max_concurrent or num_trials))
    schedule = cfg.method.schedule()
    if schedule is not None:
        dim = cluster_embed_dim(cfg, method)
        cost = config_estep_cost(cfg, num_samples, dim, multi_node)
        strategy = cfg.clustering.strategy if cfg.clustering.strategy != "auto" else cost.cheaper
        plan["estep"] = {
            "strategy": strategy, "configured": cfg.clustering.strategy, "dim": dim,
            "seconds_est": cost.gather_s if strategy == "gather" else cost.sharded_s,
            "gather_seconds_est": cost.gather_s, "sharded_seconds_est": cost.sharded_s,
            "flop": cost.flop, "sharded_rounds": cost.rounds,
            "worker_feature_bytes": num_samples * dim * 4 // s.num_workers,
        }
        plan["worker_memory_bytes"] += plan["estep"]["worker_feature_bytes"]
    return plan


def _seconds(value: float) -> str:
    if value < 90:
        return f"{value:.2g} s"
    return f"{value / 60:.0f} min" if value < 5400 else f"{value / 3600:.1f} h"


def one_line(plan: dict) -> str:
    """``plan: 2 workers x {CPU 1}; memory loader, 0.2 GB per worker; E-step gather, est. 0.4 s
    (sharded 3.1 s)`` (plus trials in parallel for a sweep)."""
    r = plan["resources"]
    worker = ", ".join(f"{k} {v:g}" for k, v in r["per_worker"].items())
    parts = [f"plan: {r['workers']} workers x {{{worker}}}",
             f"{plan['loader']} loader, {plan['worker_memory_bytes'] / 2**30:.1f} GB per worker"]
    if "trials_in_parallel" in plan:
        parts.append(f"{plan['trials_in_parallel']} trial(s) in parallel ({plan['limited_by']} "
                     "limits)")
    if "estep" in plan:
        e = plan["estep"]
        other = "sharded" if e["strategy"] == "gather" else "gather"
        parts.append(f"E-step {e['strategy']}, est. {_seconds(e['seconds_est'])} ({other} "
                     f"{_seconds(e[other + '_seconds_est'])})")
    return "; ".join(parts)


def describe(plan: dict) -> str:
    """The plan as a few lines for a person."""
    r = plan["resources"]
    lines = [f"training images: {plan['samples']:,}",
             f"per worker: {r['per_worker']}; per run (driver, {r['workers']} workers, actor, "
             f"decoding): {r['per_run']}",
             f"cluster {plan['cluster']}: {plan['runs_that_fit']} run(s) fit at once "
             f"({plan['limited_by']} limits)"]
    if "trials_in_parallel" in plan:
        lines.append(f"sweep: {plan['trials_in_parallel']} trial(s) in parallel")
    lines.append(f"data loader: {plan['loader']}; per-worker memory about "
                 f"{plan['worker_memory_bytes'] / 2**30:.2f} GB (data, model state, E-step features)")
    if "estep" in plan:
        e = plan["estep"]
        lines.append(f"E-step: {e['strategy']} (clustering.strategy: {e['configured']}); est. "
                     f"gather {_seconds(e['gather_seconds_est'])}, sharded "
                     f"{_seconds(e['sharded_seconds_est'])}; {e['flop']:.3g} FLOP, "
                     f"{e['sharded_rounds']} sharded rounds, D = {e['dim']}")
    return "\n".join(lines)


def num_samples_of(cfg: ExperimentConfig, samples: int | None, tables=None) -> int:
    """``--samples``, else the built-in set's size, else the file source's listing ``tables``
    (``orchestration.run.check_source``); ``ConfigError`` when none is known."""
    if samples:
        return samples
    size = cfg.train_size()
    if size is not None:
        return size
    if tables is None:
        raise ConfigError("--samples: give the number of training images (torchvision sources "
                          "are not listed before they load)")
    return len(tables.train)


def print_plan(cfg: ExperimentConfig, tables: TableSplits | None, trials: int | None = None,
               max_concurrent: int | None = None) -> None:
    """``orchestration.plan.one_line`` for the cluster just joined (nothing when the training
    set's size is not known without loading it)."""
    size = len(tables.train) if tables is not None else cfg.train_size()
    if size:
        cluster, multi_node = live_cluster()
        print(one_line(make_plan(cfg, size, cluster, multi_node, trials, max_concurrent)), flush=True)


