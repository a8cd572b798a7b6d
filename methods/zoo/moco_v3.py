"""MoCo v3 (Chen, Xie & He 2021, arXiv 2104.02057): a momentum encoder without a queue. The
online network (backbone, 3-layer projector, 2-layer predictor) predicts the momentum network's
projection of the other view; negatives are the other keys of the global batch; the loss is
symmetrised (Algorithm 1). Temperature 0.2 and momentum 0.99 rising to 1 on a cosine, as the
paper's ResNet recipe. The paper's ViT backbone is not built here (``model.backbone`` picks the
encoder).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from methods.base import Batch, Method
from methods.heads import projection_mlp
from methods.losses import check_temperature, info_nce_in_batch
from methods.momentum import check_momentum, cosine_momentum, ema_update, momentum_copy
from methods.views import ViewSpec


class MoCoV3(Method):
    name = "moco_v3"

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.2,
                 momentum: float = 0.99, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        check_momentum(momentum)
        self.temperature, self.base_momentum = temperature, momentum
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim,
                                         num_layers=3, batch_norm=True)
        self.predictor = projection_mlp(proj_dim, pred_hidden_dim, proj_dim, batch_norm=True)
        self.online = nn.Sequential(self.backbone, self.projection)
        self.momentum_encoder = momentum_copy(self.online)

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        x0, x1 = self.view(batch.images), self.view(batch.images)
        q0, q1 = self.predictor(self.online(torch.cat([x0, x1]))).chunk(2)
        with torch.no_grad():
            k0, k1 = self.momentum_encoder(torch.cat([x0, x1])).chunk(2)
        loss = info_nce_in_batch(q0, k1, self.temperature) + info_nce_in_batch(q1, k0, self.temperature)
        return loss, {}

    def current_momentum(self) -> float:
        return cosine_momentum(self.base_momentum, self.progress)

    def on_step_end(self) -> None:
        ema_update(self.momentum_encoder, self.online, self.current_momentum())
