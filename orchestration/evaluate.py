"""Final evaluation of a checkpoint: kNN, linear probe, AMI/NMI/ARI on the test split, beside
the same numbers for raw pixels, plus the plots a reviewer looks at in MLflow."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from methods.evaluation.linear import sgd_linear_probe
from methods.evaluation.plots import embedding_plot, tsne_layout
from methods.evaluation.report import FAST_PROBE, evaluate
from methods.training import encode
from orchestration.builders import Splits, load_splits, make_method
from orchestration.checkpoints import load_state
from orchestration.config import ExperimentConfig


def pixels(images: torch.Tensor) -> np.ndarray:
    return images.reshape(len(images), -1).float().div(255).numpy()


def prototype_grid(images: torch.Tensor, features: np.ndarray, centroids: np.ndarray, path: Path,
                   num_prototypes: int = 8, per_row: int = 8, seed: int = 0) -> Path:
    """Rows of the training images nearest to a random sample of prototypes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rng = np.random.default_rng(seed)
    chosen = rng.choice(len(centroids), min(num_prototypes, len(centroids)), replace=False)
    nearest = np.argsort(-(features @ centroids[chosen].T), axis=0)[:per_row].T  # [P, per_row]
    fig, axes = plt.subplots(len(chosen), per_row, figsize=(per_row, len(chosen)))
    for r, row in enumerate(np.atleast_2d(nearest)):
        for c, idx in enumerate(row):
            ax = np.atleast_2d(axes)[r, c]
            img = images[idx].permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.axis("off")
        np.atleast_2d(axes)[r, 0].set_title(f"prototype {chosen[r]}", fontsize=6, loc="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def evaluate_checkpoint(checkpoint_file: Path, out_dir: Path, cfg: ExperimentConfig | None = None,
                        with_pixels: bool = True, sgd_epochs: int = 0
                        ) -> tuple[dict[str, float], list[Path]]:
    """Metrics (``test_knn``, ``test_linear``, ``test_ami``..., ``pixels_*``) and artifact paths.

    ``sgd_epochs`` > 0 adds ``test_linear_sgd``: the MoCo / PCL papers' linear protocol, a linear
    layer trained by SGD on augmented crops of the frozen encoder for that many epochs
    (``methods.evaluation.sgd_linear_probe``)."""
    state = load_state(checkpoint_file)
    cfg = cfg or ExperimentConfig.model_validate(state["config"])
    splits: Splits = load_splits(cfg, with_test=True)
    test = splits.test or splits.holdout  # datasets without a test split use the hold-out slice
    method = make_method(cfg, splits.train.in_channels, splits.train.image_size)
    method.load_state_dict(state["model"])
    start = time.perf_counter()
    # the images' own side even where data.view_size trained on smaller views (FixRes); the
    # prototype figures below stay in the space the E-step clustered, at the views' side
    train_x = encode(method.embed, splits.train.images, method, native_size=True)
    test_x = encode(method.embed, test.images, method, native_size=True)
    y_train, y_test = splits.train.labels.numpy(), test.labels.numpy()
    # the fixed-C probe (FAST_PROBE): choosing C on held-out data costs several fits
    scores = evaluate(train_x, y_train, test_x, y_test, cfg.seed, probe=FAST_PROBE)
    metrics = {f"test_{k}": v for k, v in scores.items()}
    if sgd_epochs:
        method.eval()
        metrics["test_linear_sgd"] = sgd_linear_probe(
            method.embed, method.views, splits.train.images, splits.train.labels, test.images,
            test.labels, epochs=sgd_epochs, seed=cfg.seed)
    if with_pixels:
        raw = evaluate(pixels(splits.train.images), y_train, pixels(test.images), y_test, cfg.seed,
                       probe=FAST_PROBE)
        metrics.update({f"pixels_{k}": v for k, v in raw.items()})
    metrics["eval_s"] = time.perf_counter() - start

    layout = tsne_layout(test_x, seed=cfg.seed)  # one t-SNE, coloured by label and by prototype
    artifacts = [embedding_plot(test_x, y_test, out_dir / "embedding_by_label.png",
                                f"{cfg.method.name}: test embedding by label", test.classes,
                                layout=layout)]
    protos = state.get("prototypes")
    if protos:
        cluster_x = encode(method.cluster_embed, splits.train.images, method)
        centroids = protos["centroids"][0].numpy()
        artifacts.append(prototype_grid(splits.train.images, cluster_x, centroids,
                                        out_dir / "prototype_neighbours.png", seed=cfg.seed))
        test_clusters = np.argmax(encode(method.cluster_embed, test.images, method) @ centroids.T, 1)
        artifacts.append(embedding_plot(test_x, test_clusters, out_dir / "embedding_by_cluster.png",
                                        f"{cfg.method.name}: test embedding by prototype "
                                        f"(K={len(centroids)})", layout=layout))
    return metrics, artifacts
