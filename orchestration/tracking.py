"""MLflow: every write protoray makes to a tracking server goes through this module.

A run holds the flattened config as params, the config file, one metric point per epoch (logged
by a Ray Train callback on the Train controller after each report is persisted, so an epoch is
logged once even when workers restart), the E-step log, the final evaluation, plots and the
final checkpoint. A sweep is a parent run with one child run per Tune trial.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import time
import warnings
from pathlib import Path
from typing import Any

import mlflow
import torch
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from ray.train import UserCallback

from orchestration.config import ExperimentConfig, to_yaml

TRIAL_TAG = "protoray.trial_id"
RUN_CHECKPOINT = "checkpoint/final_checkpoint.pt"  # where log_evaluation puts it


SQLITE = "sqlite:///"


def sqlite_file(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` tracking URI (relative to the working directory
    unless absolute); None for any other store."""
    return Path(uri[len(SQLITE):]) if uri.startswith(SQLITE) else None


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute against this process's working directory,
    so the Train controller and workers (other processes, other cwd) write the same file."""
    database = sqlite_file(uri)
    return SQLITE + str(database.resolve()) if database and not database.is_absolute() else uri


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


# user:password@ in a URI, and secret-looking query parameters or key: value pairs
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^:/@\s]*):[^@/\s]+@")
_SECRET = re.compile(r"(?i)(?P<key>(?:password|passwd|token|secret|api[_-]?key|access[_-]?key)"
                     r"[\w-]*)(?P<sep>=|:\s*)[^&\s'\"]+")


def redact(value):
    """``value`` with credentials masked, for anything recorded or printed: a URI's password
    (``https://alice:***@host``) and the values of ``token=``, ``password=``, ``api_key=``...
    (``token=***``). Non-strings are returned as they are."""
    if not isinstance(value, str):
        return value
    value = _USERINFO.sub(lambda m: f"{m['scheme']}{m['user']}:***@", value)
    return _SECRET.sub(lambda m: f"{m['key']}{m['sep']}***", value)


def run_name(cfg: ExperimentConfig) -> str:
    """``tracking.run_name``, else ``<method>-<dataset>`` (``simclr+icl_msr-digits``)."""
    if cfg.tracking.run_name:
        return cfg.tracking.run_name
    method = cfg.method.name + (f"+{cfg.method.regularizer}" if cfg.method.regularizer else "")
    return f"{method}-{cfg.data.name}"


def run_tags(cfg: ExperimentConfig) -> dict[str, str]:
    """What the MLflow UI filters and groups runs by."""
    return {"method": cfg.method.name, "dataset": cfg.data.name, "backbone": cfg.model.backbone,
            "regularizer": cfg.method.regularizer or "none"}


def start_experiment(tracking_uri: str, experiment_name: str) -> str:
    """Point this process at the server and the experiment (created if new); its id.

    MLflow creates and migrates a new SQLite store's schema on first use, and two processes
    doing that at once fail (``table experiments already exists``): two jobs submitted to one
    cluster do. A file lock beside the database serialises the first use. A new experiment in a
    SQLite store keeps its artifacts beside the database, in ``mlruns/``, rather than in the
    ``./mlruns`` of whichever directory its first run started from.
    """
    mlflow.set_tracking_uri(tracking_uri)
    database = sqlite_file(tracking_uri)
    if database is None:
        return mlflow.set_experiment(experiment_name).experiment_id
    from filelock import FileLock

    database.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(database) + ".lock"):
        if mlflow.get_experiment_by_name(experiment_name) is None:
            mlflow.create_experiment(experiment_name, artifact_location=(
                database.parent / "mlruns").resolve().as_uri())
        return mlflow.set_experiment(experiment_name).experiment_id


def open_run(name: str | None = None, run_id: str | None = None):
    """``mlflow.start_run`` as a context manager: a new run named ``name``, or ``run_id`` again."""
    return mlflow.start_run(run_name=name, run_id=run_id)


STORAGE_TAG = "protoray.storage_path"  # where the run's Ray Train checkpoints go, absolute


def log_run_start(run_id: str, cfg: ExperimentConfig, loader: str = "memory",
                  storage: str = "") -> None:
    """Params (the flattened config), tags (``loader``: how the training images reached the
    workers, ``memory`` or ``stream``; ``STORAGE_TAG``: the checkpoints' absolute storage path,
    which ``--resume`` reads), the config file and the dataset as the run's input."""
    client = MlflowClient()
    mlflow.log_params({k: redact(json.dumps(v) if isinstance(v, (list, dict)) else v)
                       for k, v in cfg.flat().items()}, run_id=run_id)
    for key, value in {**run_tags(cfg), "loader": loader, STORAGE_TAG: storage}.items():
        client.set_tag(run_id, key, redact(value))
    mlflow.log_text(redact(to_yaml(cfg)), "config.yaml", run_id=run_id)
    _log_dataset(run_id, cfg)


def missing_sqlite_store(tracking_uri: str) -> bool:
    """True for a ``sqlite:///`` URI whose file does not exist: MLflow would create an empty
    store there and then not find the run a command names."""
    database = sqlite_file(tracking_uri)
    return database is not None and not database.is_file()


def download_run_checkpoint(run_id: str, tracking_uri: str, dest: Path) -> Path:
    """The run's final checkpoint, downloaded into ``dest``. ``ValueError`` (one line) for a
    store that is not there, an unknown run or a run without the artifact."""
    from mlflow.exceptions import MlflowException

    if missing_sqlite_store(tracking_uri):
        raise ValueError(f"no MLflow store at {tracking_uri} to look up run {run_id}; pass the "
                         "store the run was logged to with --tracking-uri (or MLFLOW_TRACKING_URI)")
    try:
        MlflowClient(tracking_uri).get_run(run_id)
    except MlflowException:
        raise ValueError(f"MLflow run {run_id} is not in {tracking_uri}; pass the store it was "
                         "logged to with --tracking-uri") from None
    try:
        return Path(mlflow.artifacts.download_artifacts(
            run_id=run_id, artifact_path=RUN_CHECKPOINT, dst_path=str(dest),
            tracking_uri=tracking_uri))
    except (MlflowException, OSError):
        raise ValueError(f"MLflow run {run_id} has no {RUN_CHECKPOINT} artifact (runs trained "
                         "without the final evaluation log none); export its Ray Train "
                         "checkpoint directory instead") from None


def resumable_run(tracking_uri: str, run_id: str) -> tuple[ExperimentConfig, str, str]:
    """(config, storage path, experiment name) of run ``run_id`` for ``protoray train --resume``.
    ``ConfigError`` (one line) for a run that is not in the store, has finished, or was not
    started by ``protoray train``."""
    import yaml
    from mlflow.exceptions import MlflowException

    from orchestration.config import ConfigError, build_config

    if missing_sqlite_store(tracking_uri):
        raise ConfigError(f"--resume {run_id}: no MLflow store at {tracking_uri}; pass the run's "
                          "store with --tracking-uri (or MLFLOW_TRACKING_URI)")
    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise ConfigError(f"--resume {run_id}: no such run in {tracking_uri}; pass the run's "
                          "store with --tracking-uri") from None
    storage = run.data.tags.get(STORAGE_TAG)
    if not storage or TRIAL_TAG in run.data.tags:
        raise ConfigError(f"--resume {run_id}: not a protoray train run (sweep trials resume with "
                          "protoray sweep --resume SWEEP_DIR)")
    if run.info.status == "FINISHED":
        raise ConfigError(f"--resume {run_id}: the run has already finished")
    text = mlflow.artifacts.load_text(f"{run.info.artifact_uri}/config.yaml")
    experiment = client.get_experiment(run.info.experiment_id).name
    return build_config(yaml.safe_load(text)), storage, experiment


def _log_dataset(run_id: str, cfg: ExperimentConfig) -> None:
    """The training data as an MLflow dataset input (its location and the slice used), without
    reading any image: a digest of the settings that choose the images."""
    from mlflow.data.code_dataset_source import CodeDatasetSource
    from mlflow.data.dataset_source_registry import resolve_dataset_source
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.tracking.fluent import _create_dataset_input  # what mlflow.log_input builds

    from methods.data.datasets import FASHION_MNIST_ROOT

    d = cfg.data
    root = d.root or (str(FASHION_MNIST_ROOT) if d.name == "fashion_mnist" else None)
    if root:
        with warnings.catch_warnings():  # "can be interpreted in multiple ways": all are local
            warnings.simplefilter("ignore")
            source = resolve_dataset_source(str(Path(root).resolve()))
    else:
        source = CodeDatasetSource(tags={"loader": f"methods.data.datasets.load_dataset({d.name!r})"})
    chosen = json.dumps({"name": d.name, "root": root, "limit": d.limit, "seed": cfg.seed,
                         "knn_holdout": d.knn_holdout}, sort_keys=True)
    digest = hashlib.sha256(chosen.encode()).hexdigest()[:12]
    tags = {"limit": str(d.limit or "all"), "knn_holdout": str(d.knn_holdout)}
    dataset = MetaDataset(source, name=d.name, digest=digest)
    MlflowClient().log_inputs(run_id, [_create_dataset_input(dataset, "training", tags)])


def log_estep(run_id: str, estep_log: dict) -> None:
    mlflow.log_dict({str(k): v for k, v in estep_log.items()}, "estep_log.json", run_id=run_id)


def log_evaluation(run_id: str, metrics: dict, plots: list[Path], checkpoint: Path) -> None:
    """The final test metrics, the plots, and the checkpoint file they came from."""
    mlflow.log_metrics(numeric(metrics), run_id=run_id)
    for path in plots:
        mlflow.log_artifact(str(path), "plots", run_id=run_id)
    mlflow.log_artifact(str(checkpoint), "checkpoint", run_id=run_id)


ENCODER_MODEL = "encoder"  # mlflow.pytorch.load_model(f"runs:/{run_id}/encoder")


def log_encoder(run_id: str, method: torch.nn.Module, channels: int, side: int) -> None:
    """The trained method's encoder as the run's MLflow model ``encoder``: a module from uint8 or
    [0, 1] float images ``[B, C, H, W]`` to embeddings ``[B, D]`` (``methods.encoders.image_encoder``),
    with an input example and signature, and protoray's ``methods`` package as its code so
    it loads where protoray is not installed."""
    import mlflow.pytorch
    import numpy as np
    from mlflow.models import infer_signature

    import methods
    from methods.encoders.image_encoder import image_encoder

    encoder = image_encoder(method, channels, side)
    example = np.random.default_rng(0).integers(0, 256, (2, channels, side, side), dtype=np.uint8)
    with torch.no_grad():
        output = encoder(torch.from_numpy(example)).numpy()
    active = mlflow.active_run()
    # log_model writes to the active run; a sweep trial's process has none open
    context = contextlib.nullcontext() if active and active.info.run_id == run_id else \
        mlflow.start_run(run_id=run_id)
    with context:
        model_info = mlflow.pytorch.log_model(
            encoder, name=ENCODER_MODEL, input_example=example,
            signature=infer_signature(example, output),
            code_paths=[str(Path(methods.__file__).parent)],
            # pickled, not MLflow's default torch.export graph: that one is traced at the
            # example's batch size and dtype, and the model takes any B, uint8 or float
            serialization_format="pickle",
            # listed, not inferred: inference imports the model in a subprocess, slowly
            pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "numpy"])
    if not (active and active.info.run_id == run_id):
        # leaving start_run() marked the run FINISHED; it is not: its evaluation comes next
        MlflowClient().update_run(run_id, status="RUNNING")
    return model_info


