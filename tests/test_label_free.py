"""Label-free scores (methods.evaluation.label_free) on inputs whose value is known in closed form."""

import math

import numpy as np
import pytest
import torch

from methods.evaluation.label_free import alignment, cluster_entropy, label_free_scores, rankme, uniformity


def test_rankme_counts_the_directions_an_embedding_uses():
    q, _ = torch.linalg.qr(torch.randn(64, 16, generator=torch.Generator().manual_seed(0)))
    assert rankme(q) == pytest.approx(16, rel=1e-3)  # 16 equal singular values
    rank_one = torch.randn(64, 1) @ torch.randn(1, 16)
    assert rankme(rank_one) == pytest.approx(1, abs=0.01)  # a collapsed embedding
    scaled = q * torch.tensor([1.0] * 8 + [1e-6] * 8)
    assert rankme(scaled) == pytest.approx(8, rel=1e-3)
    with pytest.raises(ValueError, match="at least 2"):
        rankme(torch.ones(1, 4))


def test_alignment_is_the_mean_squared_distance_of_normalised_pairs():
    x = torch.randn(10, 8)
    assert alignment(x, 3 * x) == pytest.approx(0, abs=1e-6)  # scale does not count
    assert alignment(x, -x) == pytest.approx(4, abs=1e-5)  # antipodal: ||a - (-a)||^2 = 4


def test_uniformity_of_antipodal_and_identical_points():
    e = torch.tensor([[1.0, 0.0], [-1.0, 0.0]])
    assert uniformity(e) == pytest.approx(-8, abs=1e-5)  # log exp(-2 * 4)
    assert uniformity(torch.ones(5, 3)) == pytest.approx(0, abs=1e-6)  # all in one point
    spread = torch.nn.functional.normalize(torch.randn(500, 3), dim=1)
    assert uniformity(spread) < uniformity(spread[:, :1].repeat(1, 3))


def test_cluster_entropy_is_one_for_equal_sizes_and_zero_for_one_cluster():
    assert cluster_entropy(np.repeat(np.arange(4), 5), 4) == pytest.approx(1.0)
    assert cluster_entropy(np.zeros(20, dtype=int), 4) == pytest.approx(0.0)
    assert cluster_entropy(np.array([-1, 0, 1, -1]), 2) == pytest.approx(1.0)  # -1: not clustered
    assert math.isnan(cluster_entropy(np.full(3, -1), 2))
    assert cluster_entropy(np.array([0, 0, 0, 1]), 2) == pytest.approx(
        -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(2))


def test_label_free_scores_of_one_image_are_nan_not_an_error():
    scores = label_free_scores(torch.ones(1, 4), torch.ones(1, 4), torch.ones(1, 4))
    assert all(math.isnan(v) for v in scores.values())
    assert set(scores) == {"rankme", "alignment", "uniformity"}
