"""The driver: start or join Ray, open the MLflow run, start the prototype actor when the method
clusters, run the TorchTrainer, evaluate the final checkpoint and log everything.

Data flows one way: config -> driver -> workers -> reports. The driver never talks to the
workers while they train; the prototype actor is the only state they share.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from methods.data.datasets import check_dataset
from orchestration import tracking
from orchestration.builders import TableSplits, table_splits
from orchestration.checkpoints import CHECKPOINT_FILE
from orchestration.config import STREAMED, ConfigError, ExperimentConfig
from orchestration.console import EpochPrinter
from orchestration.evaluate import evaluate_checkpoint
from orchestration.export import load_checkpoint
from orchestration.prototypes import PrototypeService
from orchestration.streaming import stream_datasets
from orchestration.worker import train_loop


class TrainingStopped(RuntimeError):
    """Training stopped early (a NaN loss); the message says where and which checkpoint is kept."""


@dataclass
class RunSummary:
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint: str | None
    estep_log: dict = field(default_factory=dict)


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
    if s.use_gpu and not joining:
        import torch

        found = torch.cuda.device_count()
        if found < s.num_workers:
            raise ConfigError(f"scaling.use_gpu: {s.num_workers} workers need {s.num_workers} "
                              f"GPUs and this machine has {found}; set scaling.use_gpu: false or "
                              "join a GPU cluster with --address")


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
    CPUs, a GPU per Train worker with ``scaling.use_gpu``, and the custom resources of the
    workers and the prototype actor."""
    need = {"CPU": cpus_per_run(cfg), **custom_resources(cfg)}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(cfg.scaling.num_workers)
    return need


