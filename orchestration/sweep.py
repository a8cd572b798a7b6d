"""Ray Tune sweeps: every trial is a ``protoray train`` run (same TorchTrainer, same prototype
actor) nested under one MLflow parent run.

    from ray import tune
    from orchestration.sweep import run_sweep
    table = run_sweep("configs/pcl_fashion_mnist.yaml",
                  {"method.temperature": tune.loguniform(0.05, 0.5),
                   "clustering.num_clusters": tune.choice([[10, 20], [10, 20, 50]])},
                  num_samples=16, scheduler="asha")

Space keys are config paths; every key and the edges of every range are validated against the
config model before Ray starts. ASHA ranks trials by the online kNN accuracy each epoch reports.

Tune with Train V2 (Ray 2.60): the trial is a function that builds and fits the TorchTrainer with
``TuneReportCallback``, which forwards rank 0's per-epoch report to Tune. The trial's Train run
is named after the trial id, so a resumed trial continues from its own latest checkpoint.
"""

from __future__ import annotations

import copy
import json
import math
import os
from pathlib import Path
from typing import Any

import mlflow
import pandas as pd
import ray
from mlflow.tracking import MlflowClient
from ray import tune
from ray.tune.search.basic_variant import BasicVariantGenerator
from ray.tune.search.sample import Categorical, Domain, Float, Function, Integer

from methods.evaluation.label_free import LABEL_FREE_MODES
from orchestration import sweep_plots, tracking
from orchestration.builders import TableSplits
from orchestration.config import ConfigError, ExperimentConfig, build_config, load_config, set_path
from orchestration.pbt import (
    check_pbt_space,
    donor_checkpoint,
    fit_reporting_checkpoints,
    pbt_scheduler,
)
from orchestration.plan import print_plan
from orchestration.resources import (
    check_cluster,
    check_gpus,
    cpus_per_run,
    custom_resources,
    ensure_ray,
    run_resources,
    runs_that_fit,
)
from orchestration.run import check_source, execute
from orchestration.tracking import resolve_tracking_uri

METRIC = "knn_holdout"  # the default score trials are ranked by (ASHA, the table)
# what a trial reports every epoch and which way is better; the label-free scores need no labels
METRIC_MODES = {"knn_holdout": "max", "probe_holdout": "max", "loss": "min", **LABEL_FREE_MODES}
LABELLED_METRICS = ("knn_holdout", "probe_holdout")
SWEEP_FILE = "protoray_sweep.json"  # what a resumed sweep needs besides Tune's own state
EPOCHS = "epochs_done"  # ASHA's time attribute: epochs trained, counted across resumes


def _probe_values(domain: Any) -> list[Any]:
    """Values that bound what ``domain`` can sample: a range's edges, every category."""
    if isinstance(domain, dict) and set(domain) == {"grid_search"}:
        return list(domain["grid_search"])
    if isinstance(domain, Categorical):
        return list(domain.categories)
    if isinstance(domain, Integer):
        return [domain.lower, domain.upper - 1]  # randint's upper bound is exclusive
    if isinstance(domain, Float):
        return [domain.lower, domain.upper]
    if isinstance(domain, Function):
        return []  # tune.sample_from reads the other sampled values: checked in its trial
    if isinstance(domain, Domain):
        return [domain.sample() for _ in range(8)]
    return [domain]  # a constant


def validate_space(base: dict, space: dict[str, Any]) -> None:
    """Raise ``ConfigError`` naming the first space key that is not a config path or whose range
    reaches an invalid value, before any trial starts."""
    if not space:
        raise ConfigError("space: give at least one config path to sweep, e.g. method.temperature")
    for key, domain in space.items():
        if key.split(".")[0] in ("tracking", "scaling") or key in ("optim.epochs", "seed"):
            raise ConfigError(f"space {key!r}: cannot be swept (it is the sweep's own setting)")
        for value in _probe_values(domain):
            tree = copy.deepcopy(base)
            try:
                set_path(tree, key.split("."), value)
                build_config(tree)
            except ConfigError as exc:
                raise ConfigError(f"space {key!r} (value {value!r}): {exc}") from None


