"""The sharded E-step's protocol (``orchestration.prototypes``) run by threads standing in for
Train workers, each round reduced by the same ``reduce_round`` the Ray actor runs: the result
must not depend on how many ranks hold the features."""

from __future__ import annotations

import numpy as np
import pytest

from methods.clustering.lloyd import assign, init_indices, lloyd
from methods.clustering.prototypes import concentration
from orchestration.prototypes import sharded_in_threads

NUM_CLUSTERS, NITER, NREDO, SEED = [6, 12], 8, 2, 3


def _features(n: int = 1001, d: int = 8) -> np.ndarray:
    rng = np.random.default_rng(0)
    means = rng.normal(0, 4, (6, d))
    return (means[rng.integers(0, 6, n)] + rng.normal(0, 1, (n, d))).astype(np.float32)


def run_ranks(x: np.ndarray, world: int) -> list:
    return sharded_in_threads(x, world, NUM_CLUSTERS, 0.2, SEED, NITER, NREDO)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_estep_equals_one_rank(world):
    x = _features()
    one = run_ranks(x, 1)[0]
    many = run_ranks(x, world)
    for r, found in enumerate(many):
        own = np.arange(r, len(x), world)
        np.testing.assert_array_equal(found.indices, own)
        for g in range(len(NUM_CLUSTERS)):
            np.testing.assert_allclose(found.centroids[g], one.centroids[g], atol=1e-5)
            np.testing.assert_allclose(found.density[g], one.density[g], atol=1e-6)
            np.testing.assert_array_equal(found.assignments[g], one.assignments[g][own])
        assert found.encoded == len(x)


def test_sharded_estep_is_lloyd_with_the_lowest_objective_restart():
    """One rank, so nothing is split: the rounds give plain Lloyd from the seeded starts, the
    restart with the lower objective, and phi as the gathered formula computes it."""
    x = _features()
    found = run_ranks(x, 2)[0]
    for g, k in enumerate(NUM_CLUSTERS):
        runs = [lloyd([x], x[init_indices(len(x), k, SEED + g * 101 + redo)], NITER)
                for redo in range(NREDO)]
        best = min(runs, key=lambda run: run[1])[0]
        unit = best / np.linalg.norm(best, axis=1, keepdims=True)
        np.testing.assert_allclose(found.centroids[g], unit, atol=1e-5)
        ids, sq_dist = assign(x, best)
        np.testing.assert_allclose(found.density[g], concentration(sq_dist, ids, k, 0.2),
                                   atol=1e-6)
