"""BatchNorm arrangements that keep a contrastive loss from reading the batch statistics."""

from __future__ import annotations

import torch
import torch.nn as nn


def check_bn_splits(splits: int, batch_size: int) -> None:
    """A BatchNorm slice needs 2 images to have statistics; one slice (no split) is always fine."""
    if splits > 1 and batch_size < 2 * splits:
        raise ValueError(f"method.bn_splits ({splits}) leaves fewer than 2 images per BatchNorm "
                         f"slice of a {batch_size}-image batch per worker; lower it or raise "
                         f"optim.batch_size")


def split_batch_forward(encoder: nn.Module, x: torch.Tensor, splits: int,
                        generator: torch.Generator | None = None) -> torch.Tensor:
    """``encoder(x)`` run on ``splits`` slices of the batch, so BatchNorm normalises each slice by
    its own statistics; with ``generator`` the slices are a random permutation of the batch and the
    outputs come back in input order.

    This is MoCo's shuffling BN (He et al. 2020, sec. 3.3) inside one process: when the query
    and its positive key are normalised by statistics of the same images, the model can match
    them through the batch statistics instead of the content (the "leak"). Shuffling the keys
    into other slices than their queries breaks that link, as the per-GPU batches of the paper's
    8-GPU run do; the same code then runs per rank under DDP. Queries are sliced too (in order),
    as MoCo's per-GPU batches are.
    """
    check_bn_splits(splits, len(x))
    if splits == 1:
        return encoder(x)
    if generator is None:
        return torch.cat([encoder(part) for part in x.chunk(splits)])
    order = torch.randperm(len(x), generator=generator).to(x.device)
    shuffled = torch.cat([encoder(part) for part in x[order].chunk(splits)])
    out = torch.empty_like(shuffled)
    out[order] = shuffled
    return out
