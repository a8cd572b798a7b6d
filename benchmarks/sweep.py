"""ASHA vs. running every trial to the end: 16 PCL trials over temperature x cluster counts on
Fashion-MNIST, compute used (trial-epochs) and the best trial's online kNN accuracy in each.

What is measured
    The same 16 seeded draws from 4 temperatures x 4 cluster-count settings, in the same order,
    are swept twice through ``orchestration.sweep``: once with ASHA (grace 1 epoch, reduction
    factor 4) and once with no scheduler. Trials are seeded and single-threaded, so a
    configuration reaches the same kNN in both sweeps; the full sweep's best is therefore the best
    of the 16, and the question is whether ASHA finds it (or one within 0.5 points) with less
    compute. Seeded random draws rather than the 4 x 4 grid: ASHA is asynchronous, and the grid in
    Tune's order arrives in increasing quality (temperature 0.05 first), so early trials meet no
    better ones; measured with grace 1 and factor 3, it stopped 4 of 16 and used 0.875x.
    Compute = sum over trials of epochs run; wall time is printed too. To fit a 2-core machine
    the trials train on the first ``--limit`` training images (1,000 of them held out for the
    online kNN) for ``--epochs``.
    Target: ASHA compute <= 0.4x, best kNN within 0.5 points of the full sweep's.

Run: ``python benchmarks/sweep.py [--limit 5000 --epochs 6]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import ray
from ray import tune

from orchestration.config import load_config
from orchestration.sweep import run_sweep

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "pcl_fashion_mnist.yaml"
# 16 draws from 4 temperatures x 4 cluster-count settings, the same draws (seeded) in both sweeps
SPACE = {"method.temperature": tune.choice([0.05, 0.1, 0.2, 0.4]),
         "clustering.num_clusters": tune.choice([[10, 20], [10, 20, 50], [25, 50], [50, 100, 200]])}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--max-concurrent", type=int, default=2)
    args = p.parse_args()

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, [
            f"data.limit={args.limit}", f"optim.epochs={args.epochs}", "method.warmup_epochs=1",
            "optim.batch_size=128", "scaling.num_workers=1", "scaling.max_failures=0",
            "clustering.nredo=1", f"tracking.tracking_uri=sqlite:///{tmp}/mlruns.db",
            f"tracking.storage_path={tmp}/ray", "tracking.experiment_name=sweep-benchmark"])
        # the dashboard serves the state API that removes the placement groups of stopped trials
        ray.init(num_cpus=args.max_concurrent * 3, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False)
        for scheduler in ("asha", "none"):
            start = time.perf_counter()
            table = run_sweep(cfg, SPACE, num_samples=16, scheduler=scheduler, evaluate=False, seed=0,
                          max_concurrent_trials=args.max_concurrent, grace_period=1, reduction_factor=4)
            wall = time.perf_counter() - start
            shown = table.drop(columns=["mlflow_run_id", "trial_id"])
            print(f"\n{scheduler}:\n{shown.to_string(index=False)}", flush=True)
            rows[scheduler] = {"trial_epochs": int(table["epochs"].sum()),
                               "best_knn": float(table["best_knn"].max()),
                               "stopped": int((table["status"] == "stopped early").sum()),
                               "wall_min": wall / 60}

    full, asha = rows["none"], rows["asha"]
    print(f"\n16 PCL trials, {args.limit - 1000} images, {args.epochs} epochs, "
          f"{args.max_concurrent} at once")
    print(f"{'scheduler':12}{'trial-epochs':>14}{'stopped':>9}{'best kNN':>10}{'wall min':>10}")
    for name, r in (("ASHA", asha), ("all to end", full)):
        print(f"{name:12}{r['trial_epochs']:14d}{r['stopped']:9d}{r['best_knn']:10.4f}{r['wall_min']:10.1f}")
    compute = asha["trial_epochs"] / full["trial_epochs"]
    gap = 100 * (full["best_knn"] - asha["best_knn"])
    print(f"ASHA compute {compute:.2f}x (target <= 0.4), best kNN {gap:.2f} points below the full grid's "
          f"(target <= 0.5)")
    print(json.dumps({"asha_compute_ratio": round(compute, 3), "best_knn_gap_points": round(gap, 2),
                      "asha_best_knn": round(asha["best_knn"], 4),
                      "full_best_knn": round(full["best_knn"], 4),
                      "asha_wall_min": round(asha["wall_min"], 1),
                      "full_wall_min": round(full["wall_min"], 1)}))


if __name__ == "__main__":
    main()