def _absolute(cfg: ExperimentConfig) -> dict:
    """The config tree with every path absolute: trials run in other processes and directories."""
    tree = cfg.model_dump(mode="json")
    tracking = tree["tracking"]
    tracking["tracking_uri"] = resolve_tracking_uri(tracking["tracking_uri"])
    if "://" not in tracking["storage_path"]:
        tracking["storage_path"] = str(Path(tracking["storage_path"]).resolve())
    for section in ("data", "eval_data"):
        if (tree.get(section) or {}).get("root"):
            tree[section]["root"] = str(Path(tree[section]["root"]).resolve())
    return tree


def _report_callback():
    """Tune's Train callback, reporting ``epochs_done`` (what ASHA counts): after a resume, Tune's
    own iteration counter restarts at 1 while training continues from the checkpointed epoch."""
    from ray.tune.integration.ray_train import TuneReportCallback

    class EpochReport(TuneReportCallback):
        def after_report(self, run_context, metrics, checkpoint):
            if "stopped" in metrics[0]:  # a NaN stop: the trial raises TrainingStopped next
                return
            first = {**metrics[0], EPOCHS: int(metrics[0]["epoch"]) + 1}
            super().after_report(run_context, [first, *metrics[1:]], checkpoint)

    return EpochReport()


def _replay(client: MlflowClient, run_id: str, metric: str) -> None:
    """Report a finished trial's recorded epochs to Tune instead of training it again."""
    history = tracking.epoch_history(client, run_id, tuple(dict.fromkeys((metric, "loss"))))
    for epoch in sorted(history):
        tune.report({**history[epoch], "epoch": epoch, EPOCHS: epoch + 1})


def _trial(params: dict[str, Any], sweep_dir: str) -> None:
    """One Tune trial: a Train run recorded in its own child MLflow run (reused on resume)."""
    spec = json.loads((Path(sweep_dir) / SWEEP_FILE).read_text())
    tree = copy.deepcopy(spec["base"])
    for key, value in params.items():
        set_path(tree, key.split("."), value)
    cfg = build_config(tree)
    trial_id = tune.get_context().get_trial_id()
    uri, parent = spec["tracking_uri"], spec["parent_run_id"]
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    run_id, finished = tracking.open_trial_run(client, spec["experiment_id"], parent, trial_id, cfg,
                                               params)
    if finished:  # finished before the driver was killed
        _replay(client, run_id, spec.get("metric", METRIC))
        return
    # If this raises, or Tune stops the trial (ASHA), the run stays RUNNING here and the sweep's
    # driver closes it as FAILED or KILLED once it knows which.
    storage = str(Path(sweep_dir) / "train")
    if spec.get("scheduler") == "pbt":
        _pbt_trial(cfg, params, run_id, trial_id, client, spec, storage)
    else:
        execute(cfg, run_id, uri, evaluate=spec["evaluate"], callbacks=(_report_callback(),),
                storage_path=storage, name=f"trial-{trial_id}")
    tracking.close_trial_run(client, run_id, "finished")


def _pbt_trial(cfg: ExperimentConfig, params: dict, run_id: str, trial_id: str,
               client: MlflowClient, spec: dict, storage: str) -> None:
    """A PBT trial's start: the first one trains from scratch; a later one (an exploit, or a
    restart) starts a new Train run from the checkpoint Tune hands it, in the same MLflow run."""
    start, donor = donor_checkpoint()
    name = f"trial-{trial_id}"
    if start is None:
        tracking.log_pbt_values(client, run_id, params, 0)
    else:  # a new Train run: the trial's own would resume from its own latest checkpoint
        name = f"trial-{trial_id}-from-{donor['trial_id']}-e{donor['epoch']}"
        if donor["trial_id"] != trial_id:
            tracking.log_exploit(client, run_id, donor, params)
            print(f"pbt: trial {trial_id} continues from trial {donor['trial_id']}'s epoch "
                  f"{donor['epoch']} with {params}", flush=True)

    def fit(callbacks: tuple) -> None:
        execute(cfg, run_id, spec["tracking_uri"], evaluate=spec["evaluate"], callbacks=callbacks,
                storage_path=storage, name=name, initial_checkpoint=start,
                resumed=start is not None)

    fit_reporting_checkpoints(fit, {"trial_id": trial_id, "run_id": run_id}, EPOCHS,
                              spec["perturbation_interval"])


