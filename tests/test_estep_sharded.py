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


def test_gather_on_a_gpu_actor_is_the_sharded_estep_with_one_shard():
    """``clustering.gpus: 1``: the actor runs the sharded algorithm on its device over every
    encoded image (here the CPU as the torch device). Same centroids, phi and assignments as one
    rank of the sharded E-step, and -1 for an image no worker encoded."""
    from methods.clustering.kmeans import run_kmeans
    from orchestration.prototypes import gather_on_device

    x = _features()
    one = run_ranks(x, 1)[0]
    present = np.arange(len(x))
    found = gather_on_device(present, x, len(x), 0, NUM_CLUSTERS, 0.2, SEED, NITER, NREDO, "cpu")
    for g in range(len(NUM_CLUSTERS)):
        np.testing.assert_allclose(found.centroids[g], one.centroids[g], atol=1e-5)
        np.testing.assert_allclose(found.density[g], one.density[g], atol=1e-6)
        np.testing.assert_array_equal(found.assignments[g], one.assignments[g])
    assert found.indices is None and found.encoded == len(x)
    # as good a clustering as faiss's on the same features: within 2% of its objective
    faiss_found = run_kmeans(x, NUM_CLUSTERS, 0.2, SEED, NITER, NREDO)
    for g in range(len(NUM_CLUSTERS)):
        ours, theirs = (((x - c[a]) ** 2).sum() for c, a in (
            (_raw_centroids(x, found.assignments[g]), found.assignments[g]),
            (_raw_centroids(x, faiss_found.assignments[g]), faiss_found.assignments[g])))
        assert ours <= theirs * 1.02
    missing = gather_on_device(present[1:], x[1:], len(x), 0, [6], 0.2, SEED, NITER, NREDO, "cpu")
    assert missing.assignments[0][0] == -1 and (missing.assignments[0][1:] >= 0).all()


def _raw_centroids(x: np.ndarray, ids: np.ndarray) -> np.ndarray:
    return np.stack([x[ids == j].mean(0) if (ids == j).any() else np.zeros(x.shape[1])
                     for j in range(ids.max() + 1)])
