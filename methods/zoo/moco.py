"""MoCo v2 (Chen et al. 2020, arXiv 2003.04297; MoCo: He et al. 2020, arXiv 1911.05722).

A query encoder trained by gradient, a key encoder that is its exponential moving average, and a
queue of past keys as negatives. v2 = MLP head + stronger augmentation (the ``moco_v2`` views)
+ cosine learning rate. ``proj_layers=1`` gives v1's linear head.

Shuffling BN is on by default, as in the reference (8 GPUs of 32 images, keys shuffled across
them): ``bn_splits=8`` BatchNorm slices of each worker's batch, the keys shuffled first; one
slice turns it off. The key encoder keeps its own BatchNorm statistics.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, Method, check_at_least
from methods.data.views import ViewSpec
from methods.encoders.batchnorm import check_bn_splits, shuffled_forward, split_batchnorm
from methods.encoders.heads import projection_mlp
from methods.encoders.momentum import FeatureQueue, check_momentum, ema_update, momentum_copy
from methods.losses.contrastive import check_temperature, info_nce
from methods.losses.distributed import gather_no_grad


class MoCo(Method):
    name = "moco"

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.2,
                 momentum: float = 0.999, queue_size: int = 65536, proj_hidden_dim: int = 2048,
                 proj_dim: int = 128, proj_layers: int = 2, bn_splits: int = 8, seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        check_momentum(momentum)
        if bn_splits < 1:
            raise ValueError(f"method.bn_splits must be >= 1 (1 = no split), got {bn_splits}")
        check_at_least(queue_size, 1, "method.queue_size")
        self.bn_splits = bn_splits
        self.temperature = temperature
        self.momentum = momentum
        if bn_splits > 1:  # before the key encoder is copied from the query encoder
            split_batchnorm(self.backbone, bn_splits)
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim,
                                         num_layers=proj_layers)
        self.encoder_q = nn.Sequential(self.backbone, self.projection)
        self.encoder_k = momentum_copy(self.encoder_q)
        self.queue = FeatureQueue(queue_size, proj_dim)
        self._pending_keys: torch.Tensor | None = None

    def check_batch_size(self, batch_size: int) -> None:
        check_bn_splits(self.bn_splits, batch_size)

    def pair_features(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Query-side backbone feature (with gradient) and key-side momentum feature, each batch
        normalised as ``bn_splits`` BatchNorm slices, the keys shuffled first (shuffling BN)."""
        x_q, x_k = self.view(batch.images), self.view(batch.images)
        h_q = self.encoder_q[0](x_q)
        with torch.no_grad():
            h_k = shuffled_forward(self.encoder_k[0], x_k, self.generator)
        return h_q, h_k

    def queries_and_keys(self, h_q: torch.Tensor, h_k: torch.Tensor, record: bool = True
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        q = F.normalize(self.encoder_q[1](h_q), dim=1)  # queries: [B, D]
        with torch.no_grad():
            k = F.normalize(self.encoder_k[1](h_k), dim=1)  # keys: [B, D]
        if record:
            self._pending_keys = gather_no_grad(k)  # every rank's keys enter every rank's queue
        return q, k

    def pair_loss(self, h_q: torch.Tensor, h_k: torch.Tensor, batch: Batch, prototypes=None,
                  record: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        q, k = self.queries_and_keys(h_q, h_k, record)
        loss = info_nce(q, k, self.queue.keys, self.temperature)
        return loss, {"loss_info_nce": loss.item()}

    def on_step_end(self) -> None:
        ema_update(self.encoder_k, self.encoder_q, self.momentum)
        if self._pending_keys is not None:
            self.queue.enqueue(self._pending_keys)
            self._pending_keys = None

    @torch.no_grad()
    def cluster_embed(self, x: torch.Tensor) -> torch.Tensor:
        """The momentum encoder's normalised projection, as PCL clusters (its ``is_eval`` path)."""
        return F.normalize(self.encoder_k(x), dim=1)
