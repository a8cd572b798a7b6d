"""Images/s of one SimCLR training step: protoray's batch-vectorised views vs. lightly's per-image
PIL transform in a DataLoader, same network, same data, same machine, measured in one run.

What is measured
    One training step = two random views of each of ``batch_size`` Fashion-MNIST images, forward
    through the same 4-conv backbone (``build_backbone("convnet", 1, 28)``) and the same
    256-512-128 projection head (BatchNorm after the hidden layer), NT-Xent at temperature 0.5,
    backward, SGD step. "train img/s" counts images (``batch_size`` per step, i.e. twice as many
    views). "views/s" is the augmentation pipeline alone, no network: protoray's ``augment`` called
    twice on a uint8 batch, lightly's DataLoader iterated without training. Each figure is the
    median over ``--repeats`` windows of ``--steps`` steps after 3 warm-up steps; the windows run
    back to back on one iterator so a DataLoader is timed in its steady state (its start-up and
    first prefetched batches fall in the warm-up).

Why per-image PIL in a DataLoader is the baseline
    It is how SimCLR is usually trained with torchvision and lightly (``SimCLRTransform`` maps one
    PIL image to two tensors inside ``Dataset.__getitem__``), and the obvious alternative that is
    not wrong: a torchvision v2 transform applied to a whole ``[B, C, H, W]`` tensor draws one crop
    for the batch. protoray instead augments uint8 batches inside ``training_step`` with per-image
    random parameters (``methods/views.py``). The lightly path runs with each ``--lightly-workers``
    value and the faster one is its baseline, so on a 2-core machine it is not handicapped by
    worker processes fighting the training threads (or by having none).

Run: ``python benchmarks/throughput.py [--steps 20 --repeats 3 --batch-size 256 --lightly-workers 0 2]``.
The last line of the output is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from methods.backbones import build_backbone
from methods.base import Batch
from methods.data import ImageDataset, load_fashion_mnist
from methods.registry import build_method
from methods.views import ViewSpec, augment, view_spec

WARMUP = 3
PROJ_HIDDEN, PROJ_OUT = 512, 128
TEMPERATURE = 0.5


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.06, momentum=0.9, weight_decay=5e-4)


def _time_windows(step: Callable[[], None], steps: int, repeats: int) -> list[float]:
    """Seconds for each of ``repeats`` consecutive windows of ``steps`` calls, after a warm-up."""
    for _ in range(WARMUP):
        step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        times.append(time.perf_counter() - start)
    return times


def _rate(times: list[float], items_per_window: int) -> float:
    return statistics.median(items_per_window / t for t in times)


# ---------------------------------------------------------------------------------------------
# protoray: uint8 batch indexed from the in-memory tensor, views made inside training_step


def protoray_rates(dataset: ImageDataset, spec: ViewSpec, batch_size: int, steps: int, repeats: int
                   ) -> tuple[float, float, float]:
    """(views/s, train img/s, first loss)."""
    gen = torch.Generator().manual_seed(0)
    n = len(dataset)

    def next_indices() -> torch.Tensor:
        return torch.randint(n, (batch_size,), generator=gen)

    def view_step() -> None:
        images = dataset.images[next_indices()]
        augment(images, spec, gen)
        augment(images, spec, gen)

    view_times = _time_windows(view_step, steps, repeats)

    method = build_method("simclr", build_backbone("convnet", 1, 28), spec, proj_hidden_dim=PROJ_HIDDEN)
    method.train()
    opt = _sgd(method.parameters())
    losses: list[float] = []

    def train_step() -> None:
        idx = next_indices()
        batch = Batch(idx, dataset.images[idx], dataset.labels[idx])
        loss, _ = method.training_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_step_end()
        losses.append(loss.item())

    train_times = _time_windows(train_step, steps, repeats)
    return _rate(view_times, 2 * batch_size * steps), _rate(train_times, batch_size * steps), losses[0]


# ---------------------------------------------------------------------------------------------
# lightly: PIL "L" images through SimCLRTransform in DataLoader workers


class PILDataset(torch.utils.data.Dataset):
    """Fashion-MNIST uint8 rows as grayscale PIL images, through a per-image transform."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform: Callable):
        self.images = images[:, 0].numpy()  # [N, H, W] uint8
        self.labels = labels.numpy()
        self.transform = transform

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int):
        return self.transform(Image.fromarray(self.images[index])), int(self.labels[index])


def lightly_transform(spec: ViewSpec):
    """lightly's SimCLRTransform set as close to protoray's 1-channel moco_v2 spec as it allows.

    Saturation, hue and random grayscale are no-ops on one channel in protoray (it skips them), so
    they are 0 here; torchvision then leaves them out of ColorJitter.
    """
    from lightly.transforms import SimCLRTransform

    return SimCLRTransform(
        input_size=spec.size or 28,
        cj_prob=spec.jitter_p,
        cj_strength=1.0,
        cj_bright=spec.brightness,
        cj_contrast=spec.contrast,
        cj_sat=0.0,
        cj_hue=0.0,
        min_scale=spec.crop_scale[0],
        random_gray_scale=0.0,
        gaussian_blur=spec.blur_p,
        sigmas=spec.blur_sigma,
        hf_prob=spec.flip_p,
        normalize={"mean": [spec.mean], "std": [spec.std]},
    )


