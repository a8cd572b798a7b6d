"""Self-Contrastive learning (Bae et al. 2021, arXiv 2106.15499).

One network with two exits: the backbone and a sub-network branching after an early stage, each
with its own projection head. SelfCon-S (``multi_view=False``) contrasts the two exits of a
single view, so every image passes through the backbone once per step instead of SupCon's twice;
SelfCon-M (``multi_view=True``) uses two views and contrasts every exit of every view. With
labels (the paper's setting) positives are same-label outputs; ``supervised=False`` makes each
image its own class. Defaults follow the authors' CIFAR script: temperature 0.1, base 0.07,
branch after the second of four stages, an "fc" sub-network.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn as nn

from methods.base import Batch, Method
from methods.data.views import ViewSpec
from methods.encoders.backbones import MultiExit
from methods.encoders.heads import projection_mlp
from methods.losses.contrastive import check_temperature
from methods.losses.supervised import selfcon
from methods.zoo.supcon import batch_labels


class SelfCon(Method):
    name = "selfcon"

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.1,
                 base_temperature: float = 0.07, multi_view: bool = False, supervised: bool = True,
                 branch_after: int = 2, sub_network: Literal["fc", "same"] = "fc",
                 proj_hidden_dim: int = 2048, proj_dim: int = 128, gather_distributed: bool = True,
                 seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        check_temperature(base_temperature, "method.base_temperature")
        self.temperature, self.base_temperature = temperature, base_temperature
        self.multi_view, self.supervised = multi_view, supervised
        self.gather_distributed = gather_distributed
        self.encoder = MultiExit(backbone, branch_after, sub_network)
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim)
        self.sub_projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim)

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        num_views = 2 if self.multi_view else 1
        b = len(batch.images)
        x = torch.cat([self.view(batch.images) for _ in range(num_views)])  # [V*B, C, S, S]
        h, h_sub = self.encoder(x)  # one backbone pass for every view
        self.expose(h[:b])
        z = self.projection(h).view(num_views, b, -1).transpose(0, 1)  # [B, V, D]
        z_sub = self.sub_projection(h_sub).view(num_views, b, -1).transpose(0, 1)
        loss = selfcon([z_sub, z], batch_labels(batch, self.supervised), self.temperature,
                       self.base_temperature, gather=self.gather_distributed)
        return loss, {"loss_selfcon": loss.item()}

    @torch.no_grad()
    def exit_embeds(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Pooled features of both exits, for linear evaluation of either or their ensemble."""
        h, h_sub = self.encoder(x)
        return {"backbone": h, "sub": h_sub}
