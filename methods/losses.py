"""Contrastive losses as plain functions of tensors.

State (queues, memory banks, EMA encoders) lives in ``momentum.py``; distributed gathering is an
explicit helper here so a loss says in its signature whether it reaches across ranks.
"""

from __future__ import annotations

import math

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

    ``torch.distributed.all_gather`` cuts the graph; the functional collective keeps it (its
    backward sums every rank's gradient for this rank's slice), which SimCLR's cross-rank
    negatives need (each rank's anchors push on other ranks' embeddings). Works in any
    initialised process group, with or without a DDP model.
    """
    _, world = _world()
    if world == 1:
        return x
    from torch.distributed import _functional_collectives as funcol  # torch's own autograd gather

    return funcol.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD).wait()


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


def info_nce_in_batch(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """MoCo v3's contrastive loss (Chen, Xie & He 2021, arXiv 2104.02057, Algorithm 1): InfoNCE
    whose negatives are the other keys of the (global) batch, no queue, scaled by 2t as their code.

    Args:
        q: queries ``[N, D]`` of this rank (normalised here), with gradient.
        k: momentum keys ``[N, D]`` of this rank; every rank's keys are gathered (no gradient).
    """
    check_temperature(temperature)
    rank, _ = _world()
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


def supcon(features: torch.Tensor, labels: torch.Tensor | None = None, temperature: float = 0.1,
           base_temperature: float = 0.07, contrast_mode: str = "all",
           sum_inside_log: bool = False, gather: bool = False) -> torch.Tensor:
    """Supervised contrastive loss (Khosla et al. 2020, arXiv 2004.11362), as the authors' code.

    Default (their eq. 2, L_out): for every anchor i with positives P(i) (same label, self
    excluded) and candidates A(i) (everything but i, positives included),

        l_i = -(t / t_base) / |P(i)| * sum_{p in P(i)} log exp(z_i.z_p / t) / sum_{a in A(i)} exp(z_i.z_a / t)

    ``sum_inside_log=True``: l_i = -(t / t_base) * log(sum_{p} exp(.) / sum_{a in A(i)} exp(.)),
    i.e. -log(sum pos / (sum pos + sum neg)). An anchor without positives contributes 0 and still
    counts in the mean (as the authors' code). ``labels=None`` makes every image its own class,
    which is SimCLR's NT-Xent (equal to it when t == t_base).

    Args:
        features: ``[B, V, D]``, V views (or exits) of B images; normalised here.
        labels: ``[B]`` class ids, or None.
        contrast_mode: ``"all"`` anchors every view, ``"one"`` only view 0 (the contrast set is
            always every view).
        gather: contrast against every rank's features (with gradients); anchors stay local.
    """
    check_temperature(temperature)
    check_temperature(base_temperature, "base_temperature")
    if contrast_mode not in ("all", "one"):
        raise ValueError(f"contrast_mode must be 'all' or 'one', got {contrast_mode!r}")
    if features.dim() != 3:
        raise ValueError(f"features must be [batch, views, dim], got shape {tuple(features.shape)}")
    b, v, _ = features.shape
    feats = F.normalize(features, dim=2)
    rank, world = _world() if gather else (0, 1)
    ids = (torch.arange(b, device=features.device) + rank * b) if labels is None else labels.view(-1)
    if len(ids) != b:
        raise ValueError(f"labels has {len(ids)} entries for a batch of {b}")
    # view-major rows: view 0 of every image, then view 1, ...; the contrast set spans all ranks
    contrast = torch.cat([gather_with_grad(feats[:, j]) for j in range(v)])  # [V*B*W, D]
    contrast_ids = gather_no_grad(ids).repeat(v)
    n_anchor_views = v if contrast_mode == "all" else 1
    anchors = feats[:, :n_anchor_views].transpose(0, 1).reshape(n_anchor_views * b, -1)
    anchor_ids = ids.repeat(n_anchor_views)
    logits = anchors @ contrast.T / temperature  # [A, V*B*W]
    rows = torch.arange(len(anchors), device=features.device)
    self_col = (rows // b) * b * world + rank * b + rows % b
    is_self = torch.zeros_like(logits, dtype=torch.bool)
    is_self[rows, self_col] = True
    log_prob = logits.masked_fill(is_self, float("-inf")).log_softmax(dim=1)
    positive = (anchor_ids[:, None] == contrast_ids[None, :]) & ~is_self
    num_pos = positive.sum(1)
    if sum_inside_log:
        score = log_prob.masked_fill(~positive, float("-inf")).logsumexp(dim=1)
        score = torch.where(num_pos > 0, score, torch.zeros_like(score))
    else:
        score = log_prob.masked_fill(~positive, 0.0).sum(1) / num_pos.clamp(min=1)
    return -(temperature / base_temperature) * score.mean()


def selfcon(exit_features: list[torch.Tensor], labels: torch.Tensor | None = None,
            temperature: float = 0.1, base_temperature: float = 0.07, gather: bool = False
            ) -> torch.Tensor:
    """Self-contrastive loss (Bae et al. 2021, arXiv 2106.15499, eq. 2): SupCon whose "views"
    are the outputs of every exit (sub-networks and backbone) of every augmented view.

    Every output is an anchor; its positives are all other outputs with its label; the
    denominator is every output but itself. Without labels each augmented view is an instance of
    its own, as in the reference code: the positives are the same view's outputs at the other
    exits, and the other view of the same image is a negative (SelfCon-M).

    Args:
        exit_features: one ``[B, V, D]`` tensor per exit (V = 1 for SelfCon-S, 2 for SelfCon-M).
    """
    if labels is None:
        per_view = torch.stack(exit_features, dim=2)  # [B, V, E, D]: rows are (image, view)
        return supcon(per_view.flatten(0, 1), None, temperature, base_temperature, "all",
                      gather=gather)
    return supcon(torch.cat(exit_features, dim=1), labels, temperature, base_temperature, "all",
                  gather=gather)


def uniformity(vectors: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """Gaussian-potential uniformity (Wang & Isola 2020, arXiv 2005.10242, eq. 5) among the n
    vectors of each row, as ICL-MSR's L_uni:

        L_uni = log mean_{i != j} exp(-t ||a_i - a_j||^2) = log mean_{i != j} exp(2t a_i.a_j - 2t)

    for L2-normalised a_i; averaged over rows.

    Args:
        vectors: ``[B, n, c]`` (normalised here), n >= 2.
    """
    n = vectors.shape[1]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 vectors per row, got {n}")
    a = F.normalize(vectors, dim=2)
    energy = 2 * t * (a @ a.transpose(1, 2)) - 2 * t  # [B, n, n]
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=a.device)
    per_row = energy[:, off_diagonal].logsumexp(dim=1) - math.log(n * (n - 1))
    return per_row.mean()


# Score functions (Le-Khac et al. 2020, sec. 4.3): the similarity s(a, b) inside the energy
# exp(s / t). Each maps ``[N, D]`` x ``[M, D]`` to ``[N, M]``.


def dot_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return a @ b.T


def cosine_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.normalize(a, dim=1) @ F.normalize(b, dim=1).T


def bilinear_score(a: torch.Tensor, b: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """a^T W b, the score of CPC (van den Oord et al. 2018, eq. 3, W_k) with ``weight`` [D, D]."""
    return a @ weight @ b.T


def euclidean_score(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Negative squared Euclidean distance, so that larger is more similar like the others."""
    return -torch.cdist(a, b).pow(2)


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -p/||p|| . z/||z||, averaged (SimSiam, Chen & He 2021, arXiv 2011.10566, eq. 1);
    ``z`` is detached here: the stop-gradient of their eq. 3 is part of the loss's definition."""
    return -F.cosine_similarity(p, z.detach(), dim=1).mean()


def margin_contrastive(x0: torch.Tensor, x1: torch.Tensor, similar: torch.Tensor,
                       margin: float = 1.0) -> torch.Tensor:
    """Hadsell, Chopra & LeCun 2006, eq. 4, with D the Euclidean distance of a pair:

    L = similar * 1/2 D^2 + (1 - similar) * 1/2 max(0, margin - D)^2, averaged over pairs.
    """
    d = F.pairwise_distance(x0, x1)
    s = similar.to(d.dtype)
    return (s * 0.5 * d.pow(2) + (1 - s) * 0.5 * F.relu(margin - d).pow(2)).mean()


def triplet(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
            margin: float = 0.2) -> torch.Tensor:
    """FaceNet's triplet loss (Schroff et al. 2015, eq. 1) on squared Euclidean distances:
    max(0, ||a - p||^2 - ||a - n||^2 + margin), averaged."""
    pos = (anchor - positive).pow(2).sum(1)
    neg = (anchor - negative).pow(2).sum(1)
    return F.relu(pos - neg + margin).mean()


def _all_reduce_sum(x: torch.Tensor, gather: bool) -> torch.Tensor:
    if gather and _world()[1] > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def _logsumexp(x: torch.Tensor, dim: int, gather: bool) -> torch.Tensor:
    """log sum exp of ``x`` over ``dim`` (kept), and over every rank's rows when ``gather``."""
    if not (gather and _world()[1] > 1):
        return torch.logsumexp(x, dim=dim, keepdim=True)
    top = x.amax(dim=dim, keepdim=True)
    dist.all_reduce(top, op=dist.ReduceOp.MAX)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    total = (x - top).exp().sum(dim=dim, keepdim=True)
    dist.all_reduce(total)
    return total.log() + top


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
    world = _world()[1] if gather else 1
    total = len(scores) * world
    log_k, log_b = math.log(scores.shape[1]), math.log(total)
    log_q = scores.float() / epsilon  # [B, K]
    for _ in range(iterations):
        log_q = log_q - _logsumexp(log_q, 0, gather) - log_k  # every prototype's column: 1/K
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


def dino_loss(teacher: list[torch.Tensor], student: list[torch.Tensor], center: torch.Tensor,
              teacher_temperature: float = 0.04, student_temperature: float = 0.1) -> torch.Tensor:
    """DINO's cross-entropy (Caron et al. 2021, arXiv 2104.14294, eq. 3 and Algorithm 1): the
    centred, sharpened teacher distribution of each global view against the student's of every
    other view, sum_k -P_t log P_s, averaged over the (teacher, student) pairs of distinct views.

    Args:
        teacher: per global view, teacher outputs ``[B, K]`` (no gradient).
        student: per view (the global ones first, in the teacher's order), student outputs.
        center: ``[K]`` running mean of teacher outputs.
    """
    check_temperature(teacher_temperature, "teacher_temperature")
    check_temperature(student_temperature, "student_temperature")
    log_students = [F.log_softmax(s / student_temperature, dim=1) for s in student]
    total, pairs = teacher[0].new_zeros(()), 0
    for i, t in enumerate(teacher):
        p_t = F.softmax((t.detach() - center) / teacher_temperature, dim=1)
        for j, log_s in enumerate(log_students):
            if i != j:
                total = total - (p_t * log_s).sum(1).mean()
                pairs += 1
    if pairs == 0:
        raise ValueError("dino_loss needs at least two views")
    return total / pairs


@torch.no_grad()
def update_center(center: torch.Tensor, teacher: list[torch.Tensor], momentum: float = 0.9,
                  gather: bool = True) -> None:
    """c <- m c + (1 - m) mean of the teacher outputs over views and the global batch (DINO
    eq. 4), in place."""
    stacked = torch.cat(teacher)
    batch_sum = _all_reduce_sum(stacked.sum(0), gather)
    count = len(stacked) * (_world()[1] if gather else 1)
    center.mul_(momentum).add_(batch_sum / count, alpha=1 - momentum)


def cross_view_info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.07,
                        gather: bool = False) -> torch.Tensor:
    """CMC's two-view objective (Tian et al. 2019, arXiv 1906.05849, eq. 3-4) with the other
    images of the (global) batch as negatives: L(V1, V2) + L(V2, V1), where L(V1, V2) anchors each
    view-1 embedding and picks its own image's view-2 embedding among all view-2 embeddings.

    Args:
        z1, z2: ``[N, D]`` embeddings of the two views (normalised here).
    """
    check_temperature(temperature)
    rank, world = _world() if gather else (0, 1)
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
