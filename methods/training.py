"""The single-process training loop, in pieces the Ray workers reuse.

``fit`` is the whole loop for one process: per epoch, an E-step (when the method needs
prototypes), then one pass over the shuffled data. ``orchestration.worker`` runs the same
``train_epoch`` and ``encode`` but gets its prototypes from the Ray actor and reports to Ray.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.distributed as dist

from methods.base import Batch, DevicePrototypes, Method
from methods.clustering.kmeans import run_kmeans
from methods.clustering.prototypes import Prototypes
from methods.data.datasets import ImageDataset
from methods.data.views import to_input
from methods.evaluation.online_probe import OnlineProbe, probe_features

PRECISIONS = ("fp32", "bf16")


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or inf; the message names the epoch and step."""


def _reduce_int(value: int, op: dist.ReduceOp) -> int:
    """``value`` reduced over every rank by ``op`` (one tiny all-reduce; ``value`` alone)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    if dist.get_backend() == "nccl":
        t = t.cuda()
    dist.all_reduce(t, op=op)
    return int(t.item())


def all_ranks(flag: bool) -> bool:
    """True only if ``flag`` is true on every rank.

    Used where ranks must take the same branch, e.g. all stop on a NaN loss together instead of
    one rank leaving while the others wait in DDP's gradient all-reduce.
    """
    return _reduce_int(0 if flag else 1, dist.ReduceOp.MAX) == 0


def sum_over_ranks(value: int) -> int:
    """The sum of ``value`` over every rank (counts each rank makes of its own shard)."""
    return _reduce_int(value, dist.ReduceOp.SUM)


@dataclass
class OptimConfig:
    """SGD with momentum, linear warm-up then cosine decay (MoCo v2 / PCL's schedule)."""

    lr: float = 0.06
    momentum: float = 0.9
    weight_decay: float = 5e-4
    warmup_epochs: int = 0
    precision: str = "fp32"  # "bf16": the forward under bfloat16 autocast (see ``train_epoch``)


def epoch_batches(num_samples: int, batch_size: int, epoch: int, seed: int, rank: int = 0,
                  world_size: int = 1) -> list[torch.Tensor]:
    """This rank's batches of dataset indices for one epoch.

    Rank r owns the fixed shard r, r + W, r + 2W, ... (disjoint, the union is the dataset) and
    visits it in a fresh order drawn from (seed, epoch). Fixed shards let a memory bank be
    sharded the same way (InstDisc): every rank reads and writes only rows it owns. The last
    partial batch is dropped so all ranks run the same number of steps (DDP and
    ``ray.train.report`` need that).
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    shard = torch.arange(rank, num_samples, world_size)
    order = shard[torch.randperm(len(shard), generator=g)]
    steps = num_samples // world_size // batch_size
    if steps == 0:
        raise ValueError(f"batch size {batch_size} per worker is larger than the "
                         f"{num_samples // world_size} samples each worker holds")
    return list(order[: steps * batch_size].view(steps, batch_size))


def make_optimizer(method: Method, cfg: OptimConfig, steps_per_epoch: int, epochs: int
                   ) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    params = [p for p in method.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    total, warm = epochs * steps_per_epoch, cfg.warmup_epochs * steps_per_epoch

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def load_optimizer_state(optimizer: torch.optim.Optimizer, scheduler: torch.optim.lr_scheduler.LambdaLR,
                         optimizer_state: dict, scheduler_state: dict) -> None:
    """Restore a checkpoint's optimizer and schedule at their step, keeping the hyperparameters
    ``optimizer`` was built with (lr, momentum, weight decay).

    A run resumed unchanged is unaffected. A PBT exploit restarts from another trial's
    checkpoint with perturbed values, and ``load_state_dict`` would bring back the donor's: the
    schedule's position (its multiplier of the base lr) is kept and rescaled to the new base lr.
    """
    built = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(scheduler_state)
    for group, fresh in zip(optimizer.param_groups, built, strict=True):
        position = group["lr"] / group["initial_lr"]  # the schedule's multiplier at this step
        group.update({k: v for k, v in fresh.items() if k != "lr"})
        group["lr"] = fresh["initial_lr"] * position
    scheduler.base_lrs = [fresh["initial_lr"] for fresh in built]
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]


def autocast_for(device: str | torch.device, precision: str) -> torch.autocast:
    """bfloat16 autocast on ``device`` for ``precision="bf16"``, a disabled one for fp32."""
    if precision not in PRECISIONS:
        raise ValueError(f"optim.precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    return torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=precision == "bf16")


def memory_batches(dataset: ImageDataset, index_batches: Sequence[torch.Tensor]) -> Iterator[Batch]:
    """The ``Batch`` of every index batch (``epoch_batches``) of an in-memory dataset."""
    for idx in index_batches:
        yield Batch(idx, dataset.images[idx], dataset.labels[idx])


def train_epoch(method: Method, batches: Iterable[Batch], steps: int,
                optimizer: torch.optim.Optimizer, scheduler, epoch: int,
                prototypes: DevicePrototypes | None = None, device: str | torch.device = "cpu",
                model: torch.nn.Module | None = None, total_epochs: int | None = None,
                precision: str = "fp32", probe: OnlineProbe | None = None) -> dict[str, float]:
    """One pass over ``batches`` (``steps`` of them, for the progress of schedules that read it);
    returns the mean of every metric the method reports, over the steps that reported it.

    ``batches`` are on the CPU (``memory_batches``, or a Ray Data stream in the workers).
    ``model`` is what is called (a DDP wrapper in workers); ``method`` gets ``on_step_end``, with
    ``method.progress`` set first when ``total_epochs`` is known. ``precision="bf16"`` runs the
    forward under bfloat16 autocast (weights, gradients and optimiser stay float32): on a CPU
    with AMX it makes a SimCLR step much faster (``benchmarks/throughput.py``; figures in
    benchmarks/RESULTS.md), on CUDA it is the usual mixed precision.

    ``probe`` (``methods.evaluation.online_probe``) takes one step per batch on the feature the method's
    forward exposed, detached, with the batch's labels, after the method's own step.
    """
    model = model or method
    autocast = autocast_for(device, precision)
    model.train()
    method.epoch = epoch
    if total_epochs:  # the first step's forward reads it too, in a resumed run as in a fresh one
        method.progress = epoch / total_epochs
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    for step, cpu_batch in enumerate(batches):
        batch = Batch(cpu_batch.indices.to(device), cpu_batch.images.to(device, non_blocking=True),
                      cpu_batch.labels.to(device))
        with autocast:
            loss, metrics = model(batch, prototypes)
        if not all_ranks(bool(torch.isfinite(loss))):
            raise NonFiniteLossError(
                f"loss is not finite ({loss.item()} on this rank) at epoch {epoch} step {step}; "
                f"{method.nonfinite_advice()} (the last good checkpoint is kept)")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        method.before_optimizer_step()
        optimizer.step()
        scheduler.step()
        if total_epochs:
            method.progress = (epoch + min(step + 1, steps) / steps) / total_epochs
        method.on_step_end()
        if probe is not None:
            metrics = {**metrics, **probe.step(probe_features(method, batch.images), batch.labels)}
        for name, value in {"loss": loss.item(), **metrics}.items():
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    out = {name: total / counts[name] for name, total in sums.items()}
    out["lr"] = optimizer.param_groups[0]["lr"]
    return out


@torch.no_grad()
def encode(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, method: Method,
           batch_size: int = 1024, device: str | torch.device = "cpu", precision: str = "fp32",
           native_size: bool = False) -> np.ndarray:
    """``fn`` (e.g. ``method.embed``) over un-augmented images, in eval mode, as float32 numpy.

    ``precision="bf16"`` runs the forward under bfloat16 autocast, as the training step does: the
    E-step encodes every image each epoch, and in fp32 that took a large share of a bf16 epoch
    (benchmarks/RESULTS.md, measurements behind design choices).

    ``native_size=True`` feeds the images at their own side even when the views resize them
    (``ViewSpec.size``): evaluation after training at a lower resolution. Random crops enlarge
    objects, so a network trained on crops sees them larger than a same-size uncropped image
    shows them; testing at a higher resolution than training compensates (Touvron et al. 2019,
    FixRes, sec. 3). PCL trained on 20 px views of Fashion-MNIST scores a better kNN at 28 px than
    at 20 (benchmarks/RESULTS.md, PCL 20 px views, V1).
    """
    spec = replace(method.views, size=None) if native_size else method.views
    was_training = method.training
    method.eval()
    with autocast_for(device, precision):
        out = [fn(to_input(images[i : i + batch_size].to(device), spec)).float().cpu()
               for i in range(0, len(images), batch_size)]
    method.train(was_training)
    return torch.cat(out).numpy()


def fit(method: Method, dataset: ImageDataset, epochs: int, batch_size: int,
        optim: OptimConfig | None = None, num_clusters: Sequence[int] = (),
        seed: int = 0, nredo: int = 5, niter: int = 20,
        device: str | torch.device = "cpu",
        on_epoch_end: Callable[[int, dict[str, float]], None] | None = None
        ) -> list[dict[str, float]]:
    """Train ``method`` in this process; returns one metrics dict per epoch.

    Methods that cluster (``method.schedule``) run an E-step at ``num_clusters`` granularities
    each epoch the schedule makes active, at the schedule's temperature."""
    optim = optim or OptimConfig()
    method.to(device)
    method.bind_data(len(dataset))
    steps = len(epoch_batches(len(dataset), batch_size, 0, seed))
    optimizer, scheduler = make_optimizer(method, optim, steps, epochs)
    history = []
    for epoch in range(epochs):
        start = time.perf_counter()
        prototypes, estep_s = None, 0.0
        if method.uses_prototypes(epoch):
            features = encode(method.cluster_embed, dataset.images, method, device=device,
                              precision=optim.precision)
            found: Prototypes = run_kmeans(features, num_clusters, method.schedule.temperature,
                                           seed + epoch, niter=niter, nredo=nredo)
            prototypes, estep_s = found.on_device(device), time.perf_counter() - start
        batches = memory_batches(dataset, epoch_batches(len(dataset), batch_size, epoch, seed))
        metrics = train_epoch(method, batches, steps, optimizer, scheduler, epoch, prototypes,
                              device, total_epochs=epochs, precision=optim.precision)
        metrics.update(epoch=epoch, epoch_s=time.perf_counter() - start, estep_s=estep_s)
        history.append(metrics)
        if on_epoch_end:
            on_epoch_end(epoch, metrics)
    return history
