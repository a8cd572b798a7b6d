"""The per-worker training loop that Ray Train runs on every rank.

Everything a worker needs arrives in ``config`` (the validated experiment as a dict, and the
prototype actor's handle); rank and world size come from ``ray.train.get_context()``; the only
way out is ``ray.train.report``. Read it top to bottom: set-up, resume, then per epoch an
optional E-step through the actor, one pass over this rank's shard, a report with a checkpoint.
"""

from __future__ import annotations

import os
import signal
import tempfile
import time
import warnings
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from methods.batchnorm import broadcast_batchnorm_stats
from methods.clustering import Prototypes
from methods.evaluation import knn_accuracy
from methods.training import (
    NonFiniteLossError,
    all_ranks,
    encode,
    epoch_batches,
    make_optimizer,
    train_epoch,
)
from orchestration.builders import load_splits, make_method
from orchestration.checkpoints import (
    CHECKPOINT_FILE,
    load_rank_state,
    load_state,
    save_rank_state,
    save_state,
)
from orchestration.config import ExperimentConfig
from orchestration.prototypes import fetch_prototypes

KNN_BANK_SIZE = 5000  # training images the online kNN compares the hold-out slice against


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def train_loop(config: dict) -> None:
    cfg = ExperimentConfig.model_validate(config["experiment"])
    service = config.get("prototype_service")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    # --- set-up: data, method, optimiser (identical on every rank but the augmentation seed)
    splits = load_splits(cfg)
    train = splits.train
    method = make_method(cfg, train.in_channels, train.image_size, rank).to(device)
    method.bind_data(len(train), rank, world)
    if cfg.sync_batchnorm():  # before DDP wraps the model, as torch requires
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    with warnings.catch_warnings():
        # Ray deprecates broadcast_buffers in favour of forward_sync_buffers, which still syncs at
        # init; per-rank buffers (memory-bank shards) must not be overwritten by rank 0's
        warnings.simplefilter("ignore", FutureWarning)
        model = ray.train.torch.prepare_model(method,
                                              parallel_strategy_kwargs={"broadcast_buffers": False})
    per_rank_batch = cfg.optim.batch_size // world
    steps = len(epoch_batches(len(train), per_rank_batch, 0, cfg.seed, rank, world))
    o = cfg.optim
    optimizer, scheduler = make_optimizer(
        method, o.training(), steps,
        o.epochs)

    # --- resume from the latest checkpoint after a failure (all ranks restart together)
    start_epoch, prototypes = 0, None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory) / CHECKPOINT_FILE)
            if method.rank_state() is not None:
                method.load_rank_state(load_rank_state(Path(directory), rank, world))
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        method.generator.manual_seed(cfg.seed * 1000 + rank + 7919 * state["epoch"])
        start_epoch = state["epoch"] + 1
        if state["prototypes"]:
            prototypes = Prototypes.from_state_dict(state["prototypes"])

    shard = torch.arange(len(train))[rank::world]  # what this rank encodes for the E-step
    for epoch in range(start_epoch, o.epochs):
        start = time.perf_counter()
        metrics: dict[str, float] = {"epoch": epoch}

        # --- E-step: cluster every rank's features in the actor, receive the same prototypes
        clustered = method.uses_prototypes(epoch)
        if clustered:
            broadcast_batchnorm_stats(method)  # every shard encoded with rank 0's statistics
            features = encode(method.cluster_embed, train.images[shard], method, device=device,
                              precision=o.precision)
            refs = [ray.put(shard.numpy()), ray.put(features)]
            waited = time.perf_counter()
            prototypes = fetch_prototypes(service, epoch, rank, refs, _barrier, all_ranks)
            metrics["estep_s"] = time.perf_counter() - start
            metrics["estep_wait_s"] = time.perf_counter() - waited
            metrics["kmeans_s"] = prototypes.seconds
        active = prototypes if clustered else None

        # --- M-step: one pass over this rank's shard
        batches = epoch_batches(len(train), per_rank_batch, epoch, cfg.seed, rank, world)
        _inject_nan(config.get("faults"), epoch, rank, method)
        try:
            metrics.update(train_epoch(method, train, batches, optimizer, scheduler, epoch,
                                       active.on_device(device) if active else None, device, model,
                                       total_epochs=cfg.optim.epochs, precision=o.precision))
        except NonFiniteLossError as exc:  # every rank raises at the same step (all_ranks)
            ray.train.report({"epoch": epoch, "stopped": str(exc)})
            return
        metrics["epoch_s"] = time.perf_counter() - start

        # --- report: metrics from every rank; the checkpoint and online kNN from rank 0, plus
        # each rank's own file where the method keeps per-rank state (Ray merges the files)
        if rank == 0:
            metrics["knn_holdout"] = _online_knn(method, train, splits.holdout, device)
        own = method.rank_state()
        if rank == 0 or own is not None:
            with tempfile.TemporaryDirectory() as directory:
                if rank == 0:
                    save_state(Path(directory) / CHECKPOINT_FILE, method, optimizer, scheduler,
                               epoch, active, config["experiment"])
                if own is not None:
                    save_rank_state(Path(directory), rank, world, own)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        _inject_kill(config.get("faults"), epoch, rank)


def _online_knn(method, train, holdout, device) -> float:
    """Weighted kNN accuracy of the hold-out slice against a fixed sample of training images."""
    if len(holdout) == 0:
        return float("nan")
    bank = train.subset(torch.arange(min(KNN_BANK_SIZE, len(train))))
    bank_x = encode(method.embed, bank.images, method, device=device, native_size=True)
    hold_x = encode(method.embed, holdout.images, method, device=device, native_size=True)
    return knn_accuracy(bank_x, bank.labels.numpy(), hold_x, holdout.labels.numpy(),
                        k=min(200, len(bank)))


def _inject_kill(faults: dict | None, epoch: int, rank: int) -> None:
    """Test hook: SIGKILL this worker once, after ``faults["kill_worker_epoch"]``'s report, on
    ``faults["kill_rank"]``. A marker file makes it happen once, as in Ray's own fault tests.
    ``protoray train`` never sets ``faults``."""
    if not faults or faults.get("kill_worker_epoch") != epoch or faults.get("kill_rank", 0) != rank:
        return
    marker = Path(faults["marker_dir"]) / "worker_killed"
    if not marker.exists():
        marker.write_text(str(epoch))
        os.kill(os.getpid(), signal.SIGKILL)


def _inject_nan(faults: dict | None, epoch: int, rank: int, method) -> None:
    """Test hook: poison one weight on rank 0 before ``faults["nan_epoch"]`` so the loss is NaN."""
    if faults and faults.get("nan_epoch") == epoch and rank == 0:
        with torch.no_grad():
            next(method.parameters()).fill_(float("nan"))
