"""The final scores of one embedding: kNN, linear probe and clustering scores on the test split."""

from __future__ import annotations

import numpy as np

from methods.evaluation.cluster_scores import cluster_scores
from methods.evaluation.knn import knn_accuracy
from methods.evaluation.linear import linear_probe_accuracy

# One fixed C instead of choosing it on held-out data (choosing fits the probe several times, too
# slow for `make demo`). 0.1 is what that choice picked for PCL's features (RESULTS.md); the solver
# converges on the encoder's features and on raw pixels within max_iter.
FAST_PROBE = {"cs": (0.1,), "max_iter": 1000}


def evaluate(train: np.ndarray, train_labels: np.ndarray, test: np.ndarray,
             test_labels: np.ndarray, seed: int = 0, probe: dict | None = None
             ) -> dict[str, float]:
    """kNN and linear accuracy on the test split, clustering scores on the test split, from
    the labelled rows only (label ``-1`` is never a class); NaN where too few are labelled (a
    probe needs two classes on the training side). ``probe``: keyword arguments of
    ``linear_probe_accuracy`` (e.g. ``FAST_PROBE``)."""
    nan = float("nan")
    train_keep, test_keep = np.asarray(train_labels) >= 0, np.asarray(test_labels) >= 0
    train, train_labels = np.asarray(train)[train_keep], np.asarray(train_labels)[train_keep]
    test, test_labels = np.asarray(test)[test_keep], np.asarray(test_labels)[test_keep]
    if len(test) == 0 or len(train) == 0:
        return {"knn": nan, "linear": nan, "ami": nan, "nmi": nan, "ari": nan}
    linear = (linear_probe_accuracy(train, train_labels, test, test_labels, seed=seed,
                                    **(probe or {}))
              if len(np.unique(train_labels)) >= 2 else nan)
    return {"knn": knn_accuracy(train, train_labels, test, test_labels), "linear": linear,
            **cluster_scores(test, test_labels, seed=seed)}
