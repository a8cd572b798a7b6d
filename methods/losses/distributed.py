"""Gathering across ranks, for losses whose negatives or normalisers span the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients to every rank's slice.

    ``torch.distributed.all_gather`` cuts the graph; the functional collective keeps it (its
    backward sums every rank's gradient for this rank's slice), which SimCLR's cross-rank
    negatives need (each rank's anchors push on other ranks' embeddings). Works in any
    initialised process group, with or without a DDP model.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    from torch.distributed import _functional_collectives as funcol  # torch's own autograd gather

    return funcol.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD).wait()


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (no gradient), e.g. MoCo keys before they enter the queue."""
    _, world = rank_and_world()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor, gather: bool) -> torch.Tensor:
    if gather and rank_and_world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def logsumexp_over_ranks(x: torch.Tensor, dim: int, gather: bool) -> torch.Tensor:
    """log sum exp of ``x`` over ``dim`` (kept), and over every rank's rows when ``gather``."""
    if not (gather and rank_and_world()[1] > 1):
        return torch.logsumexp(x, dim=dim, keepdim=True)
    top = x.amax(dim=dim, keepdim=True)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (x - top).exp().sum(dim=dim, keepdim=True)
    dist.all_reduce(total)
    return total.log() + top
