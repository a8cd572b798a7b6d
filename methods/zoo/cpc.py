"""Contrastive Predictive Coding for images (van den Oord et al. 2018, arXiv 1807.03748, sec.
3.3): the image is cut into a grid of overlapping patches, every patch is encoded by the
backbone (z), an autoregressive network over the grid's rows summarises what lies above (c),
and InfoNCE (eq. 4) makes W_k c_{i,j} pick out z_{i+k,j}, the patch k rows below, among the
other patches of the same and of other images.

Small-image scaling of the paper's 64 px patches at stride 32 on images resized to 256 px (a
7 x 7 grid, predicting up to 5 rows below): patches a quarter of the side (at least 8 px, which
the small ConvNet needs) at half-patch stride, so 32 px images give the paper's 7 x 7 grid and
28 px a 6 x 6 one; up to 3 rows below. ``image_size`` resizes first (8 px digits to 16). The
context is a masked convolution (PixelCNN-style: rows above and the current row only).
Negatives come from groups of 16 images, the per-GPU batch the paper contrasted within, which
also keeps the logits to 16 * G^2 columns on a CPU. The representation is the mean over the
grid of the patch encodings.
"""

from __future__ import annotations

from dataclasses import replace

import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.base import Batch, Method
from methods.data.views import ViewSpec, augment
from methods.losses.contrastive import check_temperature
from methods.losses.similarity import cosine_score


class RowCausalConv(nn.Module):
    """A k x k convolution whose output at row i sees input rows i - k + 1 .. i only: the
    input is padded above and at the sides, never below."""

    def __init__(self, cin: int, cout: int, kernel: int = 3):
        super().__init__()
        self.pad = (kernel // 2, kernel // 2, kernel - 1, 0)  # left, right, top, bottom
        self.conv = nn.Conv2d(cin, cout, kernel)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.pad))