def _trainable(sweep_dir: str, cfg: ExperimentConfig):
    """The trial function with its placement group: one CPU for the trial's own driver (it also
    runs the final evaluation) and, for methods that cluster, a bundle for the prototype actor it
    starts, which Tune requires of actors launched from a trial. The Train workers get their own
    placement group from Train."""
    bundles = [{"CPU": 1}]
    if cfg.method.schedule() is not None:
        gpus = {"GPU": cfg.clustering.gpus} if cfg.clustering.gpus else {}
        bundles.append({"CPU": cfg.clustering.cpus, **gpus, **cfg.clustering.actor_resources})
    return tune.with_resources(tune.with_parameters(_trial, sweep_dir=sweep_dir),
                               tune.PlacementGroupFactory(bundles))


def trials_in_parallel(requested: int, cfg: ExperimentConfig, cluster: dict[str, float]) -> int:
    """Trials at once: at most ``requested``, and no more than ``cluster``'s resources hold
    whole (``run_resources``: every Train worker's CPUs, GPUs and custom resources, the
    prototype actor, the trial's driver). Tune reserves only a trial's driver and actor, and a
    Train V2 run whose workers cannot be placed waits forever, so the count must be right before
    the trials start. Raises ``ConfigError`` naming the resource when not even one fits."""
    need = run_resources(cfg)
    fits, limit = runs_that_fit(need, cluster)
    if fits < 1:
        raise ConfigError(f"scaling: one trial needs {need[limit]:g} {limit} (driver, workers, "
                          f"prototype actor); the cluster has {cluster.get(limit, 0):g}")
    if fits < requested:
        print(f"sweep: {fits} trial(s) at once, not {requested}: that is what the cluster's "
              f"{limit} holds ({need[limit]:g} per trial)")
    return min(requested, fits)


def asha_scheduler(max_epochs: int, grace_period: int, reduction_factor: float):
    """ASHA (Li et al. 2020) over epochs trained: stops a trial whose metric is not in the top
    ``1 / reduction_factor`` at epochs ``grace_period * reduction_factor ** k``."""
    # stop_last_trials=False: a trial that reaches the last epoch ends by itself, so its final
    # evaluation and artifacts are logged instead of being cut off at its last report
    return tune.schedulers.ASHAScheduler(time_attr=EPOCHS, max_t=max_epochs, grace_period=grace_period,
                                         reduction_factor=reduction_factor, stop_last_trials=False)


def best_column(metric: str) -> str:
    """The trial table's column of a metric's best epoch: ``best_knn`` for the online kNN."""
    return "best_knn" if metric == METRIC else f"best_{metric}"


def check_metric(cfg: ExperimentConfig, metric: str, mode: str | None,
                 tables: TableSplits | None = None) -> str:
    """``mode`` for ``metric`` (its known direction when None); ``ConfigError`` naming the flag
    for an unknown metric, a wrong mode, or a labelled metric on a source without labels and
    without ``eval_data``. ``tables``: ``check_source``'s listing of a file source."""
    if metric not in METRIC_MODES:
        raise ConfigError(f"--metric {metric}: trials report {', '.join(METRIC_MODES)} every epoch")
    mode = mode or METRIC_MODES[metric]
    if mode not in ("max", "min"):
        raise ConfigError(f"--mode: must be max or min (got {mode!r})")
    if cfg.data.knn_holdout < 1:
        raise ConfigError("data.knn_holdout: a sweep scores trials on the hold-out slice; set it >= 1")
    unlabelled = cfg.data.labels == "none" or (tables is not None and tables.unlabelled)
    if metric == "probe_holdout" and cfg.eval_data is not None:
        raise ConfigError("--metric probe_holdout: the online probe is off with eval_data (its "
                          "classes are not the training source's); sweep on knn_holdout")
    if metric in LABELLED_METRICS and cfg.eval_data is None and unlabelled:
        raise ConfigError(f"--metric {metric} needs labels, and {cfg.data.root} has none: sweep "
                          f"on a label-free score (--metric rankme, alignment, uniformity) or "
                          "add an eval_data: section")
    return mode


SEARCHES = ("random", "grid", "optuna")
SCHEDULERS = ("asha", "pbt", "none")


