"""The contrastive losses against a reference implementation (lightly) or a literal reading of the
paper's equation written with Python loops."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightly.loss import NTXentLoss

from methods.losses.codes import sinkhorn
from methods.losses.contrastive import info_nce, nt_xent, proto_nce, sample_negative_prototypes


@pytest.mark.parametrize("temperature", [0.1, 0.5])
def test_nt_xent_matches_lightly(temperature):
    g = torch.Generator().manual_seed(1)
    z0 = torch.randn(16, 32, generator=g)
    z1 = torch.randn(16, 32, generator=g)
    expected = NTXentLoss(temperature=temperature)(z0, z1)
    got = nt_xent(z0, z1, temperature)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    # and the loss is not trivially temperature-independent
    assert not torch.isclose(nt_xent(z0, z1, temperature), nt_xent(z0, z1, temperature * 2))


def test_nt_xent_positive_pairs_lower_the_loss():
    g = torch.Generator().manual_seed(2)
    z0 = torch.randn(16, 32, generator=g)
    aligned = nt_xent(z0, z0 + 0.01 * torch.randn(16, 32, generator=g), 0.2)
    unrelated = nt_xent(z0, torch.randn(16, 32, generator=g), 0.2)
    assert aligned < unrelated - 1.0


def _info_nce_loop(q, k, queue, t):
    total = 0.0
    for i in range(len(q)):
        pos = math.exp(float(q[i] @ k[i]) / t)
        neg = sum(math.exp(float(q[i] @ queue[j]) / t) for j in range(len(queue)))
        total += -math.log(pos / (pos + neg))
    return total / len(q)


@pytest.mark.parametrize("temperature", [0.2, 0.07])
def test_info_nce_matches_moco_eq1(temperature):
    g = torch.Generator().manual_seed(3)
    q = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(8, 16, generator=g, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(20, 16, generator=g, dtype=torch.float64), dim=1)
    got = info_nce(q.float(), k.float(), queue.float(), temperature)
    expected = _info_nce_loop(q, k, queue, temperature)
    assert abs(float(got) - expected) < 1e-5


def test_info_nce_does_not_backprop_into_queue():
    g = torch.Generator().manual_seed(4)
    q = F.normalize(torch.randn(4, 8, generator=g), dim=1).requires_grad_(True)
    k = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(10, 8, generator=g), dim=1).requires_grad_(True)
    info_nce(q, k, queue, 0.2).backward()
    assert q.grad is not None and q.grad.abs().sum() > 0
    assert queue.grad is None


def test_proto_nce_matches_hand_computation():
    rng = np.random.default_rng(5)
    n, num_k = 4, 6
    q = rng.normal(size=(n, 5))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    c = rng.normal(size=(num_k, 5))
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    phi = rng.uniform(0.1, 0.5, size=num_k)
    positive = [0, 2, 2, 3]  # a repeated positive, as happens in real batches
    negative = [1, 5]  # r = 2, none of them positive

    expected = 0.0
    columns = positive + negative
    for i in range(n):
        logits = [float(np.dot(q[i], c[j])) / phi[j] for j in columns]
        denom = sum(math.exp(v) for v in logits)
        expected += -math.log(math.exp(logits[i]) / denom)
    expected /= n

    got = proto_nce(torch.tensor(q, dtype=torch.float32), torch.tensor(c, dtype=torch.float32),
                    torch.tensor(phi, dtype=torch.float32), torch.tensor(positive),
                    torch.tensor(negative))
    assert abs(float(got) - expected) < 1e-5


@pytest.mark.parametrize("r", [1, 3, 50])
def test_sample_negative_prototypes_excludes_positives(r):
    num_clusters = 10
    positive = torch.tensor([0, 3, 3, 7, 9])
    available = num_clusters - len(set(positive.tolist()))
    for seed in range(20):
        neg = sample_negative_prototypes(positive, num_clusters, r, torch.Generator().manual_seed(seed))
        ids = neg.tolist()
        assert len(ids) == min(r, available)
        assert len(set(ids)) == len(ids)
        assert not set(ids) & set(positive.tolist())
        assert all(0 <= i < num_clusters for i in ids)


def test_sample_negative_prototypes_covers_all_candidates():
    positive = torch.tensor([1, 2])
    seen = set()
    for seed in range(50):
        seen |= set(sample_negative_prototypes(positive, 6, 1, torch.Generator().manual_seed(seed)).tolist())
    assert seen == {0, 3, 4, 5}


@pytest.mark.parametrize("temperature", [0.0, -0.1])
def test_non_positive_temperature_raises(temperature):
    x = F.normalize(torch.randn(4, 8), dim=1)
    with pytest.raises(ValueError, match="temperature"):
        info_nce(x, x, x, temperature)
    with pytest.raises(ValueError, match="temperature"):
        nt_xent(x, x, temperature)


def _sinkhorn_direct(scores: torch.Tensor, epsilon: float, iterations: int = 3) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp written out in float64 on exp(scores / epsilon) (Caron et al. 2020,
    sec. 3.1): columns to 1/K, rows to 1/B, then rows scaled to sum to 1."""
    q = torch.exp((scores.double() - scores.max()) / epsilon)
    q /= q.sum()
    b, k = q.shape
    for _ in range(iterations):
        q /= q.sum(dim=0, keepdim=True) * k
        q /= q.sum(dim=1, keepdim=True) * b
    return q * b


@pytest.mark.parametrize("epsilon", [0.05, 0.005])
def test_sinkhorn_in_the_log_domain_matches_float64_and_stays_finite(epsilon):
    """At epsilon 0.005 exp(scores / epsilon) underflows in float32 (every code NaN before the
    log-domain rounds); the codes now match the float64 computation and rows sum to 1."""
    g = torch.Generator().manual_seed(0)
    z = F.normalize(torch.randn(64, 32, generator=g), dim=1)
    prototypes = F.normalize(torch.randn(30, 32, generator=g), dim=1)
    scores = z @ prototypes.T  # [64, 30] cosine scores in [-1, 1], float32 as in training
    codes = sinkhorn(scores, epsilon=epsilon)
    assert torch.isfinite(codes).all()
    torch.testing.assert_close(codes.double(), _sinkhorn_direct(scores, epsilon), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(codes.sum(1), torch.ones(64))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn(scores, epsilon=0)
