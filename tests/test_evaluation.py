"""Representation probes on features whose answer is known."""

from __future__ import annotations

import numpy as np
import pytest

from methods.evaluation.cluster_scores import cluster_scores
from methods.evaluation.knn import knn_accuracy
from methods.evaluation.linear import linear_probe_accuracy, linear_probe_exits, select_probe_c
from methods.evaluation.plots import embedding_plot
from methods.evaluation.report import evaluate


def _blobs(n_per: int, num_classes: int = 4, dim: int = 16, seed: int = 0, spread: float = 0.2):
    rng = np.random.default_rng(seed)
    centers = np.eye(dim)[:num_classes] * 5.0
    x = np.concatenate([c + rng.normal(scale=spread, size=(n_per, dim)) for c in centers])
    y = np.repeat(np.arange(num_classes), n_per)
    perm = rng.permutation(len(x))
    return x[perm].astype(np.float32), y[perm]


def test_knn_separable_is_perfect():
    train, train_y = _blobs(50, seed=0)
    test, test_y = _blobs(20, seed=1)
    assert knn_accuracy(train, train_y, test, test_y, k=20) == 1.0
    # k larger than the bank is clipped, not an error; 200 neighbours of 4 equal classes still vote right
    assert knn_accuracy(train, train_y, test, test_y) == 1.0


def test_knn_random_labels_is_chance():
    rng = np.random.default_rng(0)
    train, test = rng.normal(size=(1000, 16)), rng.normal(size=(1000, 16))
    train_y, test_y = rng.integers(0, 10, 1000), rng.integers(0, 10, 1000)
    acc = knn_accuracy(train, train_y, test, test_y, k=50)
    assert 0.05 < acc < 0.16


def test_knn_prefers_nearer_neighbours():
    # one query near class 1's single point and far from class 0's three points: weighted voting
    # with a small temperature lets the close neighbour win
    train = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.1, 1.0]])
    labels = np.array([1, 0, 0, 0])
    test = np.array([[1.0, 0.05]])
    assert knn_accuracy(train, labels, test, np.array([1]), k=4, temperature=0.05) == 1.0
    assert knn_accuracy(train, labels, test, np.array([1]), k=4, temperature=100.0) == 0.0


def test_linear_probe_separable():
    train, train_y = _blobs(40, seed=0)
    test, test_y = _blobs(20, seed=1)
    assert linear_probe_accuracy(train, train_y, test, test_y) == 1.0
    rng = np.random.default_rng(0)
    noise = rng.normal(size=(400, 16))
    acc = linear_probe_accuracy(noise[:200], rng.integers(0, 4, 200), noise[200:], rng.integers(0, 4, 200))
    assert acc < 0.45


def test_probe_regularisation_is_chosen_on_validation():
    """One informative feature among 300 noise features and 600 training images: the probe
    overfits at C=1, the held-out tenth picks the strongest prior, and the test split (never
    seen by the choice) agrees."""
    rng = np.random.default_rng(0)

    def data(n):
        y = rng.integers(0, 2, n)
        x = rng.normal(size=(n, 300))
        x[:, 0] += 2 * y - 1
        return x.astype(np.float32), y

    train, train_y = data(600)
    test, test_y = data(2000)
    chosen, scores = select_probe_c(train, train_y)
    assert chosen == 0.01 and scores[0.01] > scores[1.0]
    selected = linear_probe_accuracy(train, train_y, test, test_y)
    assert selected > linear_probe_accuracy(train, train_y, test, test_y, cs=(1.0,)) + 0.02
    # a class of one image, or a tenth smaller than the classes: the default C, no scores
    assert select_probe_c(train[:5], np.array([0, 0, 1, 1, 2])) == (1.0, {})
    assert select_probe_c(train[:40], np.arange(40) % 5) == (1.0, {})
    assert select_probe_c(train[:50], np.arange(50) % 5)[1]  # 5 held out: one of each class


