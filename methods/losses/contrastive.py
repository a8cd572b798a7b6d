"""InfoNCE and its relatives: one positive against negatives from a queue, the batch, a memory bank
or prototypes."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from methods.losses.distributed import gather_no_grad, gather_with_grad, rank_and_world


def check_temperature(temperature: float, name: str = "temperature") -> None:
    if not temperature > 0:
        raise ValueError(f"{name} must be > 0, got {temperature}")


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
    rank, world = rank_and_world() if gather else (0, 1)
    # keys: every rank's view-0 rows, then every rank's view-1 rows  [2NW, D]
    keys = torch.cat([gather_with_grad(anchors[:n]), gather_with_grad(anchors[n:])]) if world > 1 else anchors
    logits = anchors @ keys.T / temperature  # [2N, 2NW]
    local = torch.arange(n, device=z0.device) + rank * n
    self_idx = torch.cat([local, local + n * world])
    positive = torch.cat([local + n * world, local])
    logits[torch.arange(2 * n, device=z0.device), self_idx] = float("-inf")
    return F.cross_entropy(logits, positive)


def info_nce_in_batch(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v3's contrastive loss (Chen, Xie & He 2021, arXiv 2104.02057, Algorithm 1): InfoNCE
    whose negatives are the other keys of the (global) batch, no queue, scaled by 2t as their code.

    Args:
        q: queries ``[N, D]`` of this rank (normalised here), with gradient.
        k: momentum keys ``[N, D]`` of this rank; every rank's keys are gathered (no gradient).
    """
    check_temperature(temperature)
    rank, _ = rank_and_world()
    q = F.normalize(q, dim=1)
    keys = gather_no_grad(F.normalize(k, dim=1))
    logits = q @ keys.T / temperature  # [N, N * world]
    labels = torch.arange(len(q), device=q.device) + rank * len(q)
    return 2 * temperature * F.cross_entropy(logits, labels)


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


def cross_view_info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07,
                        gather: bool = False) -> torch.Tensor:
    """CMC's two-view objective (Tian et al. 2019, arXiv 1906.05849, eq. 3-4) with the other
    images of the (global) batch as negatives: L(V1, V2) + L(V2, V1), where L(V1, V2) anchors each
    view-1 embedding and picks its own image's view-2 embedding among all view-2 embeddings.

    Args:
        z1, z2: ``[N, D]`` embeddings of the two views (normalised here).
    """
    check_temperature(temperature)
    rank, world = rank_and_world() if gather else (0, 1)
    a, b = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    keys_a = gather_with_grad(a) if world > 1 else a
    keys_b = gather_with_grad(b) if world > 1 else b
    labels = torch.arange(len(a), device=a.device) + rank * len(a)
    return (F.cross_entropy(a @ keys_b.T / temperature, labels)
            + F.cross_entropy(b @ keys_a.T / temperature, labels))


def nce_loss(positive: torch.Tensor, negatives: torch.Tensor, log_z: torch.Tensor | float,
             num_samples: int) -> torch.Tensor:
    """Noise-contrastive estimation of the non-parametric softmax (Wu et al. 2018, eq. 3-6).

    P(i|v) = exp(v_i . f / t) / Z (eq. 2, Z estimated as in eq. 5); with m noise samples from
    P_n = 1/n, h(i, v) = P(i|v) / (P(i|v) + m P_n), and
    J_NCE = -E[log h(i, v)] - m E_{P_n}[log(1 - h(i, v'))], the second term summed over the m
    noise samples of each anchor.

    Args:
        positive: ``[B]`` scores v_i . f_i / t against each anchor's own memory entry.
        negatives: ``[B, m]`` scores against the m noise entries.
        log_z: log of the normalising constant Z.
        num_samples: n, the size of the whole memory bank (every rank's shard).
    """
    log_noise = math.log(negatives.shape[1] / num_samples)  # log(m P_n)
    log_p_pos, log_p_neg = positive - log_z, negatives - log_z
    log_h_pos = log_p_pos - torch.logaddexp(log_p_pos, torch.full_like(log_p_pos, log_noise))
    log_1mh_neg = log_noise - torch.logaddexp(log_p_neg, torch.full_like(log_p_neg, log_noise))
    return -(log_h_pos + log_1mh_neg.sum(dim=1)).mean()
