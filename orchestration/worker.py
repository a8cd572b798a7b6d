"""The per-worker training loop that Ray Train runs on every rank.

Everything a worker needs arrives in ``config`` (the validated experiment as a dict, and the
prototype actor's handle); rank and world size come from ``ray.train.get_context()``; the only
way out is ``ray.train.report``. Read it top to bottom: set-up, resume, then per epoch an
optional E-step through the actor, one pass over this rank's shard, a report with a checkpoint.

Rank 0 scores the encoder every epoch on the hold-out slice of the training source with the
label-free scores (``methods.evaluation.label_free``: rankme, alignment, uniformity, and the
cluster-size entropy of the E-step), and where labels exist with the online kNN: against the
``eval_data`` set when the config has one, else the training source's own labelled images.
The online linear probe (``methods.evaluation.online_probe``) rides along where the training
data has labels and no ``eval_data`` is given: every rank trains the same one on its shard's
batches (its gradients all-reduced), rank 0 scores it on the hold-out slice and saves it in the
checkpoint.
"""

from __future__ import annotations

import functools
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist

from methods.base import Batch
from methods.clustering.lloyd import all_reduce_sums
from methods.clustering.prototypes import Prototypes
from methods.encoders.batchnorm import broadcast_batchnorm_stats
from methods.evaluation.knn import knn_accuracy
from methods.evaluation.label_free import LABEL_FREE_SAMPLE, cluster_entropy, encoder_scores
from methods.evaluation.online_probe import OnlineProbe, embedding_dim
from methods.training import (
    NonFiniteLossError,
    all_ranks,
    encode,
    load_optimizer_state,
    make_optimizer,
    sum_over_ranks,
    train_epoch,
)
from orchestration.builders import KNN_BANK_SIZE, labelled_splits, load_splits, make_method
from orchestration.checkpoints import (
    CHECKPOINT_FILE,
    load_rank_state,
    load_state,
    save_rank_state,
    save_state,
)
from orchestration.config import ExperimentConfig
from orchestration.cost_model import choose_strategy
from orchestration.events import announce_rounds, announce_steps, emit
from orchestration.prototypes import (
    exchange_with,
    gathered_prototypes,
    sharded_prototypes,
)
from orchestration.resources import live_cluster
from orchestration.shards import MemoryShard, StreamShard
from orchestration.tracking import system_metrics


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def train_loop(config: dict) -> None:
    rank = ray.train.get_context().get_world_rank()
    with system_metrics(config.get("run_id"), config.get("tracking_uri"), f"rank{rank}"):
        _train_loop(config)


