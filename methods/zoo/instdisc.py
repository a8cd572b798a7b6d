"""Instance discrimination (Wu et al. 2018, arXiv 1805.01978): every image is its own class.

One augmented view per image is embedded (linear head to 128-d, L2-normalised) and scored
against a memory bank holding a feature for every training image: its own entry is the
positive, m entries drawn uniformly are the noise, and NCE (eq. 3-6) trains the
non-parametric softmax. After each step the anchors' entries move halfway to the new features
(momentum 0.5). The bank is sharded by worker (``momentum.MemoryBank``): each rank scores and
updates only the images it owns, and checkpoints its own shard.

One noise set is drawn per step and shared by the batch (the authors draw per anchor): the same
estimator in expectation, and one matrix product instead of a ``[B, m, D]`` gather.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, Method
from methods.losses import check_temperature, nce_loss
from methods.momentum import MemoryBank
from methods.registry import register
from methods.views import ViewSpec


@register("instdisc")
class InstDisc(Method):
    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.07,
                 num_negatives: int = 4096, bank_momentum: float = 0.5, proj_dim: int = 128,
                 seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        if num_negatives < 1:
            raise ValueError(f"method.num_negatives must be >= 1, got {num_negatives}")
        if not 0 <= bank_momentum < 1:
            raise ValueError(f"method.bank_momentum must be in [0, 1), got {bank_momentum}")
        self.temperature, self.num_negatives, self.bank_momentum = (temperature, num_negatives,
                                                                    bank_momentum)
        self.head = nn.Linear(backbone.feature_dim, proj_dim)
        self.bank = MemoryBank(proj_dim)
        self.num_samples = 0
        # log Z, estimated once from the first batch (eq. 5) and then fixed, as the authors do;
        # NaN until then. A persistent buffer, so it is the same on every rank and in checkpoints.
        self.register_buffer("log_z", torch.tensor(float("nan")))
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind_data(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        super().bind_data(num_samples, rank, world_size)
        self.num_samples = num_samples

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        f = F.normalize(self.head(self.backbone(self.view(batch.images))), dim=1)  # [B, D]
        positive = (f * self.bank.lookup(batch.indices)).sum(dim=1) / self.temperature  # [B]
        negatives = f @ self.bank.sample(self.num_negatives, self.generator).T / self.temperature
        if torch.isnan(self.log_z):
            self._estimate_log_z(torch.cat([positive[:, None], negatives], dim=1).detach())
        loss = nce_loss(positive, negatives, self.log_z, self.num_samples)
        self._pending = (batch.indices, f.detach())
        return loss, {"loss_nce": loss.item(), "positive_score": positive.mean().item() * self.temperature}

    @torch.no_grad()
    def _estimate_log_z(self, scores: torch.Tensor) -> None:
        """Z ~ n * mean_j exp(v_j . f_i / t) over the first batch (eq. 5), averaged over ranks
        so every rank holds the same Z."""
        mean_exp = scores.exp().mean()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(mean_exp)
            mean_exp /= dist.get_world_size()
        self.log_z.fill_(math.log(self.num_samples) + mean_exp.log().item())

    def on_step_end(self) -> None:
        if self._pending is not None:
            self.bank.update(*self._pending, momentum=self.bank_momentum)
            self._pending = None
