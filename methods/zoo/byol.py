"""BYOL (Grill et al. 2020, arXiv 2006.07733): no negatives. An online network (backbone,
projector, predictor) predicts an EMA target network's projection of the other view; the loss is
the normalised squared error 2 - 2 cos (their eq. 2), symmetrised (eq. 3). The target momentum
rises from ``momentum`` to 1 on a cosine: tau = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2.
Paper defaults: projector 4096 -> 256 with BatchNorm, predictor the same shape, tau_base 0.996.
As in the reference, each view is its own BatchNorm batch (the online and the target network
run each view separately), synchronised across devices there (``scaling.sync_batchnorm``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, Method
from methods.data.views import ViewSpec
from methods.encoders.heads import projection_mlp
from methods.encoders.momentum import check_momentum, cosine_momentum, ema_update, momentum_copy
from methods.losses.predictive import negative_cosine


def embedding_std(z: torch.Tensor) -> float:
    """Mean per-dimension std of L2-normalised embeddings: 1/sqrt(dim) when spread over the
    sphere, 0 when collapsed (the monitor of SimSiam, Chen & He 2021, sec. 4.1)."""
    return F.normalize(z.detach(), dim=1).std(dim=0).mean().item()


class BYOL(Method):
    name = "byol"
    reference_sync_batchnorm = True

    def __init__(self, backbone: nn.Module, views: ViewSpec, momentum: float = 0.996,
                 proj_hidden_dim: int = 4096, proj_dim: int = 256, pred_hidden_dim: int = 4096,
                 seed: int = 0):
        super().__init__(backbone, views, seed)
        check_momentum(momentum)
        self.base_momentum = momentum
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim,
                                         batch_norm=True)
        self.predictor = projection_mlp(proj_dim, pred_hidden_dim, proj_dim, batch_norm=True)
        self.online = nn.Sequential(self.backbone, self.projection)
        self.target = momentum_copy(self.online)

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        x0, x1 = self.view(batch.images), self.view(batch.images)
        # self.online is (backbone, projection); called in two steps to expose view 0's feature
        z0 = self.projection(self.expose(self.backbone(x0)))
        z1 = self.online(x1)
        p0, p1 = self.predictor(z0), self.predictor(z1)
        with torch.no_grad():
            t0, t1 = self.target(x0), self.target(x1)
        # 2 - 2 cos(p, t) per direction = 2 + 2 * negative_cosine; both directions summed (eq. 3)
        loss = 2 * (1 + negative_cosine(p0, t1)) + 2 * (1 + negative_cosine(p1, t0))
        return loss, {"embedding_std": embedding_std(torch.cat([z0, z1]))}

    def current_momentum(self) -> float:
        return cosine_momentum(self.base_momentum, self.progress)

    def on_step_end(self) -> None:
        ema_update(self.target, self.online, self.current_momentum())
