"""Final evaluation of a checkpoint: kNN, linear probe, AMI/NMI/ARI on the test split, beside
the same numbers for raw pixels, plus the plots a reviewer looks at in MLflow."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from methods.evaluation.label_free import LABEL_FREE_SAMPLE, encoder_scores
from methods.evaluation.linear import sgd_linear_probe
from methods.evaluation.plots import embedding_plot, tsne_layout
from methods.evaluation.report import FAST_PROBE, evaluate
from methods.training import encode
from orchestration.builders import Splits, labelled_splits, load_splits, make_method
from orchestration.checkpoints import load_state
from orchestration.config import ExperimentConfig

NO_LABELS = ("no labelled set was given: the final scores are label-free only (rankme, alignment, "
             "uniformity); add an eval_data: section (a labelled folder, parquet or built-in set) "
             "for kNN, linear and AMI/NMI/ARI")


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
    per_row = min(per_row, len(images))  # a few training images: fewer columns
    nearest = np.argsort(-(features @ centroids[chosen].T), axis=0)[:per_row].T  # [P, per_row]
    fig, axes = plt.subplots(len(chosen), per_row, figsize=(per_row, len(chosen)), squeeze=False)
    for r, row in enumerate(nearest):
        for c, idx in enumerate(row):
            ax = axes[r, c]
            img = images[idx].permute(1, 2, 0).squeeze(-1).numpy()
            ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
            ax.axis("off")
        axes[r, 0].set_title(f"prototype {chosen[r]}", fontsize=6, loc="left")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return path


def evaluate_checkpoint(checkpoint_file: Path, out_dir: Path, cfg: ExperimentConfig | None = None,
                        with_pixels: bool = True, sgd_epochs: int = 0
                        ) -> tuple[dict[str, float], list[Path]]:
    """Metrics and artifact paths of a checkpoint.

    Always the label-free scores of the training source's test split (its hold-out slice where
    it has none): ``test_rankme``, ``test_alignment``, ``test_uniformity``. With labelled images
    (``eval_data``, else the training source's own): ``test_knn``, ``test_linear``,
    ``test_ami``..., ``pixels_*`` for raw pixels; without, ``metrics`` has no ``test_knn`` and
    ``NO_LABELS`` says why. ``sgd_epochs`` > 0 adds ``test_linear_sgd``: the MoCo / PCL papers'
    linear protocol, a linear layer trained by SGD on augmented crops of the frozen encoder
    (``methods.evaluation.sgd_linear_probe``)."""
    state = load_state(checkpoint_file)
    cfg = cfg or ExperimentConfig.model_validate(state["config"])
    splits: Splits = load_splits(cfg, with_test=True)
    own_test = splits.test or splits.holdout  # datasets without a test split use the hold-out
    channels, side = splits.train.in_channels, splits.train.image_size
    method = make_method(cfg, channels, side)
    method.load_state_dict(state["model"])
    start = time.perf_counter()
    sample = own_test.subset(torch.arange(min(LABEL_FREE_SAMPLE, len(own_test))))
    metrics = ({f"test_{k}": v for k, v in encoder_scores(method, sample.images, cfg.seed).items()}
               if len(sample) >= 2 else {})
    labelled = labelled_splits(cfg, channels, side, with_test=True, own=splits)
    artifacts: list[Path] = []
    if labelled is not None:
        train, test = labelled.train, labelled.test or labelled.holdout
        # the images' own side even where data.view_size trained on smaller views (FixRes); the
        # prototype figures below stay in the space the E-step clustered, at the views' side
        train_x = encode(method.embed, train.images, method, native_size=True)
        test_x = encode(method.embed, test.images, method, native_size=True)
        y_train, y_test = train.labels.numpy(), test.labels.numpy()
        # the fixed-C probe (FAST_PROBE): choosing C on held-out data costs several fits
        scores = evaluate(train_x, y_train, test_x, y_test, cfg.seed, probe=FAST_PROBE)
        metrics.update({f"test_{k}": v for k, v in scores.items()})
        if sgd_epochs:
            method.eval()
            metrics["test_linear_sgd"] = sgd_linear_probe(
                method.embed, method.views, train.images, train.labels, test.images,
                test.labels, epochs=sgd_epochs, seed=cfg.seed)
        if with_pixels:
            raw = evaluate(pixels(train.images), y_train, pixels(test.images), y_test, cfg.seed,
                           probe=FAST_PROBE)
            metrics.update({f"pixels_{k}": v for k, v in raw.items()})
    else:  # plots of the unlabelled test images, coloured by prototype where there are any
        test, y_test = own_test, own_test.labels.numpy()
        test_x = encode(method.embed, test.images, method, native_size=True)
    metrics["eval_s"] = time.perf_counter() - start

    layout = tsne_layout(test_x, seed=cfg.seed)  # one t-SNE, coloured by label and by prototype
    if labelled is not None:
        artifacts.append(embedding_plot(test_x, y_test, out_dir / "embedding_by_label.png",
                                        f"{cfg.method.name}: test embedding by label",
                                        test.classes, layout=layout))
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
