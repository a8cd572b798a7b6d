"""Epoch time through Ray Train with one worker over the plain single-process ``fit``, same data,
seed, method and thread count, in one invocation.

What is measured
    Both paths train the same method from ``configs/moco_fashion_mnist.yaml`` (MoCo v2: no E-step,
    so this isolates Train's own cost; ``benchmarks/estep.py`` measures the prototype actor) on the
    first ``--limit`` Fashion-MNIST images minus the 1,000-image kNN hold-out.

    * fit: ``methods.training.fit`` in this process, ``--threads`` torch threads.
    * Ray Train: ``orchestration.run.train`` with one worker of ``--threads`` CPUs (the worker sets
      the same torch threads), a local Ray cluster, MLflow in a temp sqlite store.

    "epoch s" is the median over epochs of the time a training epoch takes inside its process
    (what both paths report as ``epoch_s``); the first epoch is left out on both sides as
    warm-up. "per-epoch s incl. reporting" adds, for Ray, the rank-0 work each epoch costs beyond
    training (online kNN on the hold-out, checkpoint to storage, report): the time between
    consecutive epoch reports in MLflow. "wall" is everything from the call to its return,
    including Ray's start-up and the worker group; it is printed, not targeted. The two paths
    alternate ``--repeats`` times and the medians are compared. Target: epoch ratio <= 1.05.

Run: ``python benchmarks/ray_overhead.py [--limit 20000 --epochs 3 --repeats 2]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import mlflow
import ray
import torch

from methods.training import OptimConfig, fit
from orchestration.builders import load_splits, make_method
from orchestration.config import load_config
from orchestration.run import train

CONFIG = Path(__file__).resolve().parent.parent / "configs" / "moco_fashion_mnist.yaml"


def run_fit(cfg) -> dict[str, float]:
    torch.set_num_threads(int(cfg.scaling.cpus_per_worker))
    splits = load_splits(cfg)
    method = make_method(cfg, splits.train.in_channels, splits.train.image_size)
    o = cfg.optim
    start = time.perf_counter()
    history = fit(method, splits.train, o.epochs, o.batch_size,
                  OptimConfig(o.lr, o.momentum, o.weight_decay, o.warmup_epochs), seed=cfg.seed)
    wall = time.perf_counter() - start
    epochs = [h["epoch_s"] for h in history[1:]]
    return {"epoch_s": statistics.median(epochs), "per_epoch_s": statistics.median(epochs), "wall_s": wall}


def run_ray(cfg) -> dict[str, float]:
    start = time.perf_counter()
    summary = train(cfg, evaluate=False)
    wall = time.perf_counter() - start
    client = mlflow.MlflowClient(summary.tracking_uri)
    epoch_s = [m.value for m in client.get_metric_history(summary.run_id, "epoch_s")][1:]
    stamps = sorted(m.timestamp for m in client.get_metric_history(summary.run_id, "epoch_s"))
    between = [(b - a) / 1000 for a, b in zip(stamps, stamps[1:], strict=False)]
    return {"epoch_s": statistics.median(epoch_s), "per_epoch_s": statistics.median(between),
            "wall_s": wall}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        cfg = load_config(CONFIG, [
            f"data.limit={args.limit}", f"optim.epochs={args.epochs}", "optim.warmup_epochs=0",
            "scaling.num_workers=1", f"scaling.cpus_per_worker={args.threads}",
            f"tracking.tracking_uri=sqlite:///{tmp}/mlruns.db", f"tracking.storage_path={tmp}/ray",
            "tracking.experiment_name=ray-overhead"])
        ray.init(num_cpus=args.threads + 2, include_dashboard=False)
        runs: dict[str, list[dict[str, float]]] = {"fit": [], "ray": []}
        for repeat in range(args.repeats):
            order = ("fit", "ray") if repeat % 2 == 0 else ("ray", "fit")
            for path in order:
                result = run_fit(cfg) if path == "fit" else run_ray(cfg)
                print(f"  repeat {repeat} {path}: epoch {result['epoch_s']:.2f}s, "
                      f"wall {result['wall_s']:.1f}s", flush=True)
                runs[path].append(result)

    med = {path: {key: statistics.median(r[key] for r in rs) for key in rs[0]} for path, rs in runs.items()}
    n_train = args.limit - cfg.data.knn_holdout
    print(f"\nMoCo v2, {n_train} images, batch {cfg.optim.batch_size}, {args.epochs} epochs, "
          f"{args.threads} threads, median of {args.repeats}")
    print(f"{'path':12}{'epoch s':>10}{'per-epoch s incl. reporting':>30}{'wall s':>10}")
    for path, r in med.items():
        print(f"{path:12}{r['epoch_s']:10.2f}{r['per_epoch_s']:30.2f}{r['wall_s']:10.1f}")
    ratio = med["ray"]["epoch_s"] / med["fit"]["epoch_s"]
    with_reporting = med["ray"]["per_epoch_s"] / med["fit"]["per_epoch_s"]
    print(f"epoch ratio Ray/fit {ratio:.3f} (target <= 1.05); incl. reporting {with_reporting:.3f}")
    print(json.dumps({"epoch_ratio": round(ratio, 3), "epoch_ratio_incl_reporting": round(with_reporting, 3),
                      "fit_epoch_s": round(med["fit"]["epoch_s"], 2),
                      "ray_epoch_s": round(med["ray"]["epoch_s"], 2),
                      "ray_wall_s": round(med["ray"]["wall_s"], 1),
                      "fit_wall_s": round(med["fit"]["wall_s"], 1)}))


if __name__ == "__main__":
    main()
