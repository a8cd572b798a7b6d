"""Instance discrimination (Wu et al. 2018, arXiv 1805.01978): every image is its own class.

One augmented view per image is embedded (linear head to 128-d, L2-normalised) and scored
against a memory bank holding a feature for every training image: its own entry is the
positive, m entries drawn uniformly are the noise, and NCE (eq. 3-6) trains the
non-parametric softmax, with Z re-estimated every step (see ``log_z``). After each step the
anchors' entries move halfway to the new features (momentum 0.5). The bank is sharded by
worker (``momentum.MemoryBank``): each rank scores and updates only the images it owns, and
checkpoints its own shard.

One noise set is drawn per step and shared by the batch (the authors draw per anchor): the same
estimator in expectation, and one matrix product instead of a ``[B, m, D]`` gather.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, Method
from methods.data.views import ViewSpec
from methods.encoders.momentum import MemoryBank, check_momentum
from methods.losses.contrastive import check_temperature, nce_loss


class InstDisc(Method):
    name = "instdisc"

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.07,
                 num_negatives: int = 4096, bank_momentum: float = 0.5, proj_dim: int = 128,
                 seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        if num_negatives < 1:
            raise ValueError(f"method.num_negatives must be >= 1, got {num_negatives}")
        check_momentum(bank_momentum, "method.bank_momentum")
        self.temperature, self.num_negatives, self.bank_momentum = (temperature, num_negatives,
                                                                    bank_momentum)
        self.head = nn.Linear(backbone.feature_dim, proj_dim)
        self.bank = MemoryBank(proj_dim)
        self.num_samples = 0
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None

    def bind_data(self, num_samples: int, rank: int = 0, world_size: int = 1) -> None:
        super().bind_data(num_samples, rank, world_size)
        self.num_samples = num_samples

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        h = self.expose(self.backbone(self.view(batch.images)))
        f = F.normalize(self.head(h), dim=1)  # [B, D]
        positive = (f * self.bank.lookup(batch.indices)).sum(dim=1) / self.temperature  # [B]
        negatives = f @ self.bank.sample(self.num_negatives, self.generator).T / self.temperature
        loss = nce_loss(positive, negatives, self.log_z(positive, negatives), self.num_samples)
        self._pending = (batch.indices, f.detach())
        return loss, {"loss_nce": loss.item(), "positive_score": positive.mean().item() * self.temperature}

    @torch.no_grad()
    def log_z(self, positive: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
        """log Z with Z ~ n * mean_j exp(v_j . f_i / t) (eq. 5), re-estimated from every step's
        own scores. The authors fix Z after the first batch; with a bank that starts random that
        constant is far too small once the bank holds real features: on digits the loss climbed
        and kNN fell during training, while with Z re-estimated it kept rising (benchmarks/RESULTS.md)."""
        scores = torch.cat([positive[:, None], negatives], dim=1)
        return math.log(self.num_samples) + torch.logsumexp(scores.flatten(), 0) - math.log(scores.numel())

    def on_step_end(self) -> None:
        if self._pending is not None:
            self.bank.update(*self._pending, momentum=self.bank_momentum)
            self._pending = None