def _forever(loader: torch.utils.data.DataLoader) -> Iterator:
    while True:
        yield from loader


def lightly_rates(dataset: ImageDataset, spec: ViewSpec, batch_size: int, steps: int, repeats: int,
                  workers: int) -> tuple[float, float, float]:
    """(views/s, train img/s, first loss) with ``workers`` DataLoader processes."""
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    pil = PILDataset(dataset.images, dataset.labels, lightly_transform(spec))

    def make_loader() -> Iterator:
        loader = torch.utils.data.DataLoader(
            pil, batch_size=batch_size, shuffle=True, num_workers=workers, drop_last=True,
            persistent_workers=workers > 0, generator=torch.Generator().manual_seed(0),
        )
        return _forever(loader)

    views = make_loader()

    def view_step() -> None:
        (x0, x1), _ = next(views)
        assert x0.shape == (batch_size, 1, spec.size or 28, spec.size or 28), x0.shape

    view_times = _time_windows(view_step, steps, repeats)
    views.close()  # drops the loader, so its worker processes exit

    backbone = build_backbone("convnet", 1, 28)
    model = nn.Sequential(backbone, SimCLRProjectionHead(backbone.feature_dim, PROJ_HIDDEN, PROJ_OUT))
    model.train()
    criterion = NTXentLoss(temperature=TEMPERATURE)
    opt = _sgd(model.parameters())
    batches = make_loader()
    losses: list[float] = []

    def train_step() -> None:
        (x0, x1), _ = next(batches)
        z0, z1 = model(torch.cat([x0, x1])).chunk(2)
        loss = criterion(z0, z1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())

    train_times = _time_windows(train_step, steps, repeats)
    batches.close()
    return _rate(view_times, 2 * batch_size * steps), _rate(train_times, batch_size * steps), losses[0]


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per repeat")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (2 views each)")
    parser.add_argument("--lightly-workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader num_workers values to try for lightly; the fastest is its baseline")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (both pipelines)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 2:
        parser.error("--steps and --repeats must be >= 1 and --batch-size >= 2")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    dataset = load_fashion_mnist()
    spec = view_spec("moco_v2", size=28)
    b, s, r = args.batch_size, args.steps, args.repeats
    print(f"SimCLR step on Fashion-MNIST: convnet(1 ch, 28 px) + {PROJ_HIDDEN}-{PROJ_OUT} head, batch {b}, "
          f"{s} steps x {r} repeats after {WARMUP} warm-up, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")

    rows: list[tuple[str, float, float, float]] = []
    p_views, p_train, p_loss = protoray_rates(dataset, spec, b, s, r)
    rows.append(("protoray (batched views in training_step)", p_views, p_train, p_loss))
    lightly_runs = []
    for workers in args.lightly_workers:
        l_views, l_train, l_loss = lightly_rates(dataset, spec, b, s, r, workers)
        lightly_runs.append((workers, l_views, l_train))
        rows.append((f"lightly (PIL SimCLRTransform, num_workers={workers})", l_views, l_train, l_loss))

    width = max(len(name) for name, *_ in rows)
    print(f"\n{'pipeline':<{width}}  {'views/s':>10}  {'train img/s':>12}  {'first loss':>10}")
    for name, views, train, loss in rows:
        print(f"{name:<{width}}  {views:>10.0f}  {train:>12.1f}  {loss:>10.3f}")
    print("(median over repeats; views/s = augmentation only, 2 views per image; "
          "train img/s = images per second of the full step)")

    best_workers, _, l_train = max(lightly_runs, key=lambda run: run[2])
    view_workers, l_views, _ = max(lightly_runs, key=lambda run: run[1])
    ratio = p_train / l_train
    print(f"\nlightly baseline: num_workers={best_workers} for training, {view_workers} for views-only "
          "(its faster setting for each)")
    print(f"training step ratio protoray/lightly: {ratio:.2f}x")
    print(f"views-only ratio protoray/lightly:    {p_views / l_views:.2f}x")
    headline = {
        "ratio_vs_lightly": round(ratio, 3),
        "protoray_img_per_s": round(p_train, 1),
        "lightly_img_per_s": round(l_train, 1),
        "protoray_views_per_s": round(p_views, 1),
        "lightly_views_per_s": round(l_views, 1),
        "lightly_workers": best_workers,
        "lightly_view_workers": view_workers,
        "batch_size": b,
        "threads": torch.get_num_threads(),
    }
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
