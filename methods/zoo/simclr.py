"""SimCLR (Chen et al. 2020, arXiv 2002.05709): two views, an MLP projection, NT-Xent with every
other view in the (global) batch as a negative. The projection head is the reference's: bias-free
linear layers each followed by BatchNorm (the last one scale-only), and the reference normalises
over the global batch (``scaling.sync_batchnorm``)."""

from __future__ import annotations

import torch
import torch.nn as nn

from methods.base import Batch, Method
from methods.data.views import ViewSpec
from methods.encoders.heads import projection_mlp, scale_only_batchnorm
from methods.losses.contrastive import check_temperature, nt_xent


class SimCLR(Method):
    name = "simclr"
    reference_sync_batchnorm = True

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.5,
                 proj_hidden_dim: int = 2048, proj_dim: int = 128, gather_distributed: bool = True,
                 seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        self.temperature = temperature
        self.gather_distributed = gather_distributed
        self.projection = nn.Sequential(
            *projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim, batch_norm=True,
                            last_bias=False),
            scale_only_batchnorm(proj_dim))

    def pair_loss(self, h0: torch.Tensor, h1: torch.Tensor, batch: Batch, prototypes=None,
                  record: bool = True) -> tuple[torch.Tensor, dict[str, float]]:
        z0, z1 = self.projection(torch.cat([h0, h1])).chunk(2)  # one BatchNorm over both views
        loss = nt_xent(z0, z1, self.temperature, gather=self.gather_distributed)
        return loss, {"loss_nt_xent": loss.item()}
