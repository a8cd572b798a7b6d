"""Ray Tune sweeps on a real local cluster with tiny data: ASHA, nested MLflow runs, resume."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient
from ray import tune

from orchestration.config import ConfigError, load_config
from orchestration.sweep import load_space, run_sweep, validate_space
from tests.conftest import ROOT

TINY = ROOT / "configs" / "tiny_digits.yaml"


def _children(uri: str, parent: str) -> list:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return client.search_runs(experiments, f"tags.`mlflow.parentRunId` = '{parent}'")


def _parents(uri: str) -> list:
    client = MlflowClient(uri)
    experiments = [e.experiment_id for e in client.search_experiments()]
    return [r for r in client.search_runs(experiments) if "mlflow.parentRunId" not in r.data.tags]


@pytest.mark.parametrize("space, fragment", [
    ({"method.temprature": tune.uniform(0.1, 0.5)}, "method.temprature"),
    ({"method.temperature": tune.uniform(-0.1, 0.5)}, "must be > 0"),
    ({"clustering.num_clusters": tune.choice([[10, 20], [10, 5000]])}, "5000"),
    ({"optim.bogus": 1}, "optim.bogus"),
    ({"tracking.tracking_uri": "x"}, "cannot be swept"),
    ({"method.temperature": tune.grid_search([0.1, 0.0])}, "value 0.0"),
])
def test_bad_space_names_the_key(space, fragment):
    base = load_config(TINY).model_dump(mode="json")
    with pytest.raises(ConfigError) as err:
        validate_space(base, space)
    assert fragment in str(err.value) and "\n" not in str(err.value)


def test_icl_msr_space_validates_only_with_the_regularizer():
    space = load_space(ROOT / "configs" / "spaces" / "icl_msr.yaml")
    assert {"method.lambda_", "method.gamma", "method.alpha", "method.num_semantics"} <= set(space)
    validate_space(load_config(ROOT / "configs" / "icl_msr_simclr_fashion_mnist.yaml")
                   .model_dump(mode="json"), space)
    with pytest.raises(ConfigError, match="method.lambda_"):
        validate_space(load_config(TINY).model_dump(mode="json"), space)


def test_space_yaml(tmp_path):
    space = load_space(ROOT / "configs" / "spaces" / "tiny_digits.yaml")
    assert set(space) == {"method.temperature", "clustering.num_clusters"}
    bad = tmp_path / "bad.yaml"
    bad.write_text("method.temperature: {logunform: [0.1, 0.5]}\n")
    with pytest.raises(ConfigError, match="method.temperature"):
        load_space(bad)


@pytest.mark.slow
def test_asha_sweep_stops_a_trial_and_nests_runs(ray_cluster, tiny_config):
    cfg = tiny_config("scaling.num_workers=1", "optim.epochs=3")
    # One seeded trial at a time so ASHA sees them in grid order. On digits the untrained
    # encoder's kNN is already high and a small step stays near it, so the second trial (lr 0.05)
    # is below the first (lr 0.001) at both rungs, the second by a wide margin, and is stopped.
    # Between temperatures 0.1 and 0.3 the order changed with the cluster counts.
    space = {"optim.lr": tune.grid_search([0.001, 0.05])}
    table = run_sweep(cfg, space, num_samples=1, scheduler="asha", grace_period=1, reduction_factor=2,
                      max_concurrent_trials=1, evaluate=False)
    print(table.to_string())

    assert len(table) == 2 and table["best_knn"].notna().all()
    assert list(table.sort_values("optim.lr")["status"]) == ["finished", "stopped early"]
    assert table["epochs"].sum() < 2 * 3  # ASHA saved compute

    uri = cfg.tracking.tracking_uri
    (parent,) = _parents(uri)
    children = _children(uri, parent.info.run_id)
    assert sorted(c.info.run_id for c in children) == sorted(table["mlflow_run_id"])
    client = MlflowClient(uri)
    for child, (_, row) in zip(sorted(children, key=lambda c: c.info.run_id),
                               table.sort_values("mlflow_run_id").iterrows(), strict=True):
        epochs = [m.step for m in client.get_metric_history(child.info.run_id, "knn_holdout")]
        assert sorted(epochs) == list(range(row["epochs"]))  # each epoch logged once
        assert child.info.status == ("FINISHED" if row["status"] == "finished" else "KILLED")
        assert child.data.params["optim.lr"] == str(row["optim.lr"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"sweep_table.csv", "sweep_knn.png", "sweep_parallel_coordinates.png",
            "sweep_learning_curves.png", "space.json", "base_config.yaml"} <= artifacts
    assert parent.data.params["scheduler"] == "asha"


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_or_duplicating(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    address = ray_cluster.get_runtime_context().gcs_address
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "orchestration.cli", "sweep", str(TINY),
           "--space", str(ROOT / "configs" / "spaces" / "tiny_digits.yaml"),
           "--num-samples", "2", "--scheduler", "none", "--max-concurrent", "1", "--no-eval",
           "--set", "scaling.num_workers=1", "--set", f"tracking.tracking_uri={uri}",
           "--set", f"tracking.storage_path={tmp_path}/ray", "--address", address]
    client, finished, deadline = MlflowClient(uri), [], time.time() + 240
    with open(tmp_path / "first.log", "w") as log:
        first = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            while time.time() < deadline and not finished:  # kill the driver once a trial is done
                time.sleep(1)
                parents = _parents(uri) if (tmp_path / "mlruns.db").exists() else []
                if parents:
                    finished = [c for c in _children(uri, parents[0].info.run_id)
                                if c.info.status == "FINISHED"]
            assert finished, (tmp_path / "first.log").read_text()[-3000:]
        finally:
            first.send_signal(signal.SIGKILL)
            first.wait()
    done_before = {c.info.run_id: c.info.end_time for c in finished}
    text = (tmp_path / "first.log").read_text()
    sweep_dir = text.split("resume with: protoray sweep --resume ")[1].split()[0]

    second = subprocess.run([sys.executable, "-m", "orchestration.cli", "sweep", "--resume", sweep_dir,
                             "--address", address], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=400)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    (parent,) = _parents(uri)
    children = _children(uri, parent.info.run_id)
    assert len(children) == 2  # no duplicated run for the trial that was interrupted
    assert all(c.info.status == "FINISHED" for c in children)
    for child in children:
        steps = [m.step for m in client.get_metric_history(child.info.run_id, "knn_holdout")]
        assert sorted(steps) == [0, 1, 2]  # every epoch once, resumed ones included
        if child.info.run_id in done_before:  # finished before the kill: not run again
            assert child.info.end_time == done_before[child.info.run_id]
    assert second.stdout.count("finished") == 2


def test_conditional_and_searchable_spaces():
    from orchestration.sweep import search_algorithm

    base = load_config(TINY).model_dump(mode="json")
    conditional = {"optim.lr": tune.choice([0.01, 0.05]),
                   "optim.warmup_epochs": tune.sample_from(lambda spec: int(spec.config["optim.lr"] > 0.02))}
    validate_space(base, conditional)  # sample_from reads the others: checked in its trial
    with pytest.raises(ConfigError, match="--search optuna: optim.warmup_epochs"):
        search_algorithm("optuna", conditional, 0, 2)
    with pytest.raises(ConfigError, match="--search grid: optim.lr is a range"):
        search_algorithm("grid", {"optim.lr": tune.uniform(0.01, 0.1)}, 0, 2)
    _, grid = search_algorithm("grid", {"optim.lr": tune.choice([0.01, 0.05])}, 0, 2)
    assert grid == {"optim.lr": {"grid_search": [0.01, 0.05]}}


def test_credentials_are_redacted_in_params_config_and_tags(tmp_path):
    import mlflow

    from orchestration import tracking

    cfg = load_config(TINY, [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
                             "data.root=https://alice:s3cret@data.example.com/images?token=t0k3n",
                             "tracking.run_name=api_key=k3y"])
    uri = tracking.resolve_tracking_uri(cfg.tracking.tracking_uri)
    tracking.start_experiment(uri, "redact")
    with mlflow.start_run() as run:
        tracking.log_run_start(run.info.run_id, cfg)
    client = MlflowClient(uri)
    stored = client.get_run(run.info.run_id).data
    config_yaml = mlflow.artifacts.load_text(f"runs:/{run.info.run_id}/config.yaml")
    recorded = " ".join([*map(str, stored.params.values()), *stored.tags.values(), config_yaml])
    for secret in ("s3cret", "t0k3n", "k3y"):
        assert secret not in recorded
    assert "https://alice:***@data.example.com" in stored.params["data.root"]


@pytest.mark.slow
def test_optuna_sweep_from_the_cli_registers_the_best_encoder(ray_cluster, tmp_path, capsys):
    from orchestration.cli import main

    space = tmp_path / "space.yaml"
    space.write_text("method.temperature: {loguniform: [0.1, 0.5]}\n")
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    assert main(["sweep", str(TINY), "--space", str(space), "--search", "optuna", "--seed", "0",
                 "--num-samples", "2", "--scheduler", "none", "--set", "optim.epochs=2",
                 "scaling.num_workers=1", f"tracking.tracking_uri={uri}",
                 f"tracking.storage_path={tmp_path}/ray", "tracking.experiment_name=optuna"]) == 0
    (parent,) = _parents(uri)
    children = _children(uri, parent.info.run_id)
    assert len(children) == 2
    for child in children:
        assert child.info.status == "FINISHED" and "test_knn" in child.data.metrics
        assert any(key.startswith("system/") for key in child.data.metrics)  # MLflow system metrics
    best = max(children, key=lambda c: max(m.value for m in MlflowClient(uri).get_metric_history(
        c.info.run_id, "knn_holdout")))
    tags = parent.data.tags
    assert tags["search"] == "optuna" and tags["scheduler"] == "none"
    assert tags["best_run_id"] == best.info.run_id
    version = MlflowClient(uri).get_model_version_by_alias("optuna-encoder", "best")
    assert version.run_id == best.info.run_id
    assert main(["export", "models:/optuna-encoder@best", "--to", str(tmp_path / "enc"),
                 "--tracking-uri", uri]) == 0
    assert (tmp_path / "enc" / "encoder.safetensors").is_file()


def test_sweep_figures_take_mixed_values_missing_scores_and_exploits():
    import pandas as pd

    from orchestration import sweep_plots

    table = pd.DataFrame({"method.temperature": [0.05, 1.0, 0.1],
                          "clustering.num_clusters": [[10, 20], [50], [10, 20]],
                          "best_knn": [0.8, float("nan"), 0.7], "epochs": [3, 1, 3]})
    keys = ["method.temperature", "clustering.num_clusters"]
    figure = sweep_plots.parallel_coordinates(table, keys, "best_knn")
    lines = figure.axes[0].get_lines()
    assert len([ln for ln in lines if len(ln.get_xdata()) == 3]) == 3  # one line per trial
    # temperature spans 20x, so its axis is logarithmic: 0.1 sits log10(2) / log10(20) up it
    worst = next(ln for ln in lines if len(ln.get_xdata()) == 3 and ln.get_ydata()[2] == 0)
    assert worst.get_ydata()[0] == pytest.approx(math.log10(2) / math.log10(20))
    curves = sweep_plots.learning_curves({"a": [(0, 0.5), (1, 0.6), (1, 0.7), (2, 0.72)],
                                          "b": [(0, 0.4)]}, "knn_holdout", {"a": [1], "b": []})
    assert len(curves.axes[0].collections) == 1  # the exploit's star
