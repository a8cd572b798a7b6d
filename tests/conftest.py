"""Shared fixtures: one real local Ray cluster for the whole session, MLflow in a temp sqlite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# A loaded 2-core machine can take over Train's default 60 s to start a worker process; a timed-out
# start is retried, and in Ray 2.60 the retry can leave the first placement group holding its CPUs.
WORKER_START_TIMEOUT = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 6 logical CPUs: two sweep trials (each a trial driver, one
    worker and the prototype actor) fit on this 2-core machine, as logical CPUs. Fast health
    checks so killed workers are noticed quickly."""
    import ray

    env = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1", **WORKER_START_TIMEOUT}
    os.environ.update(env)
    # The dashboard serves the state API that Train's PlacementGroupCleaner polls: without it, the
    # placement group of a Train run whose trial Tune stopped is never removed.
    ray.init(num_cpus=6, include_dashboard=True, dashboard_host="127.0.0.1", log_to_driver=False,
             runtime_env={"env_vars": env})
    yield ray
    ray.shutdown()


@pytest.fixture
def tiny_config(tmp_path):
    """The tiny digits PCL config with MLflow and Ray storage inside this test's temp dir."""
    from orchestration.config import load_config

    def make(*overrides: str):
        return load_config(ROOT / "configs" / "tiny_digits.yaml", [
            f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
            f"tracking.storage_path={tmp_path}/ray",
            "scaling.max_failures=2",
            *overrides,
        ])

    return make
