"""Supervised Contrastive Learning (Khosla et al. 2020, arXiv 2004.11362).

SimCLR's two views and MLP projection, with every same-label image of the (global) batch as a
positive. Without labels (``supervised=False``) it is SimCLR with the SupCon normalisation.
Defaults follow the authors' CIFAR recipe: temperature 0.1, base temperature 0.07, 128-d head.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from methods.base import Batch, Method
from methods.data.views import ViewSpec
from methods.encoders.heads import projection_mlp
from methods.losses.contrastive import check_temperature
from methods.losses.supervised import supcon


def batch_labels(batch: Batch, supervised: bool) -> torch.Tensor | None:
    """The labels a supervised loss may read; unlabelled images (-1) are a clear error."""
    if not supervised:
        return None
    if bool((batch.labels < 0).any()):
        raise ValueError("method.supervised is true but the batch has unlabelled images (label -1); "
                         "use a labelled dataset or set method.supervised: false")
    return batch.labels


class SupCon(Method):
    name = "supcon"

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.1,
                 base_temperature: float = 0.07, supervised: bool = True,
                 contrast_mode: Literal["all", "one"] = "all", sum_inside_log: bool = False,
                 proj_hidden_dim: int = 2048, proj_dim: int = 128, gather_distributed: bool = True,
                 seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        check_temperature(base_temperature, "method.base_temperature")
        if contrast_mode not in ("all", "one"):
            raise ValueError(f"method.contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
        self.temperature, self.base_temperature = temperature, base_temperature
        self.supervised, self.contrast_mode = supervised, contrast_mode
        self.sum_inside_log, self.gather_distributed = sum_inside_log, gather_distributed
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim)

    def pair_loss(self, h0: torch.Tensor, h1: torch.Tensor, batch: Batch, prototypes=None,
                  record: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        z = torch.stack(self.projection(torch.cat([h0, h1])).chunk(2), dim=1)  # [B, 2, D]
        loss = supcon(z, batch_labels(batch, self.supervised), self.temperature,
                      self.base_temperature, self.contrast_mode, self.sum_inside_log,
                      gather=self.gather_distributed)
        return loss, {"loss_supcon": loss.item()}
