"""Contrastive losses as plain functions of tensors.

State (queues, memory banks, EMA encoders) lives in ``momentum.py``; distributed gathering is an
explicit helper here so a loss says in its signature whether it reaches across ranks.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F


def check_temperature(temperature: float, name: str = "temperature") -> None:
    if not temperature > 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")


def _world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank along dim 0, keeping gradients to every rank's slice.

    ``torch.distributed.all_gather`` cuts the graph; ``torch.distributed.nn`` does not, which
    SimCLR's cross-rank negatives need (each rank's anchors push on other ranks' embeddings).
    """
    _, world = _world()
    if world == 1:
        return x
    return torch.cat(dist.nn.functional.all_gather(x), dim=0)


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` from every rank (no gradient), e.g. MoCo keys before they enter the queue."""
    _, world = _world()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def info_nce(q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor, temperature: float = 0.2
             ) -> torch.Tensor:
    """InfoNCE in MoCo's form (He et al. 2020, arXiv 1911.05722, eq. 1).

    L_q = -log exp(q.k+ / t) / (exp(q.k+ / t) + sum_{k- in queue} exp(q.k- / t))

    Args:
        q: queries ``[N, C]``, L2-normalised.
        k: positive keys ``[N, C]``, L2-normalised, no gradient.
        queue: negative keys ``[K, C]``, L2-normalised.
    """
    check_temperature(temperature)
    l_pos = torch.einsum("nc,nc->n", q, k).unsqueeze(1)  # [N, 1]
    l_neg = torch.einsum("nc,kc->nk", q, queue.detach())  # [N, K]
    logits = torch.cat([l_pos, l_neg], dim=1) / temperature  # [N, 1+K]
    labels = torch.zeros(len(q), dtype=torch.long, device=q.device)
    return F.cross_entropy(logits, labels)


def nt_xent(z0: torch.Tensor, z1: torch.Tensor, temperature: float = 0.5, gather: bool = False
            ) -> torch.Tensor:
    """NT-Xent, SimCLR's loss (Chen et al. 2020, arXiv 2002.05709, eq. 1), averaged over all 2N
    anchors:

    l(i, j) = -log exp(sim(z_i, z_j) / t) / sum_{k != i} exp(sim(z_i, z_k) / t)

    with sim the cosine similarity. With ``gather=True`` the keys are the embeddings of every rank
    (with gradients); the anchors stay local, so each rank's label is offset by ``rank * N``.

    Args:
        z0, z1: the two views' projections ``[N, D]`` (normalised here).
    """
    check_temperature(temperature)
    n = len(z0)
    anchors = F.normalize(torch.cat([z0, z1]), dim=1)  # [2N, D]
    rank, world = _world() if gather else (0, 1)
    # keys: every rank's view-0 rows, then every rank's view-1 rows  [2NW, D]
    keys = torch.cat([gather_with_grad(anchors[:n]), gather_with_grad(anchors[n:])]) if world > 1 else anchors
    logits = anchors @ keys.T / temperature  # [2N, 2NW]
    local = torch.arange(n, device=z0.device) + rank * n
    self_idx = torch.cat([local, local + n * world])
    positive = torch.cat([local + n * world, local])
    logits[torch.arange(2 * n, device=z0.device), self_idx] = float("-inf")
    return F.cross_entropy(logits, positive)


def sample_negative_prototypes(positive: torch.Tensor, num_clusters: int, r: int,
                               generator: torch.Generator | None = None) -> torch.Tensor:
    """``r`` cluster ids not positive for any sample in the batch (as PCL's official code).

    Returns fewer when fewer clusters are left, rather than failing on small K.
    """
    is_candidate = torch.ones(num_clusters, dtype=torch.bool)
    is_candidate[positive.cpu()] = False
    candidates = is_candidate.nonzero().squeeze(1)
    order = torch.randperm(len(candidates), generator=generator)[:r]
    return candidates[order].to(positive.device)


def proto_nce(q: torch.Tensor, centroids: torch.Tensor, density: torch.Tensor,
              positive: torch.Tensor, negative: torch.Tensor) -> torch.Tensor:
    """The prototype term of ProtoNCE for one granularity (Li et al. 2021, arXiv 2005.04966,
    eq. 11, second term):

    -log exp(v.c_s / phi_s) / sum_{j in {s} + negatives} exp(v.c_j / phi_j)

    As in the official code, every sample's row scores all positive prototypes of the batch plus
    the ``r`` sampled negatives, each column divided by that prototype's concentration phi.

    Args:
        q: embeddings ``[N, C]``, L2-normalised.
        centroids: ``[K, C]`` L2-normalised prototypes; density: phi ``[K]``.
        positive: each sample's cluster id ``[N]``; negative: sampled cluster ids ``[r]``.
    """
    selected = torch.cat([positive, negative])  # [N + r]
    logits = q @ centroids[selected].T / density[selected]  # [N, N + r]
    labels = torch.arange(len(q), device=q.device)
    return F.cross_entropy(logits, labels)
