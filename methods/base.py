"""What every method is: an nn.Module with ``training_step`` and a few class attributes the
trainer reads instead of branching on names."""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.data.views import ViewSpec, augment, local_size, local_view_spec
from methods.encoders.momentum import MemoryBank

DevicePrototypes = list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]
"""Per granularity: (centroids [K, C], density [K], assignments [N]) on the training device."""


class Batch(NamedTuple):
    indices: torch.Tensor  # [B] dataset indices (PCL looks up cluster assignments by them)
    images: torch.Tensor  # [B, C, H, W] uint8, augmented inside the method
    labels: torch.Tensor  # [B] (-1 where unlabelled; only supervised methods read them)


@dataclass(frozen=True)
class PrototypeSchedule:
    """What a method asks of the clustering E-step (PCL, Li et al. 2021, sec. 3.3).

    ``warmup_epochs``: epochs of plain training before the first E-step. ``temperature``: the
    mean the per-cluster concentrations phi are rescaled to (PCL eq. 12).
    """

    warmup_epochs: int
    temperature: float

    def active(self, epoch: int) -> bool:
        """Whether ``epoch`` (0-based) runs an E-step and trains with prototypes."""
        return epoch >= self.warmup_epochs


def check_at_least(value: float, low: float, field: str) -> None:
    """Raise ``ValueError`` naming ``field`` when ``value < low``."""
    if value < low:
        raise ValueError(f"{field} must be >= {low} (got {value})")


