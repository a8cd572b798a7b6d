"""Does a label-free score pick the right run? PCL trained on Fashion-MNIST as unlabelled images
at several temperatures, ProtoNCE weights (lambda) and cluster counts; each run scored by the
label-free scores and by the kNN accuracy the labels would give.

What is measured
    Every run trains ``--config`` (default ``configs/pcl_fashion_mnist.yaml``) in one process
    (``methods.training.fit``) on the first ``--limit`` training images less a seeded hold-out of
    ``data.knn_holdout``, with the labels removed (-1) before training. At the end:

    - the label-free scores of ``methods.evaluation.label_free`` on the hold-out images, the
      fixed held-out sample of the training source ``protoray train`` logs them on: ``rankme``,
      ``alignment``, ``uniformity`` (``encoder_scores``), and ``cluster_entropy`` of a k-means
      of the training features at the run's cluster counts (the E-step's assignment);
    - the weighted kNN accuracy (k=200) of the 10,000 test images against the training images,
      with their labels: the score the label-free ones stand in for.

    For each score: the Spearman correlation with the kNN over the runs (signed so that +1 means
    "better score, better kNN": alignment and uniformity are better when lower), and the kNN of
    the run it would pick against the best kNN of all runs. Goal: the best label-free score picks
    a run within 1 point of the best kNN.

Run: ``python benchmarks/label_free.py [--limit 10000 --epochs 6]`` (one process, 2 threads;
``--quick`` trains 4 small runs for 1 epoch, a smoke check). The last line of the output is one
JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import itertools
import json
import time

import numpy as np
import torch
from scipy.stats import spearmanr

from methods.clustering.kmeans import run_kmeans
from methods.data.datasets import ImageDataset, load_fashion_mnist
from methods.evaluation.knn import knn_accuracy
from methods.evaluation.label_free import LABEL_FREE_MODES, cluster_entropy, encoder_scores
from methods.training import encode, fit
from orchestration.builders import load_splits, make_method
from orchestration.config import load_config

GRID = {"method.temperature": [0.1, 0.2, 0.5], "method.proto_weight": [0.5, 2.0],
        "clustering.num_clusters": [[25, 50], [100, 200]]}
SCORES = tuple(LABEL_FREE_MODES)


def train_and_score(cfg, seed: int) -> dict[str, float]:
    """Train ``cfg`` without labels; its label-free scores on the hold-out and its test kNN."""
    splits = load_splits(cfg)
    train = ImageDataset(splits.train.images, torch.full_like(splits.train.labels, -1))
    method = make_method(cfg, train.in_channels, train.image_size)
    start = time.perf_counter()
    o, c = cfg.optim, cfg.clustering
    fit(method, train, o.epochs, o.batch_size, o.training(), c.num_clusters, seed=cfg.seed,
        nredo=c.nredo, niter=c.niter)
    seconds = time.perf_counter() - start
    scores = encoder_scores(method, splits.holdout.images, seed)
    clusters = run_kmeans(encode(method.cluster_embed, train.images, method), c.num_clusters,
                          seed=seed, nredo=1)
    scores["cluster_entropy"] = float(np.mean([cluster_entropy(a, k) for a, k in zip(
        clusters.assignments, clusters.num_clusters, strict=True)]))
    test = load_fashion_mnist(split="test")
    bank = encode(method.embed, splits.train.images, method, native_size=True)
    queries = encode(method.embed, test.images, method, native_size=True)
    scores["knn"] = knn_accuracy(bank, splits.train.labels.numpy(), queries, test.labels.numpy())
    scores["train_s"] = seconds
    return scores


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/pcl_fashion_mnist.yaml")
    parser.add_argument("--limit", type=int, default=10_000)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--quick", action="store_true", help="4 runs of 1 epoch on 3,000 images")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)
    grid = dict(GRID)
    limit, epochs = args.limit, args.epochs
    if args.quick:
        grid["method.proto_weight"], grid["method.temperature"] = [1.0], [0.1, 0.5]
        limit, epochs = 3000, 2
    common = [f"data.limit={limit}", f"optim.epochs={epochs}", "method.warmup_epochs=1",
              "method.queue_size=4096", "clustering.nredo=2", "scaling.num_workers=1"]
    keys = list(grid)
    rows = []
    print(f"{len(list(itertools.product(*grid.values())))} runs of {args.config}, {epochs} epochs "
          f"on the first {limit} Fashion-MNIST training images without labels")
    header = ["temperature", "lambda", "K"] + list(SCORES) + ["knn", "train_s"]
    print("".join(f"{h:>16}" for h in header))
    for values in itertools.product(*grid.values()):
        sets = [f"{k}={json.dumps(v)}" for k, v in zip(keys, values, strict=True)]
        cfg = load_config(args.config, common + sets)
        row = {"params": dict(zip(keys, values, strict=True)), **train_and_score(cfg, cfg.seed)}
        rows.append(row)
        shown = [values[0], values[1], "/".join(map(str, values[2]))]
        print("".join(f"{v:>16}" for v in shown)
              + "".join(f"{row[k]:16.4f}" for k in [*SCORES, "knn"]) + f"{row['train_s']:16.0f}",
              flush=True)
    knn = np.array([r["knn"] for r in rows])
    best = float(knn.max())
    summary: dict[str, float] = {"runs": len(rows), "best_knn": round(best, 4)}
    print(f"\n{'score':18}{'spearman vs kNN':>18}{'picked kNN':>12}{'best kNN':>10}{'gap points':>12}")
    for score in SCORES:
        sign = 1.0 if LABEL_FREE_MODES[score] == "max" else -1.0
        values = sign * np.array([r[score] for r in rows])
        rho = float(spearmanr(values, knn).statistic)
        picked = float(knn[int(np.argmax(values))])
        gap = 100 * (best - picked)
        print(f"{score:18}{rho:18.3f}{picked:12.4f}{best:10.4f}{gap:12.2f}")
        summary[f"spearman_{score}"] = round(rho, 3)
        summary[f"gap_points_{score}"] = round(gap, 2)
    best_score = max(SCORES, key=lambda s: summary[f"spearman_{s}"])
    summary["best_score"] = best_score
    summary["best_score_gap_points"] = summary[f"gap_points_{best_score}"]
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