def search_algorithm(search: str, space: dict[str, Any], seed: int | None, concurrent: int):
    """(Tune search algorithm, the space it samples) for ``--search``: random (Tune's variant
    generator), grid (every ``choice`` as a grid: each combination once), optuna (Optuna's TPE
    through Tune's ``OptunaSearch``, limited to ``concurrent`` suggestions at a time).
    ``ConfigError`` naming the key a search cannot take."""
    if search not in SEARCHES:
        raise ConfigError(f"--search: must be one of {', '.join(SEARCHES)} (got {search!r})")
    if search == "optuna":
        from ray.tune.search import ConcurrencyLimiter
        from ray.tune.search.optuna import OptunaSearch

        for key, domain in space.items():
            if isinstance(domain, (dict, Function)):
                raise ConfigError(f"--search optuna: {key} is a grid or a sample_from; give it as "
                                  "choice, uniform, loguniform or randint")
        return ConcurrencyLimiter(OptunaSearch(seed=seed), max_concurrent=concurrent), space
    if search == "grid":
        grid = {}
        for key, domain in space.items():
            if isinstance(domain, Categorical):
                domain = tune.grid_search(list(domain.categories))
            elif isinstance(domain, Domain):
                raise ConfigError(f"--search grid: {key} is a range; give it as choice or grid_search")
            grid[key] = domain
        space = grid
    return BasicVariantGenerator(random_state=seed, max_concurrent=concurrent), space


def run_sweep(config: ExperimentConfig | str | Path, space: dict[str, Any], num_samples: int = 16,
          scheduler: str = "asha", max_concurrent_trials: int = 2, evaluate: bool = True,
          grace_period: int = 1, reduction_factor: float = 3, seed: int | None = None,
          address: str | None = None, metric: str = METRIC, mode: str | None = None,
          search: str = "random", perturbation_interval: int = 2) -> pd.DataFrame:
    """Run ``num_samples`` trials of ``config`` over ``space``; one row per trial.

    ``metric`` (``METRIC_MODES``: the online kNN, or a label-free score for unlabelled images)
    ranks the trials, better by ``mode`` (its known direction when None). ``scheduler``: "asha"
    stops trials whose metric falls behind at epochs grace_period, grace_period *
    reduction_factor, ...; "pbt" (``orchestration.pbt``) exploits and perturbs the population
    (``num_samples`` trials) every ``perturbation_interval`` epochs; "none" runs every trial to
    the end. The table has the sampled values,
    the best epoch's metric (``best_column``), epochs, status and the trial's MLflow run id.
    ``seed`` makes the sampled configurations and their order reproducible. ``search``:
    ``search_algorithm`` (grid runs each combination once, whatever ``num_samples``). The
    parent run tags ``search``, ``scheduler`` and ``best_run_id``; the best trial's encoder is
    registered as ``models:/<experiment>-encoder@best``.
    """
    cfg = config if isinstance(config, ExperimentConfig) else load_config(config)
    if scheduler not in SCHEDULERS:
        raise ConfigError(f"--scheduler: must be one of {', '.join(SCHEDULERS)} (got {scheduler!r})")
    if num_samples < 1 or max_concurrent_trials < 1:
        raise ConfigError("num_samples and max_concurrent_trials must be >= 1")
    if not 1 <= grace_period <= cfg.optim.epochs:
        raise ConfigError(f"grace_period: must be between 1 and optim.epochs={cfg.optim.epochs}")
    base = _absolute(cfg)
    validate_space(base, space)
    tables = check_source(cfg)
    mode = check_metric(cfg, metric, mode, tables)
    search_algorithm(search, space, seed, 1)  # refuse a space the search cannot take, before Ray
    if scheduler == "pbt":
        check_pbt_space(space, perturbation_interval, cfg.optim.epochs, search)
    if search == "grid":
        num_samples = 1
    check_gpus(cfg, joining=bool(address or os.environ.get("RAY_ADDRESS")))
    ensure_ray(address, max_concurrent_trials * cpus_per_run(cfg),
               resources=custom_resources(cfg, max_concurrent_trials))
    check_cluster(cfg)
    concurrent = trials_in_parallel(max_concurrent_trials, cfg, ray.cluster_resources())
    if scheduler == "pbt" and concurrent < num_samples:
        print(f"sweep: PBT trains its population of {num_samples} together, {concurrent} at a "
              "time here: the rest wait paused at each perturbation point (--max-concurrent "
              f"{num_samples} where the cluster holds it)")
    print_plan(cfg, tables, num_samples, concurrent)
    uri = base["tracking"]["tracking_uri"]
    experiment_id = tracking.start_experiment(uri, cfg.tracking.experiment_name)
    with tracking.open_run(f"sweep-{tracking.run_name(cfg)}") as parent:
        parent_id = parent.info.run_id
        sweep_dir = Path(base["tracking"]["storage_path"]) / f"sweep-{parent_id}"
        sweep_dir.mkdir(parents=True, exist_ok=True)
        (sweep_dir / SWEEP_FILE).write_text(json.dumps({
            "base": base, "parent_run_id": parent_id, "tracking_uri": uri, "evaluate": evaluate,
            "experiment_id": experiment_id, "metric": metric, "mode": mode,
            "experiment_name": cfg.tracking.experiment_name, "scheduler": scheduler,
            "perturbation_interval": perturbation_interval}))
        mlflow.set_tags({"search": search, "scheduler": scheduler})
        tracking.log_sweep_start(cfg, {
            "scheduler": scheduler, "num_samples": num_samples, "seed": seed,
            "max_concurrent_trials": max_concurrent_trials, "method": cfg.method.name,
            "grace_period": grace_period, "reduction_factor": reduction_factor, "metric": metric,
            "mode": mode, "search": search, "perturbation_interval": perturbation_interval},
            space, sweep_dir)
        print(f"sweep {parent_id}: {num_samples} trials; resume with: protoray sweep --resume {sweep_dir}",
              flush=True)
        schedulers = {"asha": lambda: asha_scheduler(cfg.optim.epochs, grace_period, reduction_factor),
                      "pbt": lambda: pbt_scheduler(space, perturbation_interval, EPOCHS,
                                                   cfg.optim.epochs),
                      "none": lambda: None}
        algorithm, sampled = search_algorithm(search, space, seed, concurrent)
        tuner = tune.Tuner(
            _trainable(str(sweep_dir), cfg), param_space=dict(sampled),
            tune_config=tune.TuneConfig(metric=metric, mode=mode, num_samples=num_samples,
                                        search_alg=algorithm, scheduler=schedulers[scheduler]()),
            # a PBT trial that errors restarts from its latest checkpoint: synchronous PBT waits
            # for every trial at each perturbation point, so one lost trial would stall them all
            run_config=tune.RunConfig(name=sweep_dir.name, storage_path=str(sweep_dir.parent),
                                      failure_config=tune.FailureConfig(
                                          max_failures=cfg.scaling.max_failures
                                          if scheduler == "pbt" else 0)),
        )
        return _finish(tuner.fit(), sweep_dir)


