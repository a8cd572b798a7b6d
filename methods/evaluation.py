"""How good a representation is, without training the encoder further.

Three views of one embedding: weighted kNN (no training at all), a linear probe (the standard
protocol), and how well k-means with K = number of classes recovers the labels (AMI/NMI/ARI),
which is what prototype methods like PCL claim to improve.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def knn_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                 test_labels: np.ndarray, k: int = 200, temperature: float = 0.1,
                 chunk: int = 1024) -> float:
    """Weighted kNN on cosine similarity (Wu et al. 2018, InstDisc, sec. 3.4): the top-k
    neighbours vote for their class with weight exp(s_i / temperature)."""
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


# Inverse L2 strengths the linear probe chooses from on a held-out tenth of the training split:
# the regularisation is selected on validation data, as in the logistic-regression protocol of
# Kornblith et al. 2019 ("Do Better ImageNet Models Transfer Better?") that SimCLR's linear
# evaluation follows, on a coarse grid to keep the probe to minutes on 2 cores. C=10 was never
# chosen on Fashion-MNIST (PCL features or raw pixels) and is the slowest fit, so it is not here.
PROBE_C = (0.01, 0.1, 1.0)


def _probe(c: float, max_iter: int, seed: int):
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    return make_pipeline(StandardScaler(), LogisticRegression(C=c, max_iter=max_iter,
                                                              random_state=seed))


def select_probe_c(train: np.ndarray, train_labels: np.ndarray, cs: tuple[float, ...] = PROBE_C,
                   max_iter: int = 1000, seed: int = 0, val_fraction: float = 0.1
                   ) -> tuple[float, dict[float, float]]:
    """The C of ``cs`` with the best accuracy on a held-out ``val_fraction`` of the training split
    (stratified), and every C's validation accuracy. Why: one fixed C under- or over-regularises
    depending on the feature width and the training-set size, and the test split must not choose
    it. Ties go to the smaller C, the stronger prior. A split too small to hold out an image of
    every class and keep one (tiny test data) gets scikit-learn's default C=1 and no scores."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split
    from sklearn.preprocessing import StandardScaler

    counts = np.bincount(np.asarray(train_labels))
    counts = counts[counts > 0]
    if counts.min() < 2 or int(np.ceil(val_fraction * len(train_labels))) < len(counts):
        return 1.0, {}
    fit_x, val_x, fit_y, val_y = train_test_split(train, train_labels, test_size=val_fraction,
                                                  random_state=seed, stratify=train_labels)
    scaler = StandardScaler().fit(fit_x)
    fit_x, val_x = scaler.transform(fit_x), scaler.transform(val_x)
    # weakest prior last, each fit starting from the previous solution: much faster than cold fits
    # (benchmarks/RESULTS.md, PCL evaluation-side checks, probe time)
    clf = LogisticRegression(max_iter=max_iter, random_state=seed, warm_start=True)
    scores = {c: float(clf.set_params(C=c).fit(fit_x, fit_y).score(val_x, val_y))
              for c in sorted(cs)}
    return max(scores, key=lambda c: (scores[c], -c)), scores


def linear_probe_accuracy(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
                          test_labels: np.ndarray, max_iter: int = 1000, seed: int = 0,
                          cs: tuple[float, ...] = PROBE_C) -> float:
    """Multinomial logistic regression on frozen, standardised features (scikit-learn), its C
    chosen on validation (``select_probe_c``), then refit on the whole training split."""
    return float(_fit_probe(train, train_labels, cs, max_iter, seed).score(test, test_labels))


def _fit_probe(train: np.ndarray, train_labels: np.ndarray, cs: tuple[float, ...], max_iter: int,
               seed: int):
    c = select_probe_c(train, train_labels, cs, max_iter, seed)[0] if len(cs) > 1 else cs[0]
    return _probe(c, max_iter, seed).fit(train, train_labels)


def linear_probe_exits(train: dict[str, np.ndarray], train_labels: np.ndarray,
                       test: dict[str, np.ndarray], test_labels: np.ndarray, max_iter: int = 1000,
                       seed: int = 0, cs: tuple[float, ...] = PROBE_C) -> dict[str, float]:
    """Linear accuracy of each exit of a multi-exit encoder (SelfCon) and of their ensemble, the
    mean of the exits' classifier logits (as the SelfCon authors evaluate)."""
    out, logits = {}, []
    for name in train:
        clf = _fit_probe(train[name], train_labels, cs, max_iter, seed)
        out[name] = float(clf.score(test[name], test_labels))
        logits.append(clf.decision_function(test[name]))
    classes = clf.classes_
    out["ensemble"] = float((classes[np.mean(logits, axis=0).argmax(1)] == test_labels).mean())
    return out


def cluster_scores(features: np.ndarray, labels: np.ndarray, num_clusters: int | None = None,
                   seed: int = 0, repeats: int = 5) -> dict[str, float]:
    """AMI, NMI and ARI of faiss k-means (K = number of classes) on L2-normalised features, each
    the median over ``repeats`` k-means seeds (``seed``, ``seed + 1``, ...).

    Why a median: on fixed PCL features of the Fashion-MNIST test images, single k-means seeds
    moved the AMI by several points, and keeping the lowest objective of 10 restarts did not
    settle it, a spread as large as the differences between training settings
    (benchmarks/RESULTS.md, PCL evaluation-side checks).
    """
    from sklearn.metrics import (
        adjusted_mutual_info_score,
        adjusted_rand_score,
        normalized_mutual_info_score,
    )

    from methods.clustering import run_kmeans

    if repeats < 1:
        raise ValueError(f"repeats must be >= 1, got {repeats}")
    x = F.normalize(torch.as_tensor(features, dtype=torch.float32), dim=1).numpy()
    k = num_clusters or int(np.max(labels)) + 1
    runs = []
    for i in range(repeats):
        pred = run_kmeans(x, [k], seed=seed + i, nredo=3).assignments[0]
        runs.append((adjusted_mutual_info_score(labels, pred),
                     normalized_mutual_info_score(labels, pred), adjusted_rand_score(labels, pred)))
    ami, nmi, ari = np.median(np.asarray(runs), axis=0)
    return {"ami": float(ami), "nmi": float(nmi), "ari": float(ari)}


