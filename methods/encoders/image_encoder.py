"""A trained encoder as one module from raw pixels to embeddings, what an MLflow model of a run
holds: ``mlflow.pytorch.load_model("runs:/<id>/encoder")(images)``."""

from __future__ import annotations

import torch
import torch.nn as nn

from methods.base import Method


class ImageEncoder(nn.Module):
    """``[B, C, H, W]`` uint8 pixels (0..255) or floats in [0, 1] -> ``[B, D]`` embeddings.

    Scales uint8 to [0, 1], normalises with the views' ``mean`` / ``std`` as training did, then
    runs the method's representation: the backbone alone where that is the method's ``embed``
    (every method but CMC and CPC), else the method's ``embed``. Images are expected at the size
    the run evaluated on (``encoder.json``'s ``input.size``); nothing is resized here.
    """

    def __init__(self, method: Method, backbone_only: bool):
        super().__init__()
        self.net = method.backbone if backbone_only else method
        self.backbone_only = backbone_only
        self.mean, self.std = float(method.views.mean), float(method.views.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255 if images.dtype == torch.uint8 else images.float()
        x = (x - self.mean) / self.std
        return self.net(x) if self.backbone_only else self.net.embed(x)


def image_encoder(method: Method, channels: int, side: int) -> ImageEncoder:
    """``method``'s ``ImageEncoder`` in eval mode, holding only the backbone when the backbone's
    output is the method's ``embed`` on a probe batch of ``channels`` x ``side`` x ``side``."""
    method.eval()
    x = torch.rand(2, channels, side, side, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        embedded = method.embed(x)
        try:
            alone = method.backbone(x)
        except RuntimeError:  # CPC's backbone reads patches, not whole images
            alone = None
    same = alone is not None and embedded.shape == alone.shape and torch.allclose(embedded, alone)
    return ImageEncoder(method, backbone_only=same).eval()