def resume_sweep(path: str | Path, address: str | None = None) -> pd.DataFrame:
    """Continue an interrupted sweep: finished trials keep their results, unfinished ones resume
    from their latest Train checkpoint in their existing MLflow child run."""
    sweep_dir = Path(path).resolve()
    if not (sweep_dir / SWEEP_FILE).is_file() or not tune.Tuner.can_restore(str(sweep_dir)):
        raise ConfigError(f"--resume {sweep_dir}: not a protoray sweep directory (it holds no "
                          f"{SWEEP_FILE} and Tune state); the path is printed when a sweep starts")
    spec = json.loads((sweep_dir / SWEEP_FILE).read_text())
    cfg = build_config(spec["base"])
    ensure_ray(address, 2 * cpus_per_run(cfg), resources=custom_resources(cfg, 2))
    mlflow.set_tracking_uri(spec["tracking_uri"])
    with tracking.open_run(run_id=spec["parent_run_id"]):
        tuner = tune.Tuner.restore(str(sweep_dir), _trainable(str(sweep_dir), cfg),
                                   resume_unfinished=True, resume_errored=True)
        return _finish(tuner.fit(), sweep_dir)


def _finish(results: tune.ResultGrid, sweep_dir: Path) -> pd.DataFrame:
    """The table, child runs of early-stopped trials closed, table and plot on the parent run."""
    spec = json.loads((sweep_dir / SWEEP_FILE).read_text())
    client = MlflowClient(spec["tracking_uri"])
    children = tracking.trial_runs(client, spec["experiment_id"], spec["parent_run_id"])
    max_epochs = spec["base"]["optim"]["epochs"]
    metric, mode = spec.get("metric", METRIC), spec.get("mode", "max")
    column, pick = best_column(metric), max if mode == "max" else min
    rows, curves, exploits = [], {}, {}
    for result in results:
        # from the trial's directory (``_trial_<id>_<n>_...``): an exploited trial's metrics may
        # be its donor's; Optuna's ids have no underscore, the variant generator's have one
        trial_id = next((t for t in children if Path(result.path).name.startswith(f"_trial_{t}_")),
                        (result.metrics or {}).get("trial_id"))
        child = children.get(trial_id)
        # every epoch trained is one entry (a PBT trial may train an epoch number twice: its own,
        # then the donor's); the last epoch reached says whether it finished
        history = client.get_metric_history(child.info.run_id, metric) if child else []
        history = sorted(history, key=lambda m: m.timestamp)
        epochs = len(history)
        best = pick((m.value for m in history if not math.isnan(m.value)), default=math.nan)
        reached = max((m.step + 1 for m in history), default=0)
        status = "error" if result.error else ("finished" if reached >= max_epochs else "stopped early")
        if child and child.info.status == "RUNNING":  # stopped by Tune or failed mid-function
            reason = str(result.error).strip().splitlines()[-1] if result.error else ""
            tracking.close_trial_run(client, child.info.run_id, status, reason)
        rows.append({**result.config, column: best, "epochs": epochs, "status": status,
                     "trial_id": trial_id, "mlflow_run_id": child.info.run_id if child else None})
        curves[trial_id] = [(m.step, m.value) for m in history]
        exploits[trial_id] = sorted(int(k.removeprefix("exploit_e")) for k in
                                    (child.data.tags if child else {}) if k.startswith("exploit_e"))
    table = pd.DataFrame(rows).sort_values(column, ascending=mode == "min", na_position="last")
    table = table.reset_index(drop=True)
    keys = [k for k in results[0].config] if len(results) else []
    tracking.log_sweep_table(table, column, {
        "sweep_knn.png" if column == "best_knn" else "sweep_metric.png":
            sweep_plots.metric_by_value(table, keys, column),
        "sweep_parallel_coordinates.png": sweep_plots.parallel_coordinates(table, keys, column),
        "sweep_learning_curves.png": sweep_plots.learning_curves(curves, metric, exploits)})
    _mark_best(table, column, spec)
    return table


