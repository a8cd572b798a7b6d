"""An online linear probe: a linear classifier trained during pre-training on the detached
backbone feature, so a run shows every epoch how linearly separable its representation is (the
online classifier of solo-learn's base method, da Costa et al. 2022, JMLR 23(56)).

It never changes the encoder:

- it reads the feature the method's own training forward already computed (``Method.expose``),
  detached, so no gradient reaches the encoder and no extra train-mode forward updates
  BatchNorm's running statistics; a method that exposes nothing gets an eval-mode, no-grad
  ``embed`` of the un-augmented batch instead (``probe_features``), which leaves them alone too;
- it has its own optimiser (SGD, momentum 0.9, no weight decay, a constant learning rate: it
  follows an encoder that keeps moving), outside the method's parameters and ``state_dict``
  (a checkpoint keeps it under its own key);
- its initialisation draws from its own ``torch.Generator``, never the global RNG that later
  initialisations or augmentations might read.

Across ranks it stays identical by construction: the same seed everywhere, and one all-reduce
per step of its gradient sums together with the labelled-row count, so every rank applies the
gradient of the mean loss over the global batch (what DDP would give, without a second wrapper).

The features are standardised per sample and scaled to unit length (a layer norm without
parameters, over sqrt(D)) before the linear layer: one learning rate then fits every backbone's
feature scale and width, and unlike the BatchNorm of MAE's probe (He et al. 2022) there are no
running statistics to keep in sync across ranks. The learning rate, 1.0, is large because the
inputs are unit vectors (on digits 0.5 to 2.0 came out alike after 3 epochs, 4.0 lower).
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Method
from methods.data.views import to_input


class OnlineProbe(nn.Module):
    """Linear classifier ``[N, feature_dim]`` -> logits ``[N, num_classes]`` with its own SGD.

    Labels outside ``0 .. num_classes - 1`` (``-1``: unlabelled) are left out of training and
    of the accuracy.
    """

    def __init__(self, feature_dim: int, num_classes: int, seed: int = 0, lr: float = 1.0,
                 momentum: float = 0.9, device: str | torch.device = "cpu"):
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"an online probe needs at least 2 classes, got {num_classes}")
        self.num_classes = num_classes
        # skip_init: nn.Linear's own reset_parameters would draw from the global RNG
        self.linear = nn.utils.skip_init(nn.Linear, feature_dim, num_classes, device=device)
        generator = torch.Generator().manual_seed(seed)  # on the CPU: the same draw on any device
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(num_classes, feature_dim, generator=generator)
                                     * 0.01)
            self.linear.bias.zero_()
        self.optimizer = torch.optim.SGD(self.parameters(), lr=lr, momentum=momentum,
                                         weight_decay=0.0)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, num_classes]`` of features ``[N, D]`` (any float dtype; fp32 inside)."""
        x = features.float()
        return self.linear(F.layer_norm(x, x.shape[-1:]) / x.shape[-1] ** 0.5)  # unit rows

    def _labelled(self, labels: torch.Tensor) -> torch.Tensor:
        return (labels >= 0) & (labels < self.num_classes)

    def step(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        """One SGD step on a batch's features ``[B, D]`` (detached here again, to be sure) and
        labels ``[B]``; returns ``probe_loss`` (the global batch's mean cross-entropy), or nothing
        when no rank had a labelled row."""
        keep = self._labelled(labels)
        logits = self(features.detach()[keep])
        targets = labels[keep]
        loss_sum = F.cross_entropy(logits, targets, reduction="sum")
        self.optimizer.zero_grad(set_to_none=False)
        loss_sum.backward()
        params = list(self.parameters())
        # one all-reduce: every gradient sum, then the row count and the loss sum
        flat = torch.cat([p.grad.flatten() for p in params]
                         + [keep.sum().to(loss_sum).view(1), loss_sum.detach().view(1)])
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)
        count, total_loss = float(flat[-2]), float(flat[-1])
        if count == 0:
            return {}
        offset = 0
        for p in params:
            p.grad.copy_(flat[offset : offset + p.numel()].view_as(p) / count)
            offset += p.numel()
        self.optimizer.step()
        return {"probe_loss": total_loss / count}

    @torch.no_grad()
    def accuracy(self, features: torch.Tensor, labels: torch.Tensor) -> float:
        """Top-1 accuracy on the labelled rows of ``features`` ``[N, D]``; NaN when none is."""
        labels = labels.to(self.linear.weight.device)
        keep = self._labelled(labels)
        if not bool(keep.any()):
            return float("nan")
        x = features.to(self.linear.weight.device)[keep]
        predicted = torch.cat([self(x[i : i + 4096]).argmax(1) for i in range(0, len(x), 4096)])
        return (predicted == labels[keep]).float().mean().item()

    def checkpoint_state(self) -> dict:
        """Weights and optimiser state, as tensors and plain types (``weights_only`` loads)."""
        return {"model": self.state_dict(), "optimizer": self.optimizer.state_dict()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])


@torch.no_grad()
def embedding_dim(method: Method, in_channels: int, side: int,
                  device: str | torch.device = "cpu") -> int:
    """D of ``method.embed`` on ``side`` px images: one eval-mode forward of two blank images
    (no BatchNorm statistics move, no random number is drawn)."""
    was_training = method.training
    method.eval()
    try:
        blank = torch.zeros(2, in_channels, side, side, dtype=torch.uint8, device=device)
        return method.embed(to_input(blank, replace(method.views, size=None))).shape[1]
    finally:
        method.train(was_training)


def probe_features(method: Method, images: torch.Tensor) -> torch.Tensor:
    """The features ``[B, D]`` the probe trains on for this step: what the method's training
    forward exposed (``Method.pop_probe_feature``), else ``embed`` of the un-augmented ``images``
    (uint8 ``[B, C, H, W]``) in eval mode without gradient, which costs a forward pass but leaves
    BatchNorm's running statistics as they are."""
    exposed = method.pop_probe_feature()
    if exposed is not None:
        return exposed
    was_training = method.training
    method.eval()
    try:
        with torch.no_grad():
            return method.embed(to_input(images, replace(method.views, size=None)))
    finally:
        method.train(was_training)