def _train_loop(config: dict) -> None:
    cfg = ExperimentConfig.model_validate(config["experiment"])
    service = config.get("prototype_service")
    plugins = config.get("plugins") or ()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, int(cfg.scaling.cpus_per_worker)))

    # --- set-up: data, method, optimiser (identical on every rank but the augmentation seed)
    per_rank_batch = cfg.optim.batch_size // world
    if config.get("stream"):  # Ray Data decodes this rank's shard while it trains
        shard = StreamShard(config["stream"], cfg.data.image_size, per_rank_batch,
                            cfg.data.prefetch_batches, rank)
    else:
        shard = MemoryShard(load_splits(cfg), per_rank_batch, cfg.seed, rank, world)
    method = make_method(cfg, shard.in_channels, shard.image_size, rank).to(device)
    method.bind_data(shard.num_images, rank, world)
    if cfg.sync_batchnorm():  # before DDP wraps the model, as torch requires
        method = torch.nn.SyncBatchNorm.convert_sync_batchnorm(method)
    with warnings.catch_warnings():
        # Ray deprecates broadcast_buffers in favour of forward_sync_buffers, which still syncs at
        # init; per-rank buffers (memory-bank shards) must not be overwritten by rank 0's
        warnings.simplefilter("ignore", FutureWarning)
        model = ray.train.torch.prepare_model(method,
                                              parallel_strategy_kwargs={"broadcast_buffers": False})
    o = cfg.optim
    optimizer, scheduler = make_optimizer(method, o.training(), shard.steps, o.epochs)
    probe = _make_probe(cfg, shard, method, device)

    # --- resume from the latest checkpoint after a failure (all ranks restart together)
    start_epoch, prototypes, knn_sets = 0, None, None
    # a PBT exploit starts a new Train run from the donor trial's checkpoint; after a failure in
    # that run, Train's own latest checkpoint comes first
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None and config.get("initial_checkpoint"):
        checkpoint = ray.train.Checkpoint(config["initial_checkpoint"])
    if checkpoint:
        with checkpoint.as_directory() as directory:
            state = load_state(Path(directory) / CHECKPOINT_FILE)
            if method.rank_state() is not None:
                method.load_rank_state(load_rank_state(Path(directory), rank, world))
        method.load_state_dict(state["model"])
        load_optimizer_state(optimizer, scheduler, state["optimizer"], state["scheduler"])
        if probe is not None and state.get("probe"):  # older checkpoints have none: a fresh one
            probe.load_checkpoint_state(state["probe"])
        method.generator.manual_seed(cfg.seed * 1000 + rank + 7919 * state["epoch"])
        start_epoch = state["epoch"] + 1
        if state["prototypes"]:
            prototypes = Prototypes.from_state_dict(state["prototypes"])

    for epoch in range(start_epoch, o.epochs):
        start = time.perf_counter()
        metrics: dict[str, float] = {"epoch": epoch}
        emit(plugins, "on_epoch_start", epoch=epoch, rank=rank, method=method)

        # --- E-step: every rank encodes its shard; the actor coordinates the clustering
        # (clustering.strategy); every rank receives the same centroids and phi
        clustered = method.uses_prototypes(epoch)
        if clustered:
            broadcast_batchnorm_stats(method)  # every shard encoded with rank 0's statistics
            indices, features = shard.encode(method.cluster_embed, method, device, o.precision)
            waited = time.perf_counter()
            exchange = announce_rounds(exchange_with(service, rank, _barrier, all_ranks),
                                       plugins, rank)
            c, n = cfg.clustering, shard.num_images
            if choose_strategy(cfg, n, features.shape[1], live_cluster()[1]) == "gather":
                prototypes = gathered_prototypes(exchange, epoch, indices, features, n)
            else:  # the features stay here; only K x D sums travel, round by round
                # the ranks sum their cluster sums over the training group (NCCL, gloo): the
                # actor then receives one K x D payload per round, not one per worker
                reduce = (functools.partial(all_reduce_sums, device=device)
                          if dist.is_initialized() else None)
                prototypes = sharded_prototypes(
                    exchange, epoch, rank, indices, features, n, c.num_clusters, cfg.seed,
                    c.niter, c.nredo, device=device if device.type == "cuda" else "faiss",
                    reduce=reduce)
            del features
            metrics["estep_s"] = time.perf_counter() - start
            metrics["estep_wait_s"] = time.perf_counter() - waited
            metrics["kmeans_s"] = prototypes.seconds
        active = prototypes if clustered else None

        # --- M-step: one pass over this rank's shard
        seen: list[torch.Tensor] = []  # this epoch's image indices, to report repeats
        batches = announce_steps(_recorded(shard.batches(epoch), seen), plugins, epoch, rank)
        try:
            metrics.update(train_epoch(method, batches, shard.steps, optimizer, scheduler, epoch,
                                       active.on_device(device) if active else None, device, model,
                                       total_epochs=cfg.optim.epochs, precision=o.precision,
                                       probe=probe))
        except NonFiniteLossError as exc:  # every rank raises at the same step (all_ranks)
            ray.train.report({"epoch": epoch, "stopped": str(exc)})
            return
        metrics["epoch_s"] = time.perf_counter() - start
        metrics["skipped_images"] = sum_over_ranks(shard.skipped)
        trained = torch.cat(seen) if seen else torch.zeros(0, dtype=torch.long)
        metrics["images_trained"] = sum_over_ranks(len(trained))
        metrics["repeated_images"] = sum_over_ranks(len(trained) - len(trained.unique()))

        # --- report: metrics from every rank; the checkpoint, online kNN and probe from rank 0,
        # plus each rank's own file where the method keeps per-rank state (Ray merges the files)
        if rank == 0:
            knn_sets = knn_sets or _knn_sets(cfg, shard)
            metrics.update(_online_scores(method, probe, *knn_sets, device))
            sample = shard.knn_sets()[1]
            if len(sample) >= 2:  # data.knn_holdout: 0 keeps no images to score
                sample = sample.subset(torch.arange(min(LABEL_FREE_SAMPLE, len(sample))))
                metrics.update(encoder_scores(method, sample.images, cfg.seed, device))
            if clustered:
                metrics["cluster_entropy"] = sum(
                    cluster_entropy(a, k) for a, k in zip(prototypes.assignments,
                                                          prototypes.num_clusters, strict=True)
                ) / len(prototypes.assignments)
        own = method.rank_state()
        if rank == 0 or own is not None:
            with tempfile.TemporaryDirectory() as directory:
                if rank == 0:
                    save_state(Path(directory) / CHECKPOINT_FILE, method, optimizer, scheduler,
                               epoch, active, config["experiment"],
                               probe.checkpoint_state() if probe is not None else None)
                if own is not None:
                    save_rank_state(Path(directory), rank, world, own)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))
        else:
            ray.train.report(metrics)
        emit(plugins, "on_epoch_end", epoch=epoch, rank=rank, method=method, probe=probe)


