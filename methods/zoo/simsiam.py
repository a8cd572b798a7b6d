"""SimSiam (Chen & He 2021, arXiv 2011.10566): BYOL without the momentum encoder. Both views go
through the same backbone and projector; a predictor maps one to the other's projection under a
stop-gradient, L = 1/2 D(p1, z2) + 1/2 D(p2, z1) (their eq. 3), D the negative cosine.
Paper defaults: 3-layer projector 2048 with BatchNorm, bottleneck predictor 2048 -> 512 -> 2048.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from methods.base import Batch, Method
from methods.heads import projection_mlp
from methods.losses import negative_cosine
from methods.views import ViewSpec
from methods.zoo.byol import embedding_std


class SimSiam(Method):
    name = "simsiam"

    def __init__(self, backbone: nn.Module, views: ViewSpec, proj_hidden_dim: int = 2048,
                 proj_dim: int = 2048, pred_hidden_dim: int = 512, seed: int = 0):
        super().__init__(backbone, views, seed)
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim,
                                         num_layers=3, batch_norm=True)
        self.predictor = projection_mlp(proj_dim, pred_hidden_dim, proj_dim, batch_norm=True)

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        x = torch.cat([self.view(batch.images), self.view(batch.images)])
        z = self.projection(self.backbone(x))
        z0, z1 = z.chunk(2)
        p0, p1 = self.predictor(z).chunk(2)
        loss = 0.5 * negative_cosine(p0, z1) + 0.5 * negative_cosine(p1, z0)
        return loss, {"embedding_std": embedding_std(z)}
