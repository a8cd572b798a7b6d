"""Swapped prediction of cluster codes: Sinkhorn-Knopp soft assignments and the SwAV loss."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.losses.contrastive import check_temperature
from methods.losses.distributed import logsumexp_over_ranks, rank_and_world


@torch.no_grad()
def sinkhorn(scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05, gather: bool = False
             ) -> torch.Tensor:
    """Soft codes Q for SwAV (Caron et al. 2020, arXiv 2006.09882, eq. 3 and sec. 3.1): the
    entropic optimal transport of B samples onto K prototypes with equal mass per prototype,
    solved by ``iterations`` Sinkhorn-Knopp rounds on exp(scores / epsilon). With ``gather`` the
    B samples are every rank's (sums are all-reduced), so the equipartition holds for the global
    batch. Returns ``[B, K]`` codes whose rows sum to 1.

    The rounds run on log Q (each normalisation a log-sum-exp), so the codes stay finite for any
    finite scores and epsilon > 0, where exp(scores / epsilon) underflows to 0 at small epsilon.
    """
    check_temperature(epsilon, "method.epsilon")
    world = rank_and_world()[1] if gather else 1
    total = len(scores) * world
    log_k, log_b = math.log(scores.shape[1]), math.log(total)
    log_q = scores.float() / epsilon  # [B, K]
    for _ in range(iterations):
        log_q = log_q - logsumexp_over_ranks(log_q, 0, gather) - log_k  # every prototype's column: 1/K
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_b  # every row: 1/B
    return (log_q + log_b).exp()


def swav_loss(global_scores: list[torch.Tensor], local_scores: list[torch.Tensor] | None = None,
              temperature: float = 0.1, iterations: int = 3, epsilon: float = 0.05,
              gather: bool = False, queue_scores: list[torch.Tensor] | None = None) -> torch.Tensor:
    """SwAV's swapped prediction (Caron et al. 2020, eq. 1-2): the codes of each global crop are
    predicted from every other crop, -sum_k q_k log softmax(z.c_k / t), averaged over crops and
    over the global crops that provide codes.

    Args:
        global_scores / local_scores: per crop, prototype scores ``[B, K]`` (z.c of normalised z
            and prototypes); codes come from the global crops only.
        queue_scores: per global crop, scores ``[L, K]`` of that crop's queued features from
            earlier batches (sec. 4.1, small batches): they join Sinkhorn's equipartition and
            their codes are dropped.
    """
    check_temperature(temperature)
    crops = [*global_scores, *(local_scores or [])]
    total = global_scores[0].new_zeros(())
    for i, scores in enumerate(global_scores):
        batch = scores.detach()
        if queue_scores is not None:
            batch = torch.cat([batch, queue_scores[i].detach()])
        codes = sinkhorn(batch, iterations, epsilon, gather)[: len(scores)]
        others = [c for j, c in enumerate(crops) if j != i]
        total = total + sum(-(codes * F.log_softmax(c / temperature, dim=1)).sum(1).mean()
                            for c in others) / len(others)
    return total / len(global_scores)
