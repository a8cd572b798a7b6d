"""Pictures of an embedding: a t-SNE layout and its scatter plot."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


def tsne_layout(features: np.ndarray, max_points: int = 2000, seed: int = 0
                ) -> tuple[np.ndarray, np.ndarray]:
    """(rows ``[n]``, 2-D t-SNE coordinates ``[n, 2]``) of a seeded sample of ``features``
    (L2-normalised first); compute once and colour it several ways with ``embedding_plot``."""
    from sklearn.manifold import TSNE

    rng = np.random.default_rng(seed)
    rows = rng.choice(len(features), min(max_points, len(features)), replace=False)
    if len(rows) < 4:  # t-SNE needs perplexity < n; a few points are drawn on a line
        return rows, np.stack([np.arange(len(rows)), np.zeros(len(rows))], 1).astype(np.float32)
    # 30 is the usual perplexity; a few dozen evaluation images need less than n
    perplexity = min(30.0, (len(rows) - 1) / 3)
    xy = TSNE(init="pca", random_state=seed, perplexity=perplexity).fit_transform(
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
                        colors.max(initial=0) < 10 else "nipy_spectral")
    if class_names and colors.min(initial=0) >= 0 and colors.max(initial=0) < len(class_names):
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