def register_encoder(run_id: str, experiment_name: str, alias: str = "best") -> str:
    """Register run ``run_id``'s ``encoder`` model as a new version of the registered model
    ``<experiment_name>-encoder`` and point ``alias`` at it; returns ``models:/NAME@alias``."""
    name = f"{experiment_name}-encoder"
    version = mlflow.register_model(f"runs:/{run_id}/{ENCODER_MODEL}", name)
    MlflowClient().set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"


def registered_run_id(uri: str, tracking_uri: str) -> str:
    """The run that logged the model version ``models:/NAME@ALIAS`` (or ``models:/NAME/N``);
    ``ValueError`` (one line) for an unknown name, alias or version."""
    client = MlflowClient(resolve_tracking_uri(tracking_uri))
    rest = uri.removeprefix("models:/")
    try:
        if "@" in rest:
            name, alias = rest.split("@", 1)
            version = client.get_model_version_by_alias(name, alias)
        else:
            name, number = rest.rsplit("/", 1)
            version = client.get_model_version(name, number)
    except (MlflowException, ValueError) as exc:
        raise ValueError(f"{uri}: no such registered model version in {tracking_uri} "
                         f"({str(exc).splitlines()[0]})") from None
    return version.run_id


SYSTEM_METRICS_INTERVAL_S = 10.0  # MLflow's default sampling interval


