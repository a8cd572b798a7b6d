"""The online linear probe's extra cost per epoch of a config (default ``configs/demo.yaml``):
the same method trained with and without the probe in one process, as one Ray Train worker runs.

What is measured
    One rank's training pass of the config: ``train_epoch`` over ``--steps`` batches of the
    per-worker size (``optim.batch_size / scaling.num_workers``) with the worker's thread count
    (``scaling.cpus_per_worker``), timed in windows with the probe (``methods.evaluation.online_probe``) and
    without; plus the online evaluation every epoch ends with: the hold-out encoding and kNN, and
    with the probe its hold-out accuracy. The probe's own step is also timed directly inside the
    probed windows, the figure least disturbed by a busy machine. The E-step (k-means) is left
    out of the epoch, so the ratio is against the smaller denominator: the cost as a share of the
    whole demo epoch is lower still. One process has no other rank, so the probe's per-step
    all-reduce (about 10 KB for the demo's 256-d feature and 10 classes) is not in the figures.

    The machine may be shared, so the windows are interleaved: every repeat times one window of
    each arm, alternating which goes first, on the same method (its cost per step does not change
    as it trains); the medians over ``--repeats`` are reported.

Run: ``python benchmarks/online_probe.py [configs/demo.yaml --steps 0 --repeats 5]``
(``--steps 0``: a full epoch of the rank, the steps ``protoray train`` runs). The last line of the
output is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from methods.evaluation.online_probe import OnlineProbe, embedding_dim
from methods.training import make_optimizer, train_epoch
from orchestration.builders import load_splits, make_method
from orchestration.config import load_config
from orchestration.shards import MemoryShard
from orchestration.worker import _online_scores

WARMUP_STEPS = 2


class TimedProbe(OnlineProbe):
    """An ``OnlineProbe`` that adds the seconds of every ``step`` to ``seconds``."""

    seconds: float = 0.0

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        start = time.perf_counter()
        out = super().step(features, labels)
        self.seconds += time.perf_counter() - start
        return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("config", nargs="?", default="configs/demo.yaml")
    parser.add_argument("--steps", type=int, default=0,
                        help="training steps per window; 0: a full epoch of one rank")
    parser.add_argument("--repeats", type=int, default=5, help="windows per arm (median reported)")
    args = parser.parse_args(argv)

    cfg = load_config(args.config)
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))
    world = cfg.scaling.num_workers
    splits = load_splits(cfg)
    shard = MemoryShard(splits, cfg.optim.batch_size // world, cfg.seed, 0, world)
    steps = args.steps or shard.steps
    method = make_method(cfg, shard.in_channels, shard.image_size)
    method.bind_data(shard.num_images, 0, world)
    optimizer, scheduler = make_optimizer(method, cfg.optim.training(), shard.steps,
                                          args.repeats * 2 + 1)
    probe = TimedProbe(embedding_dim(method, shard.in_channels, shard.image_size),
                       shard.num_classes(), seed=cfg.seed)
    bank, holdout = shard.knn_sets()
    print(f"{args.config}: {cfg.method.name}, {cfg.model.backbone}, {shard.batch_size} images per "
          f"step (one of {world} ranks), {steps} of the epoch's {shard.steps} steps per window, "
          f"{torch.get_num_threads()} thread(s), {args.repeats} repeats; hold-out "
          f"{len(holdout)}, probe {probe.linear.in_features} -> {probe.num_classes}", flush=True)

    batches = (b for epoch in range(10**6) for b in shard.batches(epoch))
    window = {"none": [], "probe": []}
    evaluation = {"none": [], "probe": []}
    probe_step_s: list[float] = []
    scores: dict[str, dict[str, float]] = {}
    train_epoch(method, (next(batches) for _ in range(WARMUP_STEPS)), WARMUP_STEPS, optimizer,
                scheduler, 0, probe=probe)
    for repeat in range(args.repeats):
        arms = ("none", "probe") if repeat % 2 == 0 else ("probe", "none")
        for arm in arms:
            used = probe if arm == "probe" else None
            probe.seconds = 0.0
            start = time.perf_counter()
            train_epoch(method, (next(batches) for _ in range(steps)), steps, optimizer, scheduler,
                        repeat, probe=used)
            window[arm].append(time.perf_counter() - start)
            if used is not None:
                probe_step_s.append(probe.seconds / steps)
            start = time.perf_counter()
            scores[arm] = _online_scores(method, used, bank, holdout, "cpu")
            evaluation[arm].append(time.perf_counter() - start)
        print(f"repeat {repeat + 1}: no probe {window['none'][-1]:.2f} s, probe "
              f"{window['probe'][-1]:.2f} s; knn {scores['probe']['knn_holdout']:.3f}, "
              f"probe_holdout {scores['probe']['probe_holdout']:.3f}", flush=True)

    median = statistics.median
    full = shard.steps / steps  # windows of part of an epoch scale to the whole epoch
    epoch = {arm: median(window[arm]) * full + median(evaluation[arm]) for arm in window}
    direct = median(probe_step_s) * shard.steps
    eval_extra = median(evaluation["probe"]) - median(evaluation["none"])
    print(f"\n{'arm':<9} {'step ms':>8} {'train s':>8} {'eval s':>7} {'epoch s':>8} {'ratio':>6}")
    for arm in ("none", "probe"):
        print(f"{arm:<9} {median(window[arm]) / steps * 1000:>8.1f} "
              f"{median(window[arm]) * full:>8.2f} {median(evaluation[arm]):>7.3f} "
              f"{epoch[arm]:>8.2f} {epoch[arm] / epoch['none']:>6.3f}")
    print(f"probe step timed directly: {median(probe_step_s) * 1000:.2f} ms x {shard.steps} steps "
          f"= {direct:.3f} s, {100 * direct / epoch['none']:.2f}% of the no-probe epoch "
          f"(+ {eval_extra * 1000:.1f} ms of hold-out evaluation, median difference)")
    print("(an epoch here: one rank's training pass and the online evaluation, no E-step; "
          f"load average {os.getloadavg()[0]:.2f} at end)")
    headline = {
        "config": args.config, "steps_per_epoch": shard.steps, "steps_per_window": steps,
        "epoch_s_no_probe": round(epoch["none"], 3), "epoch_s_probe": round(epoch["probe"], 3),
        "epoch_ratio": round(epoch["probe"] / epoch["none"], 4),
        "probe_step_ms": round(median(probe_step_s) * 1000, 3),
        "probe_share_direct": round(direct / epoch["none"], 4),
    }
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
