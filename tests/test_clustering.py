"""PCL's E-step: the concentration phi against a plain loop, faiss k-means on separable blobs."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch
from sklearn.metrics import adjusted_rand_score

from methods.clustering.kmeans import run_kmeans
from methods.clustering.prototypes import Prototypes, concentration


def _phi_by_loop(sq_distances, assignments, num_clusters, temperature):
    """PCL's official recipe, spelled out one cluster at a time."""
    members = [[] for _ in range(num_clusters)]
    for d, a in zip(sq_distances, assignments, strict=True):
        members[a].append(math.sqrt(d))
    phi = [0.0] * num_clusters
    for c in range(num_clusters):
        if len(members[c]) > 1:
            phi[c] = (sum(members[c]) / len(members[c])) / math.log(len(members[c]) + 10)
    largest = max(phi[c] for c in range(num_clusters) if len(members[c]) > 1)
    for c in range(num_clusters):
        if len(members[c]) <= 1:
            phi[c] = largest
    unclipped = np.array(phi)
    lo, hi = np.percentile(unclipped, 10), np.percentile(unclipped, 90)
    clipped = np.array([min(max(p, lo), hi) for p in phi])
    return unclipped, temperature * clipped / clipped.mean()


def test_concentration_matches_loop():
    rng = np.random.default_rng(0)
    # 12 clusters: cluster 4 has exactly one point, cluster 9 none, the rest 2..40 points
    counts = [5, 12, 2, 30, 1, 7, 40, 3, 18, 0, 9, 25]
    spread = [0.3, 0.8, 0.1, 1.5, 0.5, 0.05, 2.0, 0.6, 0.9, 0.0, 0.2, 1.1]
    assignments = np.concatenate([np.full(n, c) for c, n in enumerate(counts)]).astype(np.int64)
    sq = np.concatenate([(rng.uniform(0.5, 1.5, n) * s) ** 2 for n, s in zip(counts, spread, strict=True)])
    perm = rng.permutation(len(assignments))
    assignments, sq = assignments[perm], sq[perm]
    temperature = 0.2

    got = concentration(sq, assignments, 12, temperature)
    unclipped, expected = _phi_by_loop(sq, assignments, 12, temperature)

    assert got.shape == (12,)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert got.mean() == pytest.approx(temperature, rel=1e-5)
    # clipping really happened: without it the ratios between clusters would differ
    unclipped_rescaled = temperature * unclipped / unclipped.mean()
    assert not np.allclose(got, unclipped_rescaled, rtol=1e-3)
    assert unclipped.min() < np.percentile(unclipped, 10)
    # the one-point and the empty cluster get the (clipped) largest phi
    assert got[4] == pytest.approx(got.max())
    assert got[9] == pytest.approx(got.max())
    # the smallest unclipped cluster was lifted to the 10th percentile, tied with another
    assert got[int(np.argmin(unclipped))] == pytest.approx(np.sort(got)[1])


def _blobs(n_per=100, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:3] * 10.0
    x = np.concatenate([c + rng.normal(scale=0.3, size=(n_per, dim)) for c in centers])
    y = np.repeat(np.arange(3), n_per)
    return x.astype(np.float32), y


def test_run_kmeans_recovers_blobs():
    x, y = _blobs()
    # nredo=5 as PCL's official run_kmeans: with a single start, faiss's random initialisation puts
    # two of three centroids in one blob for some seeds (e.g. seed 0) and never recovers
    protos = run_kmeans(x, [3, 6], temperature=0.2, seed=0, nredo=5)
    assert protos.num_clusters == [3, 6]
    assert len(protos.centroids) == len(protos.density) == len(protos.assignments) == 2
    for c, d, a, k in zip(protos.centroids, protos.density, protos.assignments, [3, 6], strict=True):
        assert c.shape == (k, 8) and c.dtype == np.float32
        np.testing.assert_allclose(np.linalg.norm(c, axis=1), 1.0, atol=1e-5)
        assert a.shape == (len(x),)
        assert a.min() >= 0 and a.max() < k
        assert d.shape == (k,)
        assert d.mean() == pytest.approx(0.2, rel=1e-5)
        assert (d > 0).all()
    assert adjusted_rand_score(y, protos.assignments[0]) == 1.0
    # the 6-cluster split refines the 3 blobs: every fine cluster lies inside one blob
    for cluster in np.unique(protos.assignments[1]):
        assert len(np.unique(y[protos.assignments[1] == cluster])) == 1
    assert protos.seconds > 0


