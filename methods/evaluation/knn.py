"""Weighted kNN accuracy (Wu et al. 2018), the score that needs no training at all."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                 test_labels: np.ndarray, k: int = 200, temperature: float = 0.1,
                 chunk: int = 1024) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018, InstDisc, sec. 3.4): the top-k
    neighbours vote for their class with weight exp(s_i / temperature).

    Rows labelled ``-1`` (unlabelled) are left out of the bank and of the queries, so a partly
    labelled source is scored on its labelled images; NaN when either side has none."""
    bank_keep, query_keep = np.asarray(train_labels) >= 0, np.asarray(test_labels) >= 0
    if not bank_keep.any() or not query_keep.any():
        return float("nan")
    train, train_labels = np.asarray(train)[bank_keep], np.asarray(train_labels)[bank_keep]
    test, test_labels = np.asarray(test)[query_keep], np.asarray(test_labels)[query_keep]
    bank = F.normalize(torch.as_tensor(train, dtype=torch.float32), dim=1)
    bank_labels = torch.as_tensor(train_labels, dtype=torch.long)
    queries = F.normalize(torch.as_tensor(test, dtype=torch.float32), dim=1)
    num_classes = int(max(bank_labels.max(), int(test_labels.max()))) + 1
    k = min(k, len(bank))
    preds = []
    for i in range(0, len(queries), chunk):
        sim, idx = (queries[i : i + chunk] @ bank.T).topk(k, dim=1)  # [n, k]
        votes = torch.zeros(len(sim), num_classes)
        votes.scatter_add_(1, bank_labels[idx], (sim / temperature).exp())
        preds.append(votes.argmax(1))
    return float((torch.cat(preds).numpy() == np.asarray(test_labels)).mean())