# One fixed C instead of choosing it on held-out data (choosing fits the probe several times, too
# slow for `make demo`). 0.1 is what that choice picked for PCL's features (RESULTS.md); the solver
# converges on the encoder's features and on raw pixels within max_iter.
FAST_PROBE = {"cs": (0.1,), "max_iter": 1000}


def evaluate(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
             test_labels: np.ndarray, seed: int = 0, probe: dict | None = None
             ) -> dict[str, float]:
    """kNN and linear accuracy on the test split, clustering scores on the test split.
    ``probe``: keyword arguments of ``linear_probe_accuracy`` (e.g. ``FAST_PROBE``)."""
    return {"knn": knn_accuracy(train, train_labels, test, test_labels),
            "linear": linear_probe_accuracy(train, train_labels, test, test_labels, seed=seed,
                                            **(probe or {})),
            **cluster_scores(test, test_labels, seed=seed)}


def tsne_layout(features: np.ndarray, max_points: int = 2000, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(rows ``[n]``, 2-D t-SNE coordinates ``[n, 2]``) of a seeded sample of ``features``
    (L2-normalised first); compute once and colour it several ways with ``embedding_plot``."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(features), min(max_points, len(features)), replace=False)
    xy = TSNE(init="pca", random_state=seed, perplexity=30).fit_transform(
        F.normalize(torch.as_tensor(features[rows], dtype=torch.float32), dim=1).numpy())
    return rows, xy


def embedding_plot(features: np.ndarray, colors: np.ndarray, path: str | Path, title: str = "",
                   class_names: tuple[str, ...] = (), max_points: int = 2000, seed: int = 0,
                   layout: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """A 2-D t-SNE of (a sample of) the embedding, coloured by ``colors`` (labels or clusters);
    ``layout``: a ``tsne_layout`` of the same features, to skip computing it again."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, xy = layout if layout is not None else tsne_layout(features, max_points, seed)
    fig, ax = plt.subplots(figsize=(6, 6))
    points = ax.scatter(xy[:, 0], xy[:, 1], c=colors[rows], s=4, cmap="tab10" if
                        colors.max() < 10 else "nipy_spectral")
    if class_names and colors.max() < len(class_names):
        handles = points.legend_elements()[0]
        ax.legend(handles, [class_names[int(c)] for c in np.unique(colors[rows])],
                  fontsize=7, loc="best", markerscale=0.8)
    ax.set_title(title)
    ax.set_xticks([])
    ax.set_yticks([])
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def sgd_linear_probe(embed, views, train_images: torch.Tensor, train_labels: torch.Tensor,
                     test_images: torch.Tensor, test_labels: torch.Tensor, epochs: int = 10,
                     lr: float = 0.1, batch_size: int = 256, seed: int = 0,
                     device: str | torch.device = "cpu") -> float:
    """Linear evaluation as the MoCo and PCL papers run it: a linear classifier trained by SGD
    (momentum 0.9, no weight decay, cosine learning rate) on the frozen encoder's features of
    randomly cropped and flipped training images, tested on the un-augmented test images;
    returns test accuracy.

    ``embed`` maps a normalised float batch ``[B, C, S, S]`` to features ``[B, D]`` (the frozen
    encoder, in eval mode); ``views`` gives the crop scale and side (its colour and blur
    augmentations are not used, as in the references). A BatchNorm without affine parameters
    normalises the features before the linear layer (He et al. 2022, MAE, linear probing), so
    one learning rate fits every encoder. The references train 100 epochs (MoCo: lr 30, decay at
    60 and 80); ``epochs`` scales that to the machine. Labels ``[N]`` int64.
    """
    from dataclasses import replace

    from methods.views import augment, to_input

    crops = replace(views, jitter_p=0.0, grayscale_p=0.0, blur_p=0.0)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    with torch.no_grad():
        dim = embed(to_input(train_images[:2].to(device), views)).shape[1]
    classifier = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, num_classes))
    classifier.to(device)
    optimizer = torch.optim.SGD(classifier.parameters(), lr=lr, momentum=0.9, weight_decay=0.0)
    steps = epochs * (len(train_images) // batch_size)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, max(1, steps))
    for _ in range(epochs):
        order = torch.randperm(len(train_images), generator=generator)
        for start in range(0, len(order) - batch_size + 1, batch_size):
            idx = order[start : start + batch_size]
            with torch.no_grad():
                features = embed(augment(train_images[idx].to(device), crops, generator))
            loss = F.cross_entropy(classifier(features.float()), train_labels[idx].to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
    classifier.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(test_images), 1024):
            x = to_input(test_images[start : start + 1024].to(device), views)
            pred = classifier(embed(x).float()).argmax(1).cpu()
            correct += int((pred == test_labels[start : start + 1024]).sum())
    return correct / len(test_images)
