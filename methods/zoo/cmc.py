"""Contrastive Multiview Coding (Tian et al. 2019, arXiv 1906.05849): one image split into views
that carry different information, one encoder per view, and a contrastive loss that matches an
image's views against the other images'. RGB images split into L and ab (the paper's Lab split);
grayscale images into intensity and Sobel gradient magnitude, each taken from its own random
augmentation of the image (the paper crops once; see ``training_step``). The representation is
the concatenation of the two encoders' features, as the paper evaluates. Negatives are the
other images of the global batch (the paper's memory bank is not built here). Temperature 0.07
and a linear 128-d head as the paper.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from methods.backbones import fresh_copy, with_in_channels
from methods.base import Batch, Method
from methods.losses import check_temperature, cross_view_info_nce
from methods.registry import register
from methods.views import ViewSpec, split_views


@register("cmc")
class CMC(Method):
    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.07,
                 proj_dim: int = 128, gather_distributed: bool = True, seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        self.temperature, self.gather_distributed = temperature, gather_distributed
        rgb = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d)).in_channels == 3
        second = fresh_copy(backbone)
        self.encoders = nn.ModuleList([with_in_channels(backbone, 1),
                                       with_in_channels(second, 2 if rgb else 1)])
        self.heads = nn.ModuleList([nn.Linear(backbone.feature_dim, proj_dim) for _ in range(2)])

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        # each view from its own augmentation: for grayscale the gradient magnitude is a function
        # of the intensity, and one shared crop lets the encoders match edges (measured on digits,
        # T 0.2, 4 epochs, kNN from 0.831 at init: 0.798 with one shared crop, 0.867 with two)
        v1 = split_views(self.view(batch.images), self.views)[0]
        v2 = split_views(self.view(batch.images), self.views)[1]
        z1 = self.heads[0](self.encoders[0](v1))
        z2 = self.heads[1](self.encoders[1](v2))
        loss = cross_view_info_nce(z1, z2, self.temperature, gather=self.gather_distributed)
        return loss, {}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        v1, v2 = split_views(x, self.views)
        return torch.cat([self.encoders[0](v1), self.encoders[1](v2)], dim=1)

