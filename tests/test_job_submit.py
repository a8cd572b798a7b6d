"""`ray job submit --working-dir . -- protoray train configs/tiny_digits.yaml` against a real head
node on loopback, with token authentication on, as clusters/local.md describes."""

from __future__ import annotations

import os

import pytest
from mlflow.tracking import MlflowClient

from tests.conftest import ROOT
from tests.local_nodes import kill_processes, start_head, submit, token_env

pytestmark = pytest.mark.slow


@pytest.fixture
def head_node():
    temp_dir = f"/tmp/prj{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    env = token_env()
    _, dashboard = start_head(temp_dir, env, num_cpus=4)
    try:
        yield dashboard, env
    finally:
        kill_processes(temp_dir)


def test_ray_job_submit_runs_protoray_train(head_node, tmp_path):
    address, env = head_node
    tracking = f"sqlite:///{tmp_path}/mlruns.db"  # absolute: the job runs in an unpacked copy
    done = submit(address, env, ["protoray", "train", "configs/tiny_digits.yaml",
                                 "--set", f"tracking.tracking_uri={tracking}",
                                 "--set", f"tracking.storage_path={tmp_path}/ray"], cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "pcl"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    assert "test_knn" in run.data.metrics
