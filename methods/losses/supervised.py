"""Contrastive losses whose positives come from labels or from the encoder's own exits (SupCon,
SelfCon)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.losses.contrastive import check_temperature
from methods.losses.distributed import gather_no_grad, gather_with_grad, rank_and_world


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
    rank, world = rank_and_world() if gather else (0, 1)
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
