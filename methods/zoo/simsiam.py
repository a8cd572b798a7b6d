"""SimSiam (Chen & He 2021, arXiv 2011.10566): BYOL without the momentum encoder. Both views go
through the same backbone and projector; a predictor maps one to the other's projection under a
stop-gradient, L = 1/2 D(p1, z2) + 1/2 D(p2, z1) (their eq. 3), D the negative cosine.
Paper defaults: 3-layer projector 2048 with BatchNorm, its output BatchNorm without affine
parameters, bottleneck predictor 2048 -> 512 -> 2048. As in the reference, each view is its own
BatchNorm batch (two backbone passes), and the reference synchronises BatchNorm across GPUs
(``scaling.sync_batchnorm``).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from methods.base import Batch, Method
from methods.data.views import ViewSpec
from methods.encoders.heads import projection_mlp
from methods.losses.predictive import negative_cosine
from methods.zoo.byol import embedding_std


class SimSiam(Method):
    name = "simsiam"
    reference_sync_batchnorm = True

    def __init__(self, backbone: nn.Module, views: ViewSpec, proj_hidden_dim: int = 2048,
                 proj_dim: int = 2048, pred_hidden_dim: int = 512, seed: int = 0):
        super().__init__(backbone, views, seed)
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim,
                                         num_layers=3, batch_norm=True, last_bn=True)
        self.predictor = projection_mlp(proj_dim, pred_hidden_dim, proj_dim, batch_norm=True)

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        z0 = self.projection(self.expose(self.backbone(self.view(batch.images))))
        z1 = self.projection(self.backbone(self.view(batch.images)))
        p0, p1 = self.predictor(z0), self.predictor(z1)
        loss = 0.5 * negative_cosine(p0, z1) + 0.5 * negative_cosine(p1, z0)
        return loss, {"embedding_std": embedding_std(torch.cat([z0, z1]))}
