"""Self-distillation without labels: the DINO loss and its teacher centre."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from methods.losses.contrastive import check_temperature
from methods.losses.distributed import all_reduce_sum, rank_and_world


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
    batch_sum = all_reduce_sum(stacked.sum(0), gather)
    count = len(stacked) * (rank_and_world()[1] if gather else 1)
    center.mul_(momentum).add_(batch_sum / count, alpha=1 - momentum)