def _mark_best(table: pd.DataFrame, column: str, spec: dict) -> None:
    """Tag the parent run with the best finished trial's run id and register its encoder as
    ``models:/<experiment>-encoder@best`` (nothing when no trial finished with a score)."""
    done = table[(table["status"] == "finished") & table[column].notna()
                 & table["mlflow_run_id"].notna()]
    if done.empty:
        return
    best = str(done.iloc[0]["mlflow_run_id"])  # the table is sorted best first
    mlflow.set_tag("best_run_id", best)
    uri = tracking.register_encoder(best, spec.get("experiment_name", "protoray"))
    mlflow.set_tag("best_model", uri)
    print(f"sweep: best trial run {best} ({column} {done.iloc[0][column]:.4g}); encoder "
          f"registered as {uri}")


def format_table(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.4g}")


SPACE_FUNCTIONS = {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint,
                   "choice": tune.choice, "grid_search": tune.grid_search}


def load_space(path: str | Path) -> dict[str, Any]:
    """A space YAML: ``config.path: {loguniform: [0.05, 0.5]}`` (or uniform, randint, choice,
    grid_search); any other value is a constant."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--space {path}: file does not exist")
    tree = yaml.safe_load(path.read_text()) or {}
    if not isinstance(tree, dict):
        raise ConfigError(f"--space {path}: expected a mapping of config paths to search domains")
    space = {}
    for key, value in tree.items():
        if isinstance(value, dict) and len(value) == 1 and next(iter(value)) in SPACE_FUNCTIONS:
            name, args = next(iter(value.items()))
            try:
                space[key] = (SPACE_FUNCTIONS[name](args) if name in ("choice", "grid_search")
                              else SPACE_FUNCTIONS[name](*args))
            except (TypeError, ValueError, AssertionError) as exc:
                raise ConfigError(f"--space {path}: {key}: bad {name} arguments {args!r} ({exc})") from None
        elif isinstance(value, dict):
            raise ConfigError(f"--space {path}: {key}: use one of {sorted(SPACE_FUNCTIONS)} "
                              f"(got {sorted(value)})")
        else:
            space[key] = value
    return space
