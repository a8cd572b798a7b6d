"""SwAV (Caron et al. 2020, arXiv 2006.09882): online clustering. Each crop's normalised
projection is scored against K learnable prototypes; Sinkhorn-Knopp turns the global crops'
scores into equipartitioned codes (across every worker's batch), and each crop predicts the codes
of the other crops (swapped prediction). Multi-crop adds ``num_local_crops`` small crops.
Defaults as the paper: temperature 0.1, epsilon 0.05, 3 iterations, 3000 prototypes, 128-d;
the prototypes are frozen for the first 313 steps (their first ImageNet epoch). With
``queue_length`` each rank keeps that many past global-crop features per crop (the paper's
small-batch setting) and they join Sinkhorn once the queue is full (the authors' code also waits
for a full queue, from a start epoch on). The reference synchronises BatchNorm across GPUs
(``scaling.sync_batchnorm``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, Method
from methods.data.views import ViewSpec
from methods.encoders.heads import projection_mlp
from methods.losses.codes import swav_loss
from methods.losses.contrastive import check_temperature


class SwAV(Method):
    name = "swav"
    reference_sync_batchnorm = True

    def __init__(self, backbone: nn.Module, views: ViewSpec, temperature: float = 0.1,
                 num_prototypes: int = 3000, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 sinkhorn_iterations: int = 3, epsilon: float = 0.05, num_local_crops: int = 0,
                 local_size_ratio: float = 96 / 224, gather_distributed: bool = True,
                 queue_length: int = 0, freeze_prototypes_steps: int = 313, seed: int = 0):
        super().__init__(backbone, views, seed)
        check_temperature(temperature, "method.temperature")
        check_temperature(epsilon, "method.epsilon")
        self.temperature, self.epsilon, self.iterations = temperature, epsilon, sinkhorn_iterations
        self.num_local_crops, self.local_size_ratio = num_local_crops, local_size_ratio
        self.gather_distributed = gather_distributed
        self.projection = projection_mlp(backbone.feature_dim, proj_hidden_dim, proj_dim,
                                         batch_norm=True)
        self.prototypes = nn.Linear(proj_dim, num_prototypes, bias=False)
        if queue_length < 0 or freeze_prototypes_steps < 0:
            raise ValueError("method.queue_length and method.freeze_prototypes_steps must be >= 0")
        self.freeze_prototypes_steps = freeze_prototypes_steps
        self.register_buffer("queue", torch.zeros(2, queue_length, proj_dim))  # newest first
        self.register_buffer("queued", torch.zeros((), dtype=torch.long))
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.long))
        self._pending: torch.Tensor | None = None

    def prototype_weight(self) -> torch.Tensor:
        """The prototypes, with a zero gradient while frozen. Zero rather than none: DDP expects
        a gradient for every parameter. Weight decay still scales them, which the per-step
        renormalisation undoes, so their directions stay put."""
        w = self.prototypes.weight
        return w.detach() + 0 * w if int(self.steps_done) < self.freeze_prototypes_steps else w

    def scores(self, h: torch.Tensor, crops: int) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Per crop the prototype scores ``[B, K]``, and the normalised projections ``[crops*B, D]``,
        of backbone features ``h`` ``[crops*B, C]``."""
        z = F.normalize(self.projection(h), dim=1)
        return list((z @ self.prototype_weight().T).chunk(crops)), z

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():  # prototypes stay on the unit sphere (sec. 4, implementation)
            self.prototypes.weight.copy_(F.normalize(self.prototypes.weight, dim=1))
        images = torch.cat([self.view(batch.images) for _ in range(2)])
        h = self.backbone(images)
        self.expose(h[: len(batch.images)])
        global_scores, z = self.scores(h, 2)
        local_scores = []
        if self.num_local_crops:
            x = self.local_views(batch.images, self.num_local_crops, self.local_size_ratio)
            local_scores = self.scores(self.backbone(x), self.num_local_crops)[0]
        queue_scores = None
        if self.queue.shape[1]:
            if int(self.queued) >= self.queue.shape[1]:
                queue_scores = [q @ self.prototypes.weight.detach().T for q in self.queue]
            self._pending = z.detach().view(2, len(batch.images), -1)  # enqueued after the step
        loss = swav_loss(global_scores, local_scores, self.temperature, self.iterations,
                         self.epsilon, gather=self.gather_distributed, queue_scores=queue_scores)
        return loss, {}

    def on_step_end(self) -> None:
        self.steps_done += 1
        if self._pending is not None:
            b = min(self._pending.shape[1], self.queue.shape[1])
            self.queue[:, b:] = self.queue[:, :-b].clone()
            self.queue[:, :b] = self._pending[:, :b]
            self.queued += b
            self._pending = None
