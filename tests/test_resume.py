"""`protoray train --resume RUN_ID` after the driver process was SIGKILLed: the same MLflow run
continues from the latest Ray Train checkpoint, every epoch logged once."""

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


def test_a_killed_driver_resumes_the_same_run(ray_cluster, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    address = ray_cluster.get_runtime_context().gcs_address
    MlflowClient(uri).search_experiments()  # the store's tables exist before two processes poll it
    first = subprocess.Popen(
        _cli(str(ROOT / "configs" / "tiny_digits.yaml"), "--set", "optim.epochs=4",
             "--set", f"tracking.storage_path={tmp_path}/ray", "--tracking-uri", uri,
             "--address", address), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True)
    deadline, logged = time.time() + 300, []
    try:
        while time.time() < deadline and len(logged) < 2:  # kill after epoch 2 of 4
            time.sleep(0.5)
            client = MlflowClient(uri)
            experiment = client.get_experiment_by_name("tiny")
            runs = client.search_runs([experiment.experiment_id]) if experiment else []
            logged = client.get_metric_history(runs[0].info.run_id, "loss") if runs else []
    finally:
        first.send_signal(signal.SIGKILL)
        output = first.communicate()[0]
    assert len(logged) >= 2, output[-3000:]
    assert len(logged) < 4  # killed mid-run
    run_id = output.split("protoray train --resume ")[1].split()[0]  # printed at the start

    second = subprocess.run(_cli("--resume", run_id, "--tracking-uri", uri, "--address", address),
                            cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-3000:] + second.stderr[-3000:]

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    assert run.info.run_id == run_id and run.info.status == "FINISHED"
    assert [m.step for m in client.get_metric_history(run_id, "loss")] == [0, 1, 2, 3]
    assert "test_knn" in run.data.metrics and "test_linear" in run.data.metrics

    with pytest.raises(ConfigError, match="already finished"):
        resume(run_id, uri)
    with pytest.raises(ConfigError, match="no such run"):
        resume("0" * 32, uri)
