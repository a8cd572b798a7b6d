"""`protoray train --resume RUN_ID` after the driver was interrupted (Ctrl-C) or SIGKILLed: the
same MLflow run continues from the latest Ray Train checkpoint, every epoch logged once. The same
runs show what a person sees from ``protoray train``: one line per epoch, no Ray dumps or library
warnings."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from mlflow.tracking import MlflowClient

from orchestration.config import ConfigError
from orchestration.run import resume
from tests.conftest import ROOT, WORKER_START_TIMEOUT

pytestmark = pytest.mark.slow


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestration.cli", "train", *args]


EPOCHS = 6  # enough that the drivers are stopped mid-run however fast this machine trains
NOISE = ("TrainingReport(", "FutureWarning", "ConvergenceWarning", "RayTrainWorker", "Traceback")


def _wait_for_epochs(uri: str, at_least: int, process: subprocess.Popen) -> list:
    """The run's logged ``loss`` steps once there are ``at_least`` (or the process ended)."""
    deadline, logged, client = time.time() + 300, [], MlflowClient(uri)
    while time.time() < deadline and len(logged) < at_least and process.poll() is None:
        time.sleep(0.2)
        experiment = client.get_experiment_by_name("tiny")
        runs = client.search_runs([experiment.experiment_id]) if experiment else []
        logged = client.get_metric_history(runs[0].info.run_id, "loss") if runs else []
    return logged


def _epoch_lines(output: str) -> list[str]:
    for noise in NOISE:
        assert noise not in output, output[-3000:]
    return [line for line in output.splitlines() if line.startswith("epoch ")]


def test_an_interrupted_then_killed_driver_resumes_the_same_run(ray_cluster, tmp_path):
    """Ctrl-C (SIGINT) after epoch 1 of 6 prints the resume command (exit 130); that resumed
    driver is SIGKILLed after epoch 2; resuming again finishes the one run, each epoch once.
    The first driver starts its own Ray, as a person's ``protoray train`` does; the resumed ones
    join the test cluster: a run continues on whichever cluster can read its storage path."""
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    address = ray_cluster.get_runtime_context().gcs_address
    MlflowClient(uri).search_experiments()  # the store's tables exist before two processes poll it
    run = dict(cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    embedded = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    first = subprocess.Popen(
        _cli(str(ROOT / "configs" / "tiny_digits.yaml"), "--set", f"optim.epochs={EPOCHS}",
             "--set", f"tracking.storage_path={tmp_path}/ray", "--tracking-uri", uri),
        env={**embedded, **WORKER_START_TIMEOUT}, **run)
    logged = _wait_for_epochs(uri, 1, first)
    first.send_signal(signal.SIGINT)
    output = first.communicate(timeout=120)[0]
    assert logged and first.returncode == 130, output[-3000:]
    lines = _epoch_lines(output)
    assert lines and lines[0].startswith(f"epoch 1/{EPOCHS}") and "knn" in lines[0], output[-3000:]
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
    assert 2 <= len(logged) < EPOCHS, output[-3000:]  # killed mid-run

    third = subprocess.run(_cli("--resume", run_id, "--tracking-uri", uri, "--address", address),
                           cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    lines = _epoch_lines(third.stdout + third.stderr)
    assert lines[-1].startswith(f"epoch {EPOCHS}/{EPOCHS}") and "e-step" in lines[-1], third.stdout
    assert len(lines) < EPOCHS  # the epochs logged before are not printed again
    assert "raw pixels" in third.stdout  # the final evaluation's table

    client = MlflowClient(uri)
    (found,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert found.info.run_id == run_id and found.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(EPOCHS))
    assert "test_knn" in found.data.metrics and "test_linear" in found.data.metrics

    with pytest.raises(ConfigError, match="already finished"):
        resume(run_id, uri)
    with pytest.raises(ConfigError, match="no such run"):
        resume("0" * 32, uri)
