"""The driver: start or join Ray, open the MLflow run, start the prototype actor, run the
TorchTrainer, evaluate the final checkpoint and log everything.

Data flows one way: config -> driver -> workers -> reports. The driver never talks to the
workers while they train; the prototype actor is the only state they share.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestration.config import ExperimentConfig, to_yaml
from orchestration.evaluate import evaluate_checkpoint
from orchestration.prototypes import PrototypeService
from orchestration.tracking import MLflowEpochLogger, numeric, resolve_tracking_uri
from orchestration.worker import CHECKPOINT_FILE, train_loop


class TrainingStopped(RuntimeError):
    """Training stopped early (a NaN loss); the message says where and which checkpoint is kept."""


@dataclass
class RunSummary:
    run_id: str
    tracking_uri: str
    metrics: dict[str, float]
    checkpoint: str | None
    estep_log: dict = field(default_factory=dict)


def ensure_ray(address: str | None, cpus_needed: float) -> None:
    """Join ``address`` (or RAY_ADDRESS), else start an embedded local cluster.

    The embedded cluster gets at least ``cpus_needed`` logical CPUs: on a 2-core laptop two
    workers plus the prototype actor still fit (they take turns on the cores), whereas a Train V2
    run that cannot be placed waits forever.
    """
    if ray.is_initialized():
        return
    # A worker process importing torch on a busy small machine can exceed Train's 60 s default;
    # set before ray.init so the embedded cluster's processes inherit it.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(num_cpus=max(os.cpu_count() or 1, int(cpus_needed + 0.999)),
                 dashboard_host="127.0.0.1")


def cpus_per_run(cfg: ExperimentConfig) -> float:
    """Logical CPUs one run reserves: its driver, its Train workers and the prototype actor."""
    s = cfg.scaling
    return 1 + s.num_workers * s.cpus_per_worker + cfg.clustering.cpus


def train(cfg: ExperimentConfig, address: str | None = None, evaluate: bool = True,
          faults: dict | None = None) -> RunSummary:
    """Run one experiment end to end; returns the MLflow run id and the final metrics.

    ``faults`` is for the reliability tests only (kill a worker or the actor, inject a NaN).
    """
    ensure_ray(address, cpus_per_run(cfg))
    tracking_uri = resolve_tracking_uri(cfg.tracking.tracking_uri)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_experiment(cfg.tracking.experiment_name)
    with mlflow.start_run(run_name=cfg.tracking.run_name) as run:
        return execute(cfg, run.info.run_id, tracking_uri, evaluate=evaluate, faults=faults)


def execute(cfg: ExperimentConfig, run_id: str, tracking_uri: str, evaluate: bool = True,
            faults: dict | None = None, callbacks: tuple = (), storage_path: str | None = None,
            name: str | None = None) -> RunSummary:
    """The prototype actor, the TorchTrainer and the final evaluation, all recorded in the
    already-open MLflow run ``run_id``. ``train`` and every sweep trial go through here; a trial
    adds Tune's report callback and keeps its Train run under the sweep's directory.

    Re-running with the same ``name`` and storage resumes from the latest checkpoint (Train V2).
    """
    s = cfg.scaling
    mlflow.log_params({k: json.dumps(v) if isinstance(v, (list, dict)) else v
                       for k, v in cfg.flat().items()}, run_id=run_id)
    mlflow.log_text(to_yaml(cfg), "config.yaml", run_id=run_id)
    service = PrototypeService.options(
        name=f"prototypes-{run_id}", get_if_exists=True, num_cpus=cfg.clustering.cpus,
    ).remote(s.num_workers, cfg.clustering.num_clusters,
             cfg.method.resolved().get("temperature", 0.2), cfg.seed, cfg.clustering.niter,
             cfg.clustering.nredo, faults)
    storage = storage_path or cfg.tracking.storage_path
    if "://" not in storage:
        storage = str(Path(storage).resolve())
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "prototype_service": service,
                           "faults": faults},
        scaling_config=ScalingConfig(num_workers=s.num_workers, use_gpu=s.use_gpu,
                                     resources_per_worker={"CPU": s.cpus_per_worker}),
        run_config=RunConfig(
            name=name or f"protoray-{run_id}", storage_path=storage,
            failure_config=FailureConfig(max_failures=s.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=[MLflowEpochLogger(tracking_uri, run_id), *callbacks]),
    )
    result = trainer.fit()
    estep_log = ray.get(service.history.remote())
    ray.kill(service)
    mlflow.log_dict({str(k): v for k, v in estep_log.items()}, "estep_log.json", run_id=run_id)
    checkpoint_dir = result.checkpoint.path if result.checkpoint else None
    if result.error:
        raise result.error
    # A stop report carries no checkpoint, so it is not in result.metrics (those belong to the
    # latest checkpoint); the controller's MLflow callback recorded it as a tag.
    stopped = mlflow.get_run(run_id).data.tags.get("stopped")
    if stopped:
        raise TrainingStopped(f"{stopped}; last good checkpoint: "
                              f"{checkpoint_dir or 'none (stopped in the first epoch)'}")
    metrics: dict[str, float] = {}
    if evaluate and result.checkpoint:
        with result.checkpoint.as_directory() as directory, tempfile.TemporaryDirectory() as out:
            metrics, artifacts = evaluate_checkpoint(Path(directory) / CHECKPOINT_FILE, Path(out), cfg)
            mlflow.log_metrics(numeric(metrics), run_id=run_id)
            for path in artifacts:
                mlflow.log_artifact(str(path), "plots", run_id=run_id)
            final = Path(out) / "final_checkpoint.pt"
            shutil.copy(Path(directory) / CHECKPOINT_FILE, final)
            mlflow.log_artifact(str(final), "checkpoint", run_id=run_id)
    return RunSummary(run_id, tracking_uri, metrics, checkpoint_dir, estep_log)
