"""Heads attached after the backbone's pooled feature."""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def projection_mlp(in_dim: int, hidden_dim: int, out_dim: int, num_layers: int = 2,
                   batch_norm: bool = False, last_bn: bool = False, last_bias: bool = True
                   ) -> nn.Sequential:
    """The MLP projection head g(.) of SimCLR (Chen et al. 2020, sec. 2.1) and MoCo v2, and the
    projectors and predictors of the BYOL family: ``[B, in_dim] -> [B, out_dim]``.

    ``num_layers=1`` is MoCo v1's linear head. ``batch_norm``: BatchNorm after every hidden
    linear layer, whose bias it makes redundant (BYOL, SimSiam, MoCo v3; MoCo v2 and PCL use
    none). ``last_bn``: an affine-free BatchNorm on the output, after a bias-free last layer
    (SimSiam's and MoCo v3's projectors). ``last_bias=False``: MoCo v3's bias-free predictor.
    """
    if num_layers < 1:
        raise ValueError(f"method.proj_layers must be >= 1 (got {num_layers})")
    for field, value in (("proj_hidden_dim", hidden_dim), ("proj_dim", out_dim)):
        if value < 1:
            raise ValueError(f"method.{field} must be >= 1 (got {value})")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        layers.append(nn.Linear(dim, hidden_dim, bias=not batch_norm))
        if batch_norm:
            layers.append(nn.BatchNorm1d(hidden_dim))
        layers.append(nn.ReLU(inplace=True))
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=last_bias and not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def scale_only_batchnorm(dim: int) -> nn.BatchNorm1d:
    """BatchNorm with a learned scale and no shift (its bias fixed at 0): the last layer of
    SimCLR's projection head (the reference's ``batch_norm(center=False)``)."""
    norm = nn.BatchNorm1d(dim)
    norm.bias.requires_grad_(False)
    return norm


class NormedLinear(nn.Linear):
    """A bias-free linear layer whose weight rows are L2-normalised in every forward: DINO's last
    layer with weight normalisation and its norm fixed to 1 (their ``norm_last_layer``)."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(in_dim, out_dim, bias=False)

    def forward(self, x):
        return F.linear(x, F.normalize(self.weight, dim=1))


class DINOHead(nn.Module):
    """DINO's projection head (Caron et al. 2021, sec. 3.1 and appendix): a 3-layer MLP (GELU) to
    a bottleneck, L2 normalisation, then a weight-normalised linear layer to K outputs."""

    def __init__(self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                 out_dim: int = 65536):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))
        self.last = NormedLinear(bottleneck_dim, out_dim)

    def forward(self, x):
        return self.last(F.normalize(self.mlp(x), dim=1))


class GumbelQuantizer(nn.Module):
    """A quantisation head (Le-Khac et al. 2020, sec. 4.2; the Gumbel-softmax codebook of
    wav2vec 2.0, Baevski et al. 2020, sec. 2): logits over ``codebook_size`` learned codes, a
    hard Gumbel-softmax sample in training (straight-through gradients, Jang et al. 2017) and the
    argmax in evaluation; the output is the chosen code vector. Put it after any projection.
    """

    def __init__(self, in_dim: int, codebook_size: int, code_dim: int, temperature: float = 1.0):
        super().__init__()
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        self.to_logits = nn.Linear(in_dim, codebook_size)
        self.codebook = nn.Parameter(torch.randn(codebook_size, code_dim))
        self.temperature = temperature

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.to_logits(x)
        if self.training:
            one_hot = F.gumbel_softmax(logits, tau=self.temperature, hard=True)
        else:
            one_hot = F.one_hot(logits.argmax(1), logits.shape[1]).to(x.dtype)
        return one_hot @ self.codebook
