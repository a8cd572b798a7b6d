"""The driver: start or join Ray, open the MLflow run, start the prototype actor when the method
clusters, run the TorchTrainer, evaluate the final checkpoint and log everything.

Data flows one way: config -> driver -> workers -> reports. The driver never talks to the
workers while they train; the prototype actor is the only state they share.
"""

from __future__ import annotations

import functools
import os
import shutil
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
from orchestration.plan import print_plan
from orchestration.prototypes import PrototypeService
from orchestration.resources import (
    CONTROLLER_FAILURE_LIMIT,
    check_cluster,
    check_gpus,
    cpus_per_run,
    custom_resources,
    ensure_ray,
)
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
              f"dies: protoray train --resume {run_id} --tracking-uri "
              f"{tracking.redact(tracking_uri)}", flush=True)
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
        name=f"prototypes-{run_id}", get_if_exists=True, num_cpus=c.cpus, num_gpus=c.gpus,
        resources=c.actor_resources or None,
    ).remote(cfg.scaling.num_workers, c.num_clusters, schedule.temperature, cfg.seed, c.niter,
             c.nredo, tuple(plugins), "cuda" if c.gpus else "faiss")


def execute(cfg: ExperimentConfig, run_id: str, tracking_uri: str, evaluate: bool = True,
            plugins: tuple = (), callbacks: tuple = (), storage_path: str | None = None,
            name: str | None = None, tables: TableSplits | None = None,
            resumed: bool = False, initial_checkpoint: str | None = None) -> RunSummary:
    """The prototype actor, the TorchTrainer and the final evaluation, all recorded in the
    already-open MLflow run ``run_id``. ``train`` and every sweep trial go through here; a trial
    adds Tune's report callback and keeps its Train run under the sweep's directory.

    Re-running with the same ``name`` and storage resumes from the latest checkpoint (Train V2).
    ``tables`` is ``check_source``'s listing, made again here when not given. ``resumed``: the
    run's start (params, config, dataset) is logged already. ``initial_checkpoint``: a
    checkpoint directory a new Train run starts from (a PBT exploit's donor).
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
                           "plugins": tuple(plugins), "stream": stream.info if stream else None,
                           "run_id": run_id, "tracking_uri": tracking_uri,
                           "initial_checkpoint": initial_checkpoint},
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
    with tracking.system_metrics(run_id, tracking_uri, "driver"):
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
