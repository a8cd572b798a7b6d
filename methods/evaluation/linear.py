"""Linear evaluation of a frozen embedding: logistic regression on its features, or SGD on the
encoder's output as the MoCo/PCL papers do."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

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

    from methods.data.views import augment, to_input

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