def _make_probe(cfg: ExperimentConfig, shard: MemoryShard | StreamShard, method, device
                ) -> OnlineProbe | None:
    """The online linear probe, the same on every rank (one seed), or None: switched off
    (``optim.online_probe``), no hold-out slice to score it on, or fewer than two classes
    labelled, or an ``eval_data`` set whose classes are not the training source's (every rank
    takes the same branch: ``shard.num_classes`` agrees across ranks)."""
    if not cfg.optim.online_probe or cfg.data.knn_holdout == 0 or cfg.eval_data is not None:
        return None
    classes = shard.num_classes()
    if classes < 2:
        return None
    dim = embedding_dim(method, shard.in_channels, shard.image_size, device)
    return OnlineProbe(dim, classes, seed=cfg.seed, device=device)


def _knn_sets(cfg: ExperimentConfig, shard: MemoryShard | StreamShard):
    """(bank, queries) of the online kNN: the first ``KNN_BANK_SIZE`` images and the hold-out
    slice of ``eval_data`` (decoded once, converted to the training images' channels and side),
    else of the training source (``shard.knn_sets``)."""
    if cfg.eval_data is None:
        return shard.knn_sets()
    splits = labelled_splits(cfg, shard.in_channels, shard.image_size)
    bank = splits.train.subset(torch.arange(min(KNN_BANK_SIZE, len(splits.train))))
    return bank, splits.holdout


def _online_scores(method, probe: OnlineProbe | None, bank, holdout, device) -> dict[str, float]:
    """``knn_holdout``: weighted kNN accuracy of the hold-out slice against a fixed sample of
    training images; with a probe, ``probe_holdout``: its accuracy on the same slice, from the
    same encoding (``embed`` in eval mode, at the images' own size). Nothing where no image of
    the bank or the slice has a label."""
    if not (bank.is_labelled and holdout.is_labelled):
        return {}
    bank_x = encode(method.embed, bank.images, method, device=device, native_size=True)
    hold_x = encode(method.embed, holdout.images, method, device=device, native_size=True)
    scores = {"knn_holdout": knn_accuracy(bank_x, bank.labels.numpy(), hold_x,
                                          holdout.labels.numpy(), k=min(200, len(bank)))}
    if probe is not None:
        scores["probe_holdout"] = probe.accuracy(torch.from_numpy(hold_x), holdout.labels)
    return scores


def _online_knn(method, bank, holdout, device) -> float:
    """Weighted kNN accuracy of the hold-out slice against a fixed sample of training images."""
    return _online_scores(method, None, bank, holdout, device).get("knn_holdout", float("nan"))


def _recorded(batches: Iterator[Batch], seen: list[torch.Tensor]) -> Iterator[Batch]:
    for batch in batches:
        seen.append(batch.indices)
        yield batch
