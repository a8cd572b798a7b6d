"""`protoray train --resume RUN_ID` after the driver was interrupted (Ctrl-C) or SIGKILLed: the
same MLflow run continues from the latest Ray Train checkpoint, every epoch logged once."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestration.config import ConfigError
from orchestration.run import resume
from tests.conftest import ROOT

pytestmark = pytest.mark.slow


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestration.cli", "train", *args]


def _wait_for_epochs(uri: str, at_least: int, process: subprocess.Popen) -> list:
    """The run's logged ``loss`` steps once there are ``at_least`` (or the process ended)."""
    deadline, logged = time.time() + 300, []
    while time.time() < deadline and len(logged) < at_least and process.poll() is None:
        time.sleep(0.5)
        client = MlflowClient(uri)
        experiment = client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        logged = client.get_metric_history(runs[0].info.run_id, "loss") if runs else []
    return logged


def test_an_interrupted_then_killed_driver_resumes_the_same_run(ray_cluster, tmp_path):
    """Ctrl-C (SIGINT) after epoch 1 of 4 prints the resume command (exit 130); that resumed
    driver is SIGKILLed after epoch 2; resuming again finishes the one run, each epoch once."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    address = ray_cluster.get_runtime_context().gcs_address
    MlflowClient(uri).search_experiments()  # the store's tables exist before two processes poll it
    run = dict(cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = subprocess.Popen(
        _cli(str(ROOT / "configs" / "tiny_digits.yaml"), "--set", "optim.epochs=4",
             "--set", f"tracking.storage_path={tmp_path}/ray", "--tracking-uri", uri,
             "--address", address), **run)
    logged = _wait_for_epochs(uri, 1, first)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=120)[0]
    assert logged and first.returncode == 130, output[-3000:]
    resume_line = output.split("continue with: ")[1].splitlines()[0]
    run_id = resume_line.split("--resume ")[1].split()[0]
    assert resume_line == f"protoray train --resume {run_id} --tracking-uri {uri}"

    second = subprocess.Popen(_cli("--resume", run_id, "--tracking-uri", uri, "--address", address),
                              **run)
    try:
        logged = _wait_for_epochs(uri, 2, second)
    finally:
        second.send_signal(signal.SIGKILL)
        output = second.communicate()[0]
    assert 2 <= len(logged) < 4, output[-3000:]  # killed mid-run

    third = subprocess.run(_cli("--resume", run_id, "--tracking-uri", uri, "--address", address),
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]

    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.info.run_id == run_id and found.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2, 3]
    assert "test_knn" in found.data.metrics and "test_linear" in found.data.metrics

    with pytest.raises(ConfigError, match="already finished"):
        resume(run_id, uri)
    with pytest.raises(ConfigError, match="no such run"):
        resume("0" * 32, uri)