def test_linear_probe_exits_and_their_ensemble():
    """Two noisy exits that see the same classes with independent noise: averaging their logits
    beats each alone."""
    rng = np.random.default_rng(3)
    y_train, y_test = rng.integers(0, 4, 600), rng.integers(0, 4, 600)
    centers = np.eye(8)[:4] * 1.0

    def exit_features(y):
        return (centers[y] + rng.normal(scale=0.9, size=(len(y), 8))).astype(np.float32)

    train = {"backbone": exit_features(y_train), "sub": exit_features(y_train)}
    test = {"backbone": exit_features(y_test), "sub": exit_features(y_test)}
    out = linear_probe_exits(train, y_train, test, y_test)
    assert set(out) == {"backbone", "sub", "ensemble"}
    assert out["backbone"] == linear_probe_accuracy(train["backbone"], y_train, test["backbone"], y_test)
    assert out["ensemble"] > max(out["backbone"], out["sub"])


def test_cluster_scores_separable():
    x, y = _blobs(60, seed=2)
    scores = cluster_scores(x, y)
    assert set(scores) == {"ami", "nmi", "ari"}
    assert scores["ami"] == pytest.approx(1.0, abs=1e-6)
    assert scores["ari"] == pytest.approx(1.0, abs=1e-6)
    shuffled = cluster_scores(x, np.random.default_rng(0).permutation(y))
    assert shuffled["ami"] < 0.05


def test_cluster_scores_are_the_median_over_kmeans_seeds():
    """Unstructured points, so each k-means seed lands in its own partition and a single run's
    AMI would differ from the median."""
    from sklearn.metrics import adjusted_mutual_info_score

    from methods.clustering.kmeans import run_kmeans

    rng = np.random.default_rng(3)
    x = rng.normal(size=(120, 4)).astype(np.float32)
    y = rng.integers(0, 6, size=120)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    single = [adjusted_mutual_info_score(y, run_kmeans(unit, [6], seed=s, nredo=3).assignments[0])
              for s in range(7, 12)]
    assert len(set(np.round(single, 6))) > 1  # the seeds disagree, so the check below can fail
    assert cluster_scores(x, y, seed=7)["ami"] == pytest.approx(float(np.median(single)))
    with pytest.raises(ValueError, match="repeats"):
        cluster_scores(x, y, repeats=0)


def test_evaluate_keys():
    train, train_y = _blobs(30, seed=0)
    test, test_y = _blobs(15, seed=1)
    out = evaluate(train, train_y, test, test_y)
    assert set(out) == {"knn", "linear", "ami", "nmi", "ari"}
    assert out["knn"] == 1.0 and out["linear"] == 1.0 and out["ami"] > 0.99


def test_embedding_plot_writes_png(tmp_path):
    x, y = _blobs(100, seed=3)  # 400 points, 200 plotted
    path = embedding_plot(x, y, tmp_path / "sub" / "tsne.png", title="blobs",
                          class_names=("a", "b", "c", "d"), max_points=200)
    assert path == tmp_path / "sub" / "tsne.png"
    data = path.read_bytes()
    assert len(data) > 1000
    assert data[:8] == b"\x89PNG\r\n\x1a\n"


def test_sgd_linear_probe_trains_on_augmented_crops_of_a_frozen_encoder():
    """The MoCo / PCL linear protocol on digits with raw pixels as the 'encoder': it learns the
    classes, draws a new random crop of every image each epoch, and never changes the encoder."""
    import torch
    import torch.nn as nn

    from methods.data.datasets import load_digits
    from methods.data.views import view_spec
    from methods.evaluation.linear import sgd_linear_probe

    tr, te = load_digits("train"), load_digits("test")
    seen = []

    def embed(x):
        seen.append(x[:1].clone())
        return x.flatten(1)

    accuracy = sgd_linear_probe(embed, view_spec("digits"), tr.images, tr.labels, te.images,
                                te.labels, epochs=4, lr=0.1, batch_size=64)
    assert accuracy > 0.85
    crops = [x for x in seen if x.shape[-1] == 8]
    assert not torch.equal(crops[1], crops[1 + len(tr) // 64])  # epoch 2 cropped its first image anew

    frozen = nn.Linear(64, 16)
    before = frozen.weight.detach().clone()
    sgd_linear_probe(lambda x: frozen(x.flatten(1)), view_spec("digits"), tr.images[:128],
                     tr.labels[:128], te.images[:64], te.labels[:64], epochs=1, batch_size=64)
    assert torch.equal(frozen.weight, before)
