"""MLflow: where every run's params, per-epoch metrics and artifacts go.

Per-epoch metrics are logged by a Ray Train ``UserCallback`` on the Train controller, after each
report has been persisted, so an epoch is logged once even when workers restart (a resumed run
starts at the epoch after its checkpoint).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

from mlflow.entities import Metric
from mlflow.tracking import MlflowClient
from ray.train import UserCallback


def resolve_tracking_uri(uri: str) -> str:
    """Make a relative ``sqlite:///file.db`` absolute against this process's working directory,
    so the Train controller and workers (other processes, other cwd) write the same file."""
    prefix = "sqlite:///"
    if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
        return prefix + str(Path(uri[len(prefix):]).resolve())
    return uri


def numeric(metrics: dict) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


class MLflowEpochLogger(UserCallback):
    """Logs rank 0's metrics of every report to one MLflow run, step = epoch."""

    def __init__(self, tracking_uri: str, run_id: str):
        self.tracking_uri = tracking_uri
        self.run_id = run_id

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
        now = int(time.time() * 1000)
        client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])
