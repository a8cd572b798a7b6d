"""Prototypical Contrastive Learning (Li et al. 2021, arXiv 2005.04966).

MoCo v2 plus ProtoNCE: after ``warmup_epochs`` of plain InfoNCE, each epoch's E-step clusters the
momentum features at several granularities; the M-step pulls each embedding toward its prototype
and away from ``num_negative_prototypes`` others, each scaled by its concentration phi.
BatchNorm as MoCo's reference: shuffled in ``bn_splits`` slices, not synchronised.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn as nn

from methods.base import Batch, DevicePrototypes, PrototypeSchedule, check_at_least
from methods.data.views import ViewSpec
from methods.losses.contrastive import info_nce, proto_nce, sample_negative_prototypes
from methods.zoo.moco import MoCo


class PCL(MoCo):
    name = "pcl"

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.2,
                 momentum: float = 0.999, queue_size: int = 16384, proj_hidden_dim: int = 2048,
                 proj_dim: int = 128, proj_layers: int = 2, num_negative_prototypes: int = 16384,
                 warmup_epochs: int = 20, proto_weight: float = 1.0, bn_splits: int = 8,
                 seed: int = 0):
        super().__init__(backbone, views, temperature, momentum, queue_size, proj_hidden_dim,
                         proj_dim, proj_layers, bn_splits, seed)
        check_at_least(warmup_epochs, 0, "method.warmup_epochs")
        check_at_least(proto_weight, 0, "method.proto_weight")
        check_at_least(num_negative_prototypes, 1, "method.num_negative_prototypes")
        self.num_negative_prototypes = num_negative_prototypes
        self.proto_weight = proto_weight
        self.schedule = self.prototype_schedule({"warmup_epochs": warmup_epochs,
                                                 "temperature": temperature})

    @classmethod
    def prototype_schedule(cls, hparams: Mapping[str, Any]) -> PrototypeSchedule:
        """E-steps from ``warmup_epochs`` on; phi's mean is the InfoNCE temperature (eq. 12)."""
        return PrototypeSchedule(hparams["warmup_epochs"], hparams["temperature"])

    def pair_loss(self, h_q: torch.Tensor, h_k: torch.Tensor, batch: Batch,
                  prototypes: DevicePrototypes | None = None, record: bool = True
                  ) -> tuple[torch.Tensor, dict[str, float]]:
        q, k = self.queries_and_keys(h_q, h_k, record)
        loss_instance = info_nce(q, k, self.queue.keys, self.temperature)
        if not prototypes:
            return loss_instance, {"loss_info_nce": loss_instance.item()}
        # ProtoNCE (eq. 11): the instance term plus the prototype term averaged over M granularities
        loss_proto = q.new_zeros(())
        for centroids, density, assignments in prototypes:
            positive = assignments[batch.indices]
            negative = sample_negative_prototypes(positive, len(centroids),
                                                  self.num_negative_prototypes, self.generator)
            loss_proto = loss_proto + proto_nce(q, centroids, density, positive, negative)
        loss_proto = loss_proto / len(prototypes)
        loss = loss_instance + self.proto_weight * loss_proto
        return loss, {"loss_info_nce": loss_instance.item(), "loss_proto": loss_proto.item()}
