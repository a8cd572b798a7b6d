"""DINO (Caron et al. 2021, arXiv 2104.14294): self-distillation without labels. A student
(backbone + DINO head) matches an EMA teacher's centred, sharpened output distribution; the
teacher sees the 2 global views, the student those and ``num_local_crops`` small ones. The teacher
temperature warms up linearly from ``warmup_teacher_temperature`` over the first
``teacher_warmup_fraction`` of training (the paper: 0.04 -> 0.07 over 30 of 300 epochs); the
teacher momentum rises from ``momentum`` to 1 on a cosine; the centre is an EMA (0.9) of the
teacher outputs over every worker's batch. As in the reference recipe, the head's last layer
stays frozen for the first ``freeze_last_layer`` epochs and every parameter's gradient is clipped
to norm ``clip_grad`` (0 turns clipping off); the reference synchronises BatchNorm across GPUs
(``scaling.sync_batchnorm``; the convnets have BatchNorm, its ViTs none).
"""

from __future__ import annotations

import torch
import torch.nn as nn

from methods.base import Batch, Method, check_at_least
from methods.data.views import ViewSpec
from methods.encoders.heads import DINOHead
from methods.encoders.momentum import check_momentum, cosine_momentum, ema_update, momentum_copy
from methods.losses.contrastive import check_temperature
from methods.losses.distillation import dino_loss, update_center


class DINO(Method):
    name = "dino"
    reference_sync_batchnorm = True

    def __init__(self, backbone: nn.Module, views: ViewSpec, out_dim: int = 65536,
                 hidden_dim: int = 2048, bottleneck_dim: int = 256, student_temperature: float = 0.1,
                 teacher_temperature: float = 0.07, warmup_teacher_temperature: float = 0.04,
                 teacher_warmup_fraction: float = 0.1, momentum: float = 0.996,
                 center_momentum: float = 0.9, num_local_crops: int = 6,
                 local_size_ratio: float = 96 / 224, freeze_last_layer: int = 1,
                 clip_grad: float = 3.0, seed: int = 0):
        super().__init__(backbone, views, seed)
        for name, t in (("student_temperature", student_temperature),
                        ("teacher_temperature", teacher_temperature),
                        ("warmup_teacher_temperature", warmup_teacher_temperature)):
            check_temperature(t, f"method.{name}")
        check_momentum(momentum)
        check_at_least(freeze_last_layer, 0, "method.freeze_last_layer")
        check_at_least(clip_grad, 0, "method.clip_grad")
        self.freeze_last_layer, self.clip_grad = freeze_last_layer, clip_grad
        self.student_temperature = student_temperature
        self.teacher_temperatures = (warmup_teacher_temperature, teacher_temperature)
        self.teacher_warmup_fraction = teacher_warmup_fraction
        self.base_momentum, self.center_momentum = momentum, center_momentum
        self.num_local_crops, self.local_size_ratio = num_local_crops, local_size_ratio
        self.head = DINOHead(backbone.feature_dim, hidden_dim, bottleneck_dim, out_dim)
        self.student = nn.Sequential(self.backbone, self.head)
        self.teacher = momentum_copy(self.student)
        self.register_buffer("center", torch.zeros(out_dim))

    def teacher_temperature(self) -> float:
        start, end = self.teacher_temperatures
        if self.progress >= self.teacher_warmup_fraction:
            return end
        return start + (end - start) * self.progress / self.teacher_warmup_fraction

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        x = torch.cat([self.view(batch.images) for _ in range(2)])
        with torch.no_grad():
            teacher = list(self.teacher(x).chunk(2))
        h = self.backbone(x)  # self.student is (backbone, head), split to expose view 0's feature
        self.expose(h[: len(batch.images)])
        student = list(self.head(h).chunk(2))
        if self.num_local_crops:
            local = self.local_views(batch.images, self.num_local_crops, self.local_size_ratio)
            student += list(self.student(local).chunk(self.num_local_crops))
        t = self.teacher_temperature()
        loss = dino_loss(teacher, student, self.center, t, self.student_temperature)
        update_center(self.center, teacher, self.center_momentum)
        return loss, {"teacher_temperature": t}

    def before_optimizer_step(self) -> None:
        """Per-parameter gradient clipping, then no update of the last layer while frozen (the
        reference's ``clip_gradients`` and ``cancel_gradients_last_layer``)."""
        if self.clip_grad:
            for p in self.student.parameters():
                if p.grad is not None:
                    p.grad.mul_((self.clip_grad / (p.grad.norm() + 1e-6)).clamp(max=1.0))
        if self.epoch < self.freeze_last_layer:
            for p in self.head.last.parameters():
                p.grad = None

    def on_step_end(self) -> None:
        ema_update(self.teacher, self.student, cosine_momentum(self.base_momentum, self.progress))
