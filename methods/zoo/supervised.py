"""Supervised cross-entropy on the same backbone and views: the reference line, not a method.

A benchmark that asks an unsupervised encoder for a kNN or clustering score needs to know how
far the same encoder gets on the same data when the labels are used directly, as the
"supervised" row of SSL papers' tables does. One augmented view per image, a linear classifier
on the pooled feature, cross-entropy; evaluation still probes the backbone (``embed``).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, DevicePrototypes, Method
from methods.data.views import ViewSpec
from methods.zoo.supcon import batch_labels


class Supervised(Method):
    name = "supervised"

    def __init__(self, backbone: nn.Module, views: ViewSpec, num_classes: int = 10, seed: int = 0):
        super().__init__(backbone, views, seed)
        if num_classes < 2:
            raise ValueError(f"method.num_classes must be at least 2, got {num_classes}")
        self.num_classes = num_classes
        self.classifier = nn.Linear(backbone.feature_dim, num_classes)

    def training_step(self, batch: Batch, prototypes: DevicePrototypes | None = None
                      ) -> tuple[torch.Tensor, dict[str, float]]:
        labels = batch_labels(batch, supervised=True)
        if int(labels.max()) >= self.num_classes:
            raise ValueError(f"the batch has label {int(labels.max())} but method.num_classes is "
                             f"{self.num_classes}; set method.num_classes to the number of classes")
        logits = self.classifier(self.expose(self.backbone(self.view(batch.images))))
        loss = F.cross_entropy(logits.float(), labels)
        accuracy = (logits.argmax(1) == labels).float().mean()
        return loss, {"loss_ce": loss.item(), "train_accuracy": accuracy.item()}