def runs_that_fit(need: dict[str, float], cluster: dict[str, float]) -> tuple[int, str]:
    """How many runs each holding ``need`` fit in ``cluster``'s totals at once, and the resource
    that limits them. Totals, not per node: a trial whose workers span nodes is placed by Ray;
    on an autoscaling cluster the count is of the nodes up now (pass --max-concurrent to plan
    for more)."""
    counts = {name: int(cluster.get(name, 0) // amount) for name, amount in need.items() if amount > 0}
    limit = min(counts, key=counts.get)
    return counts[limit], limit


def check_source(cfg: ExperimentConfig) -> TableSplits | None:
    """Before Ray starts: the training data exists and, for an image folder or parquet source,
    lists cleanly (one line naming the file otherwise) and, streamed, gives every worker a shard
    of at least one batch. Returns that listing."""
    check_dataset(cfg.data.name, cfg.data.root)
    if cfg.data.name not in STREAMED:
        return None
    tables = table_splits(cfg)
    world = cfg.scaling.num_workers
    per_rank = cfg.optim.batch_size // world
    smallest = min(len(tables.train.shard(r, world)) for r in range(world))
    if tables.streams and smallest < per_rank:
        what = ("its row groups (rewrite the files with smaller ones: pyarrow's row_group_size)"
                if cfg.data.name == "parquet" else "its images")
        raise ConfigError(f"data.root: streamed, each of the {world} workers reads whole units of "
                          f"{tables.train.root}, {what}, and the smallest share holds {smallest} "
                          f"images, less than a per-worker batch of {per_rank}; or set fewer "
                          "scaling.num_workers, a smaller optim.batch_size, or data.loader: memory")
    return tables


def print_plan(cfg: ExperimentConfig, tables: TableSplits | None, trials: int | None = None,
               max_concurrent: int | None = None) -> None:
    """``orchestration.plan.one_line`` for the cluster just joined (nothing when the training
    set's size is not known without loading it)."""
    from orchestration.plan import make_plan, one_line

    size = len(tables.train) if tables is not None else cfg.train_size()
    if size:
        cluster = {k: float(v) for k, v in ray.cluster_resources().items()
                   if not k.startswith("node:") and k not in ("memory", "object_store_memory")}
        multi_node = len([node for node in ray.nodes() if node["Alive"]]) > 1
        print(one_line(make_plan(cfg, size, cluster, multi_node, trials, max_concurrent)), flush=True)


class RunInterrupted(RuntimeError):
    """Ctrl-C during a run; ``run_id`` and ``tracking_uri`` name the run to resume."""

    def __init__(self, run_id: str, tracking_uri: str):
        super().__init__(f"run {run_id} interrupted")
        self.run_id, self.tracking_uri = run_id, tracking_uri


def train(cfg: ExperimentConfig, address: str | None = None, evaluate: bool = True,
          plugins: tuple = (), verbose: bool = True,
          resume_run_id: str | None = None) -> RunSummary:
    """Run one experiment end to end; returns the MLflow run id and the final metrics.

    ``resume_run_id``: continue that MLflow run (``cfg`` being its config, see ``resume``) from
    its latest Ray Train checkpoint instead of starting a new one. ``verbose=False`` (the CLI's
    default) prints one line per epoch instead of Ray's output. ``plugins``: objects with
    ``orchestration.events`` handlers, run on every worker and in the prototype actor. Ctrl-C
    raises ``RunInterrupted``.
    """
    tables = check_source(cfg)  # before Ray starts: one line, not a traceback
    check_gpus(cfg, joining=bool(address or os.environ.get("RAY_ADDRESS")))
    ensure_ray(address, cpus_per_run(cfg), verbose, custom_resources(cfg))
    check_cluster(cfg)
    print_plan(cfg, tables)
    tracking_uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.start_experiment(tracking_uri, cfg.tracking.experiment_name)
    name = tracking.run_name(cfg)
    with tracking.open_run(None if resume_run_id else name, run_id=resume_run_id) as run:
        run_id = run.info.run_id
        run_all = functools.partial(execute, cfg, run_id, tracking_uri, evaluate=evaluate,
                                    plugins=plugins, tables=tables, resumed=bool(resume_run_id))
        epochs = f"{cfg.optim.epochs} epoch{'s' if cfg.optim.epochs != 1 else ''}"
        print(f"MLflow run {run_id} ({name}): {cfg.scaling.num_workers} workers, "
              f"{epochs}{'; resumed' if resume_run_id else ''}; if this process "
              f"dies: protoray train --resume {run_id} --tracking-uri {tracking_uri}", flush=True)
        try:
            if verbose:
                return run_all()
            with EpochPrinter(tracking_uri, run_id, cfg.optim.epochs):
                return run_all()
        # Ctrl-C: Train V2's own SIGINT handler aborts the run and calls sys.exit(0) inside
        # fit(); before fit() starts it is a KeyboardInterrupt
        except (KeyboardInterrupt, SystemExit):
            raise RunInterrupted(run_id, tracking_uri) from None


def resume(run_id: str, tracking_uri: str, address: str | None = None,
           verbose: bool = True) -> RunSummary:
    """Continue ``protoray train``'s MLflow run ``run_id`` after its driver died (Ctrl-C,
    SIGKILL, a lost head node): the same config, the same run, from the latest Ray Train
    checkpoint in the storage path it recorded, E-step state included; epochs already logged
    are not logged again. ``ConfigError`` (one line) for a run that cannot be resumed."""
    uri = tracking.resolve_tracking_uri(tracking_uri)
    cfg, storage, experiment = tracking.resumable_run(uri, run_id)
    cfg = cfg.model_copy(update={"tracking": cfg.tracking.model_copy(update={
        "tracking_uri": uri, "storage_path": storage, "experiment_name": experiment})})
    return train(cfg, address=address, verbose=verbose, resume_run_id=run_id)


def start_prototype_service(cfg: ExperimentConfig, run_id: str, plugins: tuple = ()):
    """The run's prototype actor, or None when the method never clusters (no CPU reserved).
    Named after the run, so a restarted trial finds the one it started."""
    schedule = cfg.method.schedule()
    if schedule is None:
        return None
    c = cfg.clustering
    return PrototypeService.options(
        name=f"prototypes-{run_id}", get_if_exists=True, num_cpus=c.cpus,
        resources=c.actor_resources or None,
    ).remote(cfg.scaling.num_workers, c.num_clusters, schedule.temperature, cfg.seed, c.niter,
             c.nredo, tuple(plugins))


def execute(cfg: ExperimentConfig, run_id: str, tracking_uri: str, evaluate: bool = True,
            plugins: tuple = (), callbacks: tuple = (), storage_path: str | None = None,
            name: str | None = None, tables: TableSplits | None = None,
            resumed: bool = False) -> RunSummary:
    """The prototype actor, the TorchTrainer and the final evaluation, all recorded in the
    already-open MLflow run ``run_id``. ``train`` and every sweep trial go through here; a trial
    adds Tune's report callback and keeps its Train run under the sweep's directory.

    Re-running with the same ``name`` and storage resumes from the latest checkpoint (Train V2).
    ``tables`` is ``check_source``'s listing, made again here when not given. ``resumed``: the
    run's start (params, config, dataset) is logged already.
    """
    s = cfg.scaling
    if tables is None and cfg.data.name in STREAMED:
        tables = table_splits(cfg)
    stream = stream_datasets(cfg, tables) if tables is not None and tables.streams else None
    storage = storage_path or cfg.tracking.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    if not resumed:
        tracking.log_run_start(run_id, cfg, loader="stream" if stream else "memory", storage=storage)
    service = start_prototype_service(cfg, run_id, plugins)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "prototype_service": service,
                           "plugins": tuple(plugins), "stream": stream.info if stream else None},
        datasets=stream.datasets if stream else None,
        dataset_config=stream.data_config if stream else None,
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker,
                                                           **s.worker_resources}),
        run_config=RunConfig(
            name=name or f"protoray-{run_id}", storage_path=storage,
            failure_config=FailureConfig(max_failures=s.max_failures,
                                         controller_failure_limit=CONTROLLER_FAILURE_LIMIT),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[tracking.MLflowEpochLogger(tracking_uri, run_id), *callbacks]),
    )
    result = trainer.fit()
    estep_log = {}
    if service is not None:
        estep_log = ray.get(service.history.remote())
        ray.kill(service)
        tracking.log_estep(run_id, estep_log)
    checkpoint_dir = result.checkpoint.path if result.checkpoint else None
    if result.error:
        raise result.error
    # A stop report carries no checkpoint, so it is not in result.metrics (those belong to the
    # latest checkpoint); the controller's MLflow callback recorded it as a tag.
    stopped = tracking.stopped_reason(run_id)
    if stopped:
        raise TrainingStopped(f"{stopped}; last good checkpoint: "
                              f"{checkpoint_dir or 'none (stopped in the first epoch)'}")
    metrics: dict[str, float] = {}
    if result.checkpoint:  # one copy of the checkpoint for the MLflow model and the evaluation
        with result.checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as out:
            state = Path(directory) / CHECKPOINT_FILE
            loaded, _ = load_checkpoint(state)
            tracking.log_encoder(run_id, loaded.method, loaded.channels, loaded.side)
            if evaluate:
                metrics, plots = evaluate_checkpoint(state, Path(out), cfg)
                final = Path(out) / "final_checkpoint.pt"
                shutil.copy(state, final)
                tracking.log_evaluation(run_id, metrics, plots, final)
    return RunSummary(run_id, tracking_uri, metrics, checkpoint_dir, estep_log)
