"""Losses as plain functions of tensors, grouped as the review's taxonomy groups them
(Le-Khac et al. 2020, sec. 4.4): InfoNCE and relatives, supervised contrastive, score functions,
metric learning, negative-free prediction, swapped codes, self-distillation, uniformity."""