class RowContext(nn.Module):
    """c = g_ar(z): residual blocks of row-causal convolutions over the ``[B, D, G, G]`` grid."""

    def __init__(self, dim: int, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(nn.Sequential(nn.ReLU(), RowCausalConv(dim, dim))
                                    for _ in range(layers))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        c = z
        for block in self.blocks:
            c = c + block(c)
        return c


def resize(x: torch.Tensor, side: int) -> torch.Tensor:
    return F.interpolate(x, size=(side, side), mode="bilinear", antialias=True, align_corners=False)


def patch_grid(x: torch.Tensor, patch: int, stride: int) -> torch.Tensor:
    """``[B, C, S, S]`` -> ``[B, G, G, C, patch, patch]`` overlapping patches."""
    return x.unfold(2, patch, stride).unfold(3, patch, stride).permute(0, 2, 3, 1, 4, 5)


def cpc_info_nce(predictions: torch.Tensor, z: torch.Tensor, steps: int, temperature: float = 0.1
                 ) -> torch.Tensor:
    """InfoNCE of eq. 4 over the grid, averaged over k = 1..``steps``.

    For every image b, row i, column j and step k, the score of candidate patch z_n is
    cos(W_k c_{b,i,j}, z_n) / t: eq. 3's bilinear f_k with both sides normalised (the review's
    cosine score). The positive is z_{b,i+k,j}; the candidates are all patches of all images in
    ``z``. The paper's raw bilinear score diverged here or, at a small lr, made kNN fall on
    digits, where the cosine score trained (benchmarks/RESULTS.md).

    Args:
        predictions: ``[steps, B, G, G, D]`` W_k c for every k (rows i + k past the grid unused).
        z: ``[B, G, G, D]`` patch encodings.
    """
    b, g, _, d = z.shape
    candidates = z.reshape(b * g * g, d)
    index = torch.arange(b * g * g, device=z.device).view(b, g, g)
    losses = []
    for k in range(1, steps + 1):
        pred = predictions[k - 1][:, : g - k].reshape(-1, d)  # rows with a patch k below
        target = index[:, k:].reshape(-1)
        scores = cosine_score(pred, candidates) / temperature
        losses.append(F.cross_entropy(scores, target))
    return torch.stack(losses).mean()


class CPC(Method):
    name = "cpc"

    def __init__(self, backbone: nn.Module, views: ViewSpec, patch_size: int = 0,
                 prediction_steps: int = 3, context_layers: int = 2, images_per_contrast: int = 16,
                 temperature: float = 0.1, image_size: int = 0, seed: int = 0):
        super().__init__(backbone, views, seed)
        if image_size < 0:
            raise ValueError(f"method.image_size must be >= 0 (0: the views' size), got {image_size}")
        self.image_size = image_size
        check_temperature(temperature, "method.temperature")
        self.temperature = temperature
        if prediction_steps < 1:
            raise ValueError(f"method.prediction_steps must be >= 1, got {prediction_steps}")
        if images_per_contrast < 1:
            raise ValueError(f"method.images_per_contrast must be >= 1, got {images_per_contrast}")
        self.patch_size, self.steps, self.group = patch_size, prediction_steps, images_per_contrast
        dim = backbone.feature_dim
        self.context = RowContext(dim, context_layers)
        self.predictors = nn.ModuleList(nn.Linear(dim, dim, bias=False)
                                        for _ in range(prediction_steps))  # W_k

    def geometry(self, side: int) -> tuple[int, int, int]:
        """(patch, stride, grid side) for ``side`` px images; a grid too small to predict
        ``prediction_steps`` rows below is a clear error."""
        patch = self.patch_size or max(8, side // 4)
        stride = max(1, patch // 2)
        grid = (side - patch) // stride + 1 if side >= patch else 0
        if grid <= self.steps:
            raise ValueError(f"method.prediction_steps={self.steps} needs a patch grid of more than "
                             f"{self.steps} rows; {side} px images with {patch} px patches give "
                             f"{grid}. Lower method.prediction_steps or method.patch_size, or "
                             "raise data.image_size")
        return patch, stride, grid

    def augmented_patch_codes(self, images: torch.Tensor) -> torch.Tensor:
        """z for a training batch: every patch augmented on its own (CPC v2's patch-wise
        augmentation, Henaff et al. 2019, sec. 4.2). Without it the predictor reads the pixels
        that overlapping patches share: on digits the loss fell but kNN fell with it
        (benchmarks/RESULTS.md)."""
        side = self.image_size or self.views.size or images.shape[-1]
        if side != images.shape[-1]:
            images = resize(images.float(), side).round().clamp(0, 255).to(torch.uint8)
        patch, stride, _ = self.geometry(side)
        return self.grid_codes(patch_grid(images, patch, stride), augment_each=True)

    def encode_patches(self, x: torch.Tensor) -> torch.Tensor:
        """``[B, C, S, S]`` float images -> ``[B, G, G, D]`` patch encodings z (at
        ``image_size`` when set)."""
        if self.image_size and self.image_size != x.shape[-1]:
            x = resize(x, self.image_size)
        patch, stride, _ = self.geometry(x.shape[-1])
        return self.grid_codes(patch_grid(x, patch, stride), augment_each=False)

    def grid_codes(self, patches: torch.Tensor, augment_each: bool) -> torch.Tensor:
        """Backbone codes ``[B, G, G, D]`` of a ``[B, G, G, C, p, p]`` patch grid (uint8 patches
        when ``augment_each``, which gives every patch its own random view)."""
        b, g = patches.shape[:2]
        x = patches.reshape(b * g * g, *patches.shape[3:])
        if augment_each:
            x = augment(x, replace(self.views, size=x.shape[-1]), self.generator)
        return self.backbone(x).view(b, g, g, -1)

    def training_step(self, batch: Batch, prototypes=None) -> tuple[torch.Tensor, dict[str, float]]:
        z = self.augmented_patch_codes(batch.images)  # [B, G, G, D]
        self.expose(z.mean(dim=(1, 2)))  # embed's grid mean, here of the augmented patches
        c = self.context(z.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # [B, G, G, D]
        predictions = torch.stack([w(c) for w in self.predictors])  # [K, B, G, G, D]
        groups = range(0, len(z), self.group)
        losses = [cpc_info_nce(predictions[:, s : s + self.group], z[s : s + self.group], self.steps,
                               self.temperature) for s in groups]
        loss = torch.stack(losses).mean()
        return loss, {"loss_info_nce": loss.item()}

    @torch.no_grad()
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.encode_patches(x).mean(dim=(1, 2))