class Method(nn.Module):
    """Base class. Two-view methods implement ``pair_features`` and ``pair_loss``; others
    override ``training_step``.

    ``forward`` is ``training_step`` so DistributedDataParallel's gradient hooks see the call.
    """

    name: ClassVar[str] = ""
    schedule: PrototypeSchedule | None = None  # set by methods that train with prototypes
    # whether the reference normalises BatchNorm over every device's batch (SyncBatchNorm)
    reference_sync_batchnorm: ClassVar[bool] = False
    progress: float = 0.0  # fraction of training done, set by the loop (BYOL's momentum schedule)
    epoch: int = 0  # the epoch being trained, set by the loop (DINO's last-layer freeze)
    # the feature the online probe reads after this step (``expose``); None until a step sets it
    probe_feature: torch.Tensor | None = None

    def __init__(self, backbone: nn.Module, views: ViewSpec, seed: int = 0):
        super().__init__()
        self.backbone = backbone
        self.views = views
        self.generator = torch.Generator().manual_seed(seed)

    @classmethod
    def prototype_schedule(cls, hparams: Mapping[str, Any]) -> PrototypeSchedule | None:
        """The E-step this method needs, from its constructor arguments (defaults filled in);
        None for methods that never use prototypes. The driver reads it before any model exists,
        to decide whether to start the prototype actor."""
        return None

    @classmethod
    def is_two_view(cls) -> bool:
        """Whether the method scores a positive pair through ``pair_features`` / ``pair_loss``
        (what a regulariser such as ICL-MSR wraps)."""
        return cls.pair_loss is not Method.pair_loss

    def check_batch_size(self, batch_size: int) -> None:
        """Raise ``ValueError`` naming the hyperparameter when a per-worker batch of
        ``batch_size`` images cannot be trained (MoCo's BatchNorm slices); most methods take any."""

    def nonfinite_advice(self) -> str:
        """What to change when this method's loss becomes NaN or inf: the learning rate, and the
        constructor's temperature-like settings (softmax temperatures, Sinkhorn's epsilon)."""
        names = [n for n in inspect.signature(type(self).__init__).parameters
                 if "temperature" in n or n == "epsilon"]
        raise_them = " or raise " + ", ".join(f"method.{n}" for n in names) if names else ""
        return f"lower optim.lr{raise_them}"

    def uses_prototypes(self, epoch: int) -> bool:
        """The one answer to "does ``epoch`` need an E-step and train with prototypes"."""
        return self.schedule is not None and self.schedule.active(epoch)

    def view(self, images: torch.Tensor) -> torch.Tensor:
        """One random view of every image, parameters from this method's seeded generator."""
        return augment(images, self.views, self.generator)

    def local_views(self, images: torch.Tensor, count: int, size_ratio: float) -> torch.Tensor:
        """Multi-crop's ``count`` small views of every image, stacked view-major ``[count*B, ...]``
        (SwAV, DINO); their side is ``size_ratio`` of the global views'."""
        side = local_size(self.views.size or images.shape[-1], size_ratio)
        spec = local_view_spec(self.views, side)
        return torch.cat([augment(images, spec, self.generator) for _ in range(count)])

    def training_step(self, batch: Batch, prototypes: DevicePrototypes | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        """Two-view methods: backbone features of a positive pair, then the loss on them."""
        h0, h1 = self.pair_features(batch)
        self.expose(h0)
        return self.pair_loss(h0, h1, batch, prototypes)

    def pair_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled backbone features ``[B, C]`` of the two views of every image.

        Split from ``pair_loss`` so a regulariser (ICL-MSR) can reweight the features' channels
        and re-score the same pair without running the backbone again. The default (SimCLR,
        SupCon) sends both views through the one backbone in a single batch.
        """
        x = torch.cat([self.view(batch.images), self.view(batch.images)])  # [2B, C, S, S]
        h0, h1 = self.backbone(x).chunk(2)
        return h0, h1

    def pair_loss(self, h0: torch.Tensor, h1: torch.Tensor, batch: Batch,
                  prototypes: DevicePrototypes | None = None, record: bool = True
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        """The method's loss from pair features (heads included). ``record=False`` leaves the
        method's state (queues) untouched, for extra scorings of the same step's pair."""
        raise NotImplementedError(f"{type(self).__name__} is not a two-view method")

    def expose(self, feature: torch.Tensor) -> torch.Tensor:
        """Keep ``feature`` detached for the online linear probe (``methods.evaluation.online_probe``) and
        return it unchanged. ``training_step`` calls it once with what ``embed`` would compute,
        taken from the training forward of the step's first view: ``[B, D]``, one row per image in
        batch order. Reusing it spares a second train-mode forward, which would move BatchNorm's
        running statistics. A method that never calls it gets an eval-mode ``embed`` instead."""
        self.probe_feature = feature.detach()
        return feature

    def pop_probe_feature(self) -> torch.Tensor | None:
        """The feature ``expose`` kept during the last step (then forgotten), or None."""
        feature, self.probe_feature = self.probe_feature, None
        return feature

    def forward(self, batch: Batch, prototypes: DevicePrototypes | None = None):
        return self.training_step(batch, prototypes)

    def before_optimizer_step(self) -> None:
        """Called after the backward pass, before the optimiser steps: the place to clip or
        cancel gradients (DINO). The gradients are already averaged across ranks."""

    def on_step_end(self) -> None:
        """Called after every optimiser step (momentum updates, queue writes)."""

    def bind_data(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        """Called once before training with the training set's size and this rank's place:
        fills every memory bank (InstDisc, CMC) with random rows for this rank's shard."""
        for bank in self._banks().values():
            bank.allocate(num_samples, rank, world_size, self.generator)

    def rank_state(self) -> dict[str, torch.Tensor] | None:
        """State that differs by rank (memory bank shards), for each rank's own checkpoint file;
        None for methods whose whole state is the model state rank 0 saves."""
        banks = self._banks()
        return {name: bank.features.cpu() for name, bank in banks.items()} if banks else None

    def load_rank_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, bank in self._banks().items():
            if state[name].shape[1:] != bank.features.shape[1:]:
                raise ValueError(f"memory bank {name!r} in the checkpoint has rows of shape "
                                 f"{tuple(state[name].shape[1:])}, the method "
                                 f"{tuple(bank.features.shape[1:])}")
            bank.features = state[name].to(bank.features.device)

    def _banks(self) -> dict[str, MemoryBank]:
        return {name: m for name, m in self.named_modules() if isinstance(m, MemoryBank)}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The representation that evaluation probes: the backbone's pooled feature."""
        return self.backbone(x)

    @torch.no_grad()
    def cluster_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The L2-normalised feature the E-step clusters."""
        return F.normalize(self.embed(x), dim=1)