def test_run_kmeans_rejects_bad_input():
    x, _ = _blobs(n_per=5)  # 15 points
    with pytest.raises(ValueError, match="K=16") as info:
        run_kmeans(x, [16])
    assert "N=15" in str(info.value)
    with pytest.raises(ValueError, match=">= 2"):
        run_kmeans(x, [1])
    with pytest.raises(ValueError):
        run_kmeans(x, [])
    bad = x.copy()
    bad[3, 2] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        run_kmeans(bad, [3])


def test_prototypes_state_dict_round_trip(tmp_path):
    x, _ = _blobs(n_per=20)
    protos = run_kmeans(x, [3, 4], seed=1)
    protos.epoch = 7
    path = tmp_path / "protos.pt"
    torch.save(protos.state_dict(), path)
    loaded = Prototypes.from_state_dict(torch.load(path, weights_only=True))
    assert loaded.epoch == 7
    assert loaded.num_clusters == [3, 4]
    for name in ("centroids", "density", "assignments"):
        for a, b in zip(getattr(protos, name), getattr(loaded, name), strict=True):
            assert a.dtype == b.dtype
            np.testing.assert_array_equal(a, b)


# --- the sharded Lloyd pieces (issue 36): sharding changes nothing but the order of the sums


def _mixture(n: int, d: int = 8, centres: int = 6, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    means = rng.normal(0, 4, (centres, d))
    return (means[rng.integers(0, centres, n)] + rng.normal(0, 1, (n, d))).astype(np.float32)


def test_lloyd_matches_faiss_from_the_same_start():
    from methods.clustering.lloyd import init_indices, lloyd

    x = _mixture(1001)
    start = x[init_indices(len(x), 6, seed=3)]
    ours, objective = lloyd([x], start, niter=10)
    clus = faiss.Clustering(x.shape[1], 6)
    clus.niter, clus.max_points_per_centroid = 10, 10**6
    faiss.copy_array_to_vector(start.ravel(), clus.centroids)
    clus.train(x, faiss.IndexFlatL2(x.shape[1]))
    theirs = faiss.vector_to_array(clus.centroids).reshape(6, -1)
    np.testing.assert_allclose(ours, theirs, atol=1e-4)
    last = clus.iteration_stats.at(clus.iteration_stats.size() - 1).obj
    assert objective == pytest.approx(last, rel=1e-4)


@pytest.mark.parametrize("shards", [2, 3])
def test_sharded_lloyd_equals_one_shard_even_with_an_empty_cluster(shards):
    from methods.clustering.lloyd import assign, lloyd

    x = _mixture(1001)  # not divisible by 2 or 3
    start = np.concatenate([x[:5], np.full((1, x.shape[1]), 1e3, np.float32)])  # one far away
    one, obj_one = lloyd([x], start, niter=8, seed=1)
    many, obj_many = lloyd(np.array_split(x, shards), start, niter=8, seed=1)
    assert np.isfinite(many).all()
    np.testing.assert_allclose(many, one, atol=1e-5)
    assert obj_many == pytest.approx(obj_one, rel=1e-9)
    np.testing.assert_array_equal(assign(x, many)[0], assign(x, one)[0])
    assert len(np.unique(assign(x, many)[0])) == 6  # the empty cluster was re-seeded and used


def test_phi_from_sharded_sums_equals_phi_from_the_gathered_points():
    from methods.clustering.lloyd import assign, shard_sums
    from methods.clustering.prototypes import concentration, concentration_from_sums

    x = _mixture(1001)
    centroids = x[:40]
    ids, sq_dist = assign(x, centroids)
    gathered = concentration(sq_dist, ids, 40, temperature=0.2)
    parts = [shard_sums(part, centroids)[0] for part in np.array_split(x, 3)]
    total = parts[0] + parts[1] + parts[2]
    sharded = concentration_from_sums(total.dist_sums, total.counts, 0.2)
    np.testing.assert_allclose(sharded, gathered, atol=1e-6)


def test_an_empty_cluster_splits_a_large_one_and_never_goes_nan():
    from methods.clustering.lloyd import ClusterSums, update_centroids

    previous = np.array([[1.0, 1.0], [5.0, 5.0], [9.0, 9.0]], np.float32)
    total = ClusterSums(np.array([[10.0, 10.0], [0.0, 0.0], [2.0, 2.0]]), np.array([10, 0, 2]),
                        np.zeros(3), 0.0)
    new = update_centroids(total, previous, seed=0)
    assert np.isfinite(new).all()
    eps = 1 / 1024
    # the empty cluster 1 is a perturbed copy of the cluster it split, which moved the other way
    donor = 0 if np.allclose(new[1], [1 + eps, 1 - eps]) else 2
    assert np.allclose(new[1], new[donor] * (1 + eps * np.array([1, -1])) /
                       (1 - eps * np.array([1, -1])), rtol=1e-6)


def test_shard_sums_in_chunks_equal_one_pass(monkeypatch):
    """A shard larger than ``SUMS_CHUNK`` is summed chunk by chunk, to the same statistics."""
    from methods.clustering import lloyd as clustering

    x = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    centroids = x[:7].copy()
    whole, ids = clustering.shard_sums(x, centroids)
    monkeypatch.setattr(clustering, "SUMS_CHUNK", 64)
    chunked, chunked_ids = clustering.shard_sums(x, centroids)
    np.testing.assert_array_equal(chunked_ids, ids)
    np.testing.assert_array_equal(chunked.counts, whole.counts)
    np.testing.assert_allclose(chunked.sums, whole.sums, rtol=1e-12)
    np.testing.assert_allclose(chunked.dist_sums, whole.dist_sums, rtol=1e-12)
    assert math.isclose(chunked.objective, whole.objective, rel_tol=1e-9)


def test_shard_sums_by_torch_matmul_equal_faiss():
    """The GPU path (a torch matmul on the worker's device), run here on the CPU, gives faiss's
    assignments and statistics."""
    from methods.clustering.lloyd import shard_sums

    x = np.random.default_rng(1).normal(size=(3000, 16)).astype(np.float32)
    centroids = x[:50].copy()
    by_faiss, ids = shard_sums(x, centroids)
    by_torch, torch_ids = shard_sums(x, centroids, device="cpu")
    np.testing.assert_array_equal(torch_ids, ids)
    np.testing.assert_array_equal(by_torch.counts, by_faiss.counts)
    np.testing.assert_allclose(by_torch.sums, by_faiss.sums, rtol=1e-12)
    np.testing.assert_allclose(by_torch.dist_sums, by_faiss.dist_sums, rtol=1e-4)
    assert math.isclose(by_torch.objective, by_faiss.objective, rel_tol=1e-4)


def test_torch_assignment_blocks_stay_within_their_byte_budget(monkeypatch):
    """At K = 100k a full block of SUMS_CHUNK rows would be 26 GB on the GPU; the rows per block
    shrink so [rows, K] float32 stays within DISTANCE_BYTES, and chunked sums are unchanged."""
    from methods.clustering import lloyd as clustering

    rows = clustering.chunk_rows(100_000, "cuda")
    assert rows * 100_000 * 4 <= clustering.DISTANCE_BYTES and rows >= 1024
    assert clustering.chunk_rows(100_000, "faiss") == clustering.SUMS_CHUNK
    x = np.random.default_rng(0).normal(size=(1000, 8)).astype(np.float32)
    centroids = x[:7].copy()
    whole, ids = clustering.shard_sums(x, centroids, "cpu")
    monkeypatch.setattr(clustering, "DISTANCE_BYTES", 7 * 4 * 50)  # blocks of 50 rows
    assert clustering.chunk_rows(7, "cpu") == 50
    chunked, chunked_ids = clustering.shard_sums(x, centroids, "cpu")
    np.testing.assert_array_equal(chunked_ids, ids)
    np.testing.assert_allclose(chunked.sums, whole.sums, rtol=1e-12)
