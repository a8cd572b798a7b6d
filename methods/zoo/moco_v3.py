"""MoCo v3 (Chen, Xie & He 2021, arXiv 2104.02057): a momentum encoder without a queue. The
online network (backbone, 3-layer projector, 2-layer predictor) predicts the momentum network's
projection of the other view; negatives are the other keys of the global batch; the loss is
symmetrised (Algorithm 1). Momentum 0.99 rising to 1 on a cosine. The reference's heads and
temperature depend on the backbone, and ``temperature=None`` / the projector follow it: for a
ResNet (and protoray's convnets) a 2-layer bias-free projector ending in an affine-free BatchNorm
and temperature 1.0; for a ViT (``vit_tiny``) a 3-layer projector and temperature 0.2. The
predictor is 2 bias-free layers. Each view is its own BatchNorm batch, as in the reference, which
also synchronises BatchNorm across GPUs (``scaling.sync_batchnorm``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torchvision

from methods.base import Batch, Method
from methods.data.views import ViewSpec
from methods.encoders.heads import projection_mlp
from methods.encoders.momentum import check_momentum, cosine_momentum, ema_update, momentum_copy
from methods.losses.contrastive import check_temperature, info_nce_in_batch


class MoCoV3(Method):
    name = "moco_v3"
    reference_sync_batchnorm = True

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float | None = None,
                 momentum: float = 0.99, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, seed: int = 0):
        super().__init__(backbone, views, seed)
        vit = isinstance(backbone, torchvision.models.VisionTransformer)
        temperature = temperature if temperature is not None else (0.2 if vit else 1.0)
        check_temperature(temperature, "method.temperature")
        check_momentum(momentum)
        self.temperature, self.base_momentum = temperature, momentum
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim,
                                         num_layers=3 if vit else 2, batch_norm=True, last_bn=True)
        self.predictor = projection_mlp(proj_dim, pred_hidden_dim, proj_dim, batch_norm=True,
                                        last_bias=False)
        self.online = nn.Sequential(self.backbone, self.projection)
        self.momentum_encoder = momentum_copy(self.online)

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        x0, x1 = self.view(batch.images), self.view(batch.images)
        # self.online is (backbone, projection); called in two steps to expose view 0's feature
        q0 = self.predictor(self.projection(self.expose(self.backbone(x0))))
        q1 = self.predictor(self.online(x1))
        with torch.no_grad():
            k0, k1 = self.momentum_encoder(x0), self.momentum_encoder(x1)
        loss = info_nce_in_batch(q0, k1, self.temperature) + info_nce_in_batch(q1, k0, self.temperature)
        return loss, {}

    def current_momentum(self) -> float:
        return cosine_momentum(self.base_momentum, self.progress)

    def on_step_end(self) -> None:
        ema_update(self.momentum_encoder, self.online, self.current_momentum())
