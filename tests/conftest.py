"""Shared fixtures: one real local Ray cluster for the whole session, MLflow in a temp sqlite."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def ray_cluster():
    """A real local Ray cluster with 4 logical CPUs (two workers + the prototype actor fit on this
    2-core machine; they are logical). Fast health checks so killed workers are noticed quickly."""
    import ray

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.1"}})
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
