"""SwAV (Caron et al. 2020, arXiv 2006.09882): online clustering. Each crop's normalised
projection is scored against K learnable prototypes; Sinkhorn-Knopp turns the global crops'
scores into equipartitioned codes (across every worker's batch), and each crop predicts the codes
of the other crops (swapped prediction). Multi-crop adds ``num_local_crops`` small crops.
Defaults as the paper: temperature 0.1, epsilon 0.05, 3 iterations, 3000 prototypes, 128-d.
Not built: the optional feature queue and freezing the prototypes in the first epoch.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, Method
from methods.heads import projection_mlp
from methods.losses import check_temperature, swav_loss
from methods.registry import register
from methods.views import ViewSpec


@register("swav")
class SwAV(Method):
    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.1,
                 num_prototypes: int = 3000, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 sinkhorn_iterations: int = 3, epsilon: float = 0.05, num_local_crops: int = 0,
                 local_size_ratio: float = 96 / 224, gather_distributed: bool = True, seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        check_temperature(epsilon, "method.epsilon")
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, sinkhorn_iterations
        self.num_local_crops, self.local_size_ratio = num_local_crops, local_size_ratio
        self.gather_distributed = gather_distributed
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim,
                                         batch_norm=True)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)

    def scores(self, x: torch.Tensor, crops: int) -> list[torch.Tensor]:
        z = F.normalize(self.projection(self.backbone(x)), dim=1)
        return list(self.prototypes(z).chunk(crops))

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():  # prototypes stay on the unit sphere (sec. 4, implementation)
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        global_scores = self.scores(torch.cat([self.view(batch.images) for _ in range(2)]), 2)
        local_scores = []
        if self.num_local_crops:
            x = self.local_views(batch.images, self.num_local_crops, self.local_size_ratio)
            local_scores = self.scores(x, self.num_local_crops)
        loss = swav_loss(global_scores, local_scores, self.temperature, self.iterations,
                         self.epsilon, gather=self.gather_distributed)
        return loss, {}