@contextlib.contextmanager
def system_metrics(run_id: str | None, tracking_uri: str | None, node: str):
    """MLflow's system-metrics monitor (CPU, memory, disk, network, and GPU where present) for
    this process, logged to run ``run_id`` as ``system/<node>/...``: the driver and every Train
    worker record their own. Nothing without a run id."""
    if not run_id:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, sampling_interval=SYSTEM_METRICS_INTERVAL_S,
                                   node_id=node, tracking_uri=tracking_uri, resume_logging=True)
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()


def stopped_reason(run_id: str) -> str | None:
    """The ``stopped`` tag the epoch logger set when training stopped on a NaN loss."""
    return mlflow.get_run(run_id).data.tags.get("stopped")


class MLflowEpochLogger(UserCallback):
    """Logs rank 0's metrics of every report to one MLflow run, step = epoch."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.logged: set[int] | None = None  # epochs in the run already, read at the first report

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        client = MlflowClient(self.tracking_uri)
        first = metrics[0]
        if "stopped" in first:
            client.set_tag(self.run_id, "stopped", first["stopped"][:5000])
            return
        values = numeric(first)
        waits = [m.get("estep_wait_s") for m in metrics if "estep_wait_s" in m]
        if waits:
            values["estep_wait_max_s"] = max(waits)
        step = int(values.pop("epoch", 0))
        if self.logged is None:
            self.logged = {m.step for m in client.get_metric_history(self.run_id, "loss")}
        if step in self.logged:  # a resumed run redid an epoch logged before its driver died
            return
        self.logged.add(step)
        now = int(time.time() * 1000)
        client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])


def epoch_history(client: MlflowClient, run_id: str, keys: tuple[str, ...]
                  ) -> dict[int, dict[str, float]]:
    """``{epoch: {key: value}}`` of the per-epoch metrics ``keys`` logged so far."""
    history: dict[int, dict[str, float]] = {}
    for key in keys:
        for m in client.get_metric_history(run_id, key):
            history.setdefault(m.step, {})[key] = m.value
    return history


# --- sweeps: a parent run per sweep, a child run per Tune trial


def log_sweep_start(cfg: ExperimentConfig, settings: dict[str, Any], space: dict[str, Any],
                    sweep_dir: Path) -> None:
    """On the active parent run: the sweep's settings, its space and base config."""
    mlflow.log_params({k: redact(v) for k, v in settings.items()})
    mlflow.log_dict({k: redact(repr(v)) for k, v in space.items()}, "space.json")
    mlflow.log_text(redact(to_yaml(cfg)), "base_config.yaml")
    mlflow.set_tag("sweep_dir", redact(str(sweep_dir)))
    for key, value in run_tags(cfg).items():
        mlflow.set_tag(key, redact(value))


