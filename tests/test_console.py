"""The line ``protoray train`` prints per epoch. The console of whole runs (one line per epoch,
no Ray dumps or library warnings) is checked on the CLI runs of test_resume."""

from __future__ import annotations

from orchestration.console import format_epoch


def test_epoch_line_says_progress_loss_knn_times_and_time_left():
    line = format_epoch(2, 6, {"loss": 6.2071, "knn_holdout": 0.8031, "estep_s": 14.2,
                               "epoch_s": 118.4}, [100.0, 120.0, 140.0])
    assert line == "epoch 3/6  loss 6.207  knn 0.803  e-step 14 s  epoch 118 s  eta 6 min"
    assert format_epoch(0, 3, {"loss": 1.0, "epoch_s": 20.0}, [20.0]).endswith("eta 40 s")
    assert "eta" not in format_epoch(5, 6, {"loss": 1.0}, [1.0] * 6)
