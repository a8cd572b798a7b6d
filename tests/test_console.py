"""What a person sees from ``protoray train``: one line per epoch, no Ray dumps or library
warnings unless ``--verbose``."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from orchestration.console import format_epoch

ROOT = Path(__file__).resolve().parents[1]


def test_epoch_line_says_progress_loss_knn_times_and_time_left():
    line = format_epoch(2, 6, {"loss": 6.2071, "knn_holdout": 0.8031, "estep_s": 14.2,
                               "epoch_s": 118.4}, [100.0, 120.0, 140.0])
    assert line == "epoch 3/6  loss 6.207  knn 0.803  e-step 14 s  epoch 118 s  eta 6 min"
    assert format_epoch(0, 3, {"loss": 1.0, "epoch_s": 20.0}, [20.0]).endswith("eta 40 s")
    assert "eta" not in format_epoch(5, 6, {"loss": 1.0}, [1.0] * 6)


@pytest.mark.slow
def test_default_console_is_one_line_per_epoch(tmp_path):
    """The CLI as a user runs it (its own embedded Ray) on the tiny digits config."""
    env = {**os.environ, "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600"}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run(
        [sys.executable, "-m", "orchestration.cli", "train", str(ROOT / "configs" / "tiny_digits.yaml"),
         "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
         "--set", f"tracking.storage_path={tmp_path}/ray"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-3000:]
    for noise in ("TrainingReport(", "FutureWarning", "ConvergenceWarning", "RayTrainWorker"):
        assert noise not in out, out[-3000:]
    epochs = [line for line in out.splitlines() if line.startswith("epoch ")]
    assert [line.split()[1] for line in epochs] == ["1/3", "2/3", "3/3"], out[-3000:]
    assert "e-step" in epochs[1] and "knn" in epochs[0]
    assert "raw pixels" in out