def trial_runs(client: MlflowClient, experiment_id: str, parent_run_id: str) -> dict[str, Any]:
    """The sweep's child runs by trial id."""
    runs = client.search_runs([experiment_id], f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    return {r.data.tags.get(TRIAL_TAG): r for r in runs}


def open_trial_run(client: MlflowClient, experiment_id: str, parent_run_id: str, trial_id: str,
                   cfg: ExperimentConfig, params: dict) -> tuple[str, bool]:
    """The trial's child run, reused when a resumed sweep finds it; (run id, already finished)."""
    found = trial_runs(client, experiment_id, parent_run_id).get(trial_id)
    if found and found.info.status == "FINISHED":
        return found.info.run_id, True
    if found:
        run_id = found.info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        tags = {"mlflow.parentRunId": parent_run_id, TRIAL_TAG: trial_id, **run_tags(cfg)}
        run_id = client.create_run(experiment_id, run_name=f"{run_name(cfg)}-{trial_id}",
                                   tags=tags).info.run_id
    client.log_dict(run_id, params, "trial_params.json")
    return run_id, False


def log_exploit(client: MlflowClient, run_id: str, donor: dict, values: dict) -> None:
    """A PBT exploit on the trial's run: tag ``exploit_e<epoch>`` (the first epoch trained from
    the donor's weights) = the donor's trial and run ids, its checkpoint's epoch and the new
    values; numeric values also as ``pbt/<key>`` metrics at that epoch."""
    epoch = int(donor["epoch"]) + 1
    client.set_tag(run_id, f"exploit_e{epoch}", json.dumps(
        {"donor_trial": donor["trial_id"], "donor_run_id": donor["run_id"],
         "donor_epoch": donor["epoch"], "values": {k: redact(v) for k, v in values.items()}}))
    log_pbt_values(client, run_id, values, epoch)


def log_pbt_values(client: MlflowClient, run_id: str, values: dict, epoch: int) -> None:
    """The trial's numeric hyperparameters from ``epoch`` on, as ``pbt/<key>`` metrics (a PBT
    trial's schedule)."""
    for key, value in values.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            client.log_metric(run_id, f"pbt/{key}", float(value), step=epoch)


def close_trial_run(client: MlflowClient, run_id: str, status: str, reason: str = "") -> None:
    """``status``: finished, stopped early (ASHA) or error; ``reason`` (an error's first line)
    goes in the ``failure_reason`` tag of a FAILED run."""
    if status == "stopped early":
        client.set_tag(run_id, "stopped_early", "true")
    if reason:
        client.set_tag(run_id, "failure_reason", reason[:5000])
    client.set_terminated(run_id, {"finished": "FINISHED", "error": "FAILED"}.get(status, "KILLED"))


def log_sweep_table(table, column: str, figures: dict) -> None:
    """On the active parent run: the trial table (sorted best first), the best trial's
    ``column`` (``best_knn``, ``best_rankme``...), the trial-epochs and ``figures``
    (``{artifact file: matplotlib figure}``)."""
    mlflow.log_text(table.to_csv(index=False), "sweep_table.csv")
    best = table[column].dropna()
    mlflow.log_metrics({column: float(best.iloc[0]) if len(best) else float("nan"),
                        "trial_epochs": float(table["epochs"].sum())})
    import matplotlib.pyplot as plt

    for name, figure in figures.items():
        mlflow.log_figure(figure, name)
        plt.close(figure)
