"""Contrastive Multiview Coding (Tian et al. 2019, arXiv 1906.05849): one image split into views
that carry different information, one encoder per view, and a contrastive loss that matches an
image's views against the other images'. RGB images split into L and ab (the paper's Lab split);
grayscale images into intensity and Sobel gradient magnitude, each taken from its own random
augmentation of the image (the paper crops once; see ``training_step``). The representation is
the concatenation of the two encoders' features, as the paper evaluates. Negatives are the
other images of the global batch, or with ``memory_bank`` the paper's form: one bank per view
(sharded by worker, momentum 0.5, as InstDisc's) and ``num_negatives`` entries drawn from the
other view's bank, scored with the softmax (their NCESoftmax) rather than NCE. Temperature 0.07
and a linear 128-d head as the paper.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, Method
from methods.data.views import ViewSpec, split_views
from methods.encoders.backbones import fresh_copy, with_in_channels
from methods.encoders.momentum import MemoryBank, check_momentum
from methods.losses.contrastive import check_temperature, cross_view_info_nce, info_nce


class CMC(Method):
    name = "cmc"

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.07,
                 proj_dim: int = 128, gather_distributed: bool = True, memory_bank: bool = False,
                 num_negatives: int = 16384, bank_momentum: float = 0.5, seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        self.temperature, self.gather_distributed = temperature, gather_distributed
        rgb = next(m for m in backbone.modules() if isinstance(m, nn.Conv2d)).in_channels == 3
        second = fresh_copy(backbone)
        self.encoders = nn.ModuleList([with_in_channels(backbone, 1),
                                       with_in_channels(second, 2 if rgb else 1)])
        self.heads = nn.ModuleList([nn.Linear(backbone.feature_dim, proj_dim) for _ in range(2)])
        if num_negatives < 1:
            raise ValueError(f"method.num_negatives must be >= 1, got {num_negatives}")
        check_momentum(bank_momentum, "method.bank_momentum")
        self.num_negatives, self.bank_momentum = num_negatives, bank_momentum
        self.banks = nn.ModuleList([MemoryBank(proj_dim) for _ in range(2)]) if memory_bank else None
        self._pending: tuple[torch.Tensor, list[torch.Tensor]] | None = None

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        # each view from its own augmentation: for grayscale the gradient magnitude is a function
        # of the intensity, and one shared crop lets the encoders match edges (on digits it left
        # kNN below its value at initialisation; benchmarks/RESULTS.md)
        v1 = split_views(self.view(batch.images), self.views)[0]
        v2 = split_views(self.view(batch.images), self.views)[1]
        h1, h2 = self.encoders[0](v1), self.encoders[1](v2)
        self.expose(torch.cat([h1, h2], dim=1))  # what embed returns, from the two views
        z1, z2 = self.heads[0](h1), self.heads[1](h2)
        if self.banks is None:
            loss = cross_view_info_nce(z1, z2, self.temperature, gather=self.gather_distributed)
            return loss, {}
        return self.memory_loss(batch.indices, [F.normalize(z1, dim=1), F.normalize(z2, dim=1)])

    def memory_loss(self, indices: torch.Tensor, z: list[torch.Tensor]
                    ) -> tuple[torch.Tensor, dict[str, float]]:
        """L(V1, V2) + L(V2, V1) (eq. 3-4) with each view's anchors scored against the other
        view's bank: its own image's entry is the positive, sampled entries the negatives."""
        loss = z[0].new_zeros(())
        for view, other in ((0, 1), (1, 0)):
            bank = self.banks[other]
            loss = loss + info_nce(z[view], bank.lookup(indices),
                                   bank.sample(self.num_negatives, self.generator), self.temperature)
        self._pending = (indices, [v.detach() for v in z])
        return loss, {}

    def on_step_end(self) -> None:
        if self._pending is not None:
            indices, z = self._pending
            for bank, features in zip(self.banks, z, strict=True):
                bank.update(indices, features, self.bank_momentum)
            self._pending = None

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        v1, v2 = split_views(x, self.views)
        return torch.cat([self.encoders[0](v1), self.encoders[1](v2)], dim=1)

