"""Images/s of one SimCLR training step: protoray's batch-vectorised views vs. lightly's per-image
PIL transform in a DataLoader, same network, same data, same machine, measured in one run.

What is measured
    One training step = two random views of each of ``batch_size`` Fashion-MNIST images, forward
    through the same 4-conv backbone (``build_backbone("convnet", 1, 28)``) and the same
    256-512-128 projection head (BatchNorm after the hidden layer), NT-Xent at temperature 0.5,
    backward, SGD step. "train img/s" counts images (``batch_size`` per step, i.e. twice as many
    views). "views/s" is the augmentation pipeline alone, no network: protoray's ``augment`` called
    twice on a uint8 batch, lightly's DataLoader iterated without training. Each figure is the
    median over ``--repeats`` timed windows of ``--steps`` steps (more if those take under a
    second, which only protoray's views-only steps do).

    The machine may be shared, so the windows are interleaved: every repeat times one window of
    each pipeline in turn (rotating the order), so a burst of outside load lands on all of them
    rather than on whichever ran last. Every window follows untimed warm-up steps; for a
    DataLoader with workers there are more of them than batches its workers can prefetch while
    idle, so a window starts from the loader's steady state and is not handed free batches.

Why per-image PIL in a DataLoader is the baseline
    It is how SimCLR is usually trained with torchvision and lightly (``SimCLRTransform`` maps one
    PIL image to two tensors inside ``Dataset.__getitem__``), and the obvious alternative that is
    not wrong: a torchvision v2 transform applied to a whole ``[B, C, H, W]`` tensor draws one crop
    for the batch. protoray instead augments uint8 batches inside ``training_step`` with per-image
    random parameters (``methods/data/views.py``). The lightly path runs with each ``--lightly-workers``
    value and its faster one is its baseline (separately for training and for views-only), so on a
    2-core machine it is not handicapped by worker processes fighting the training threads, or by
    having none.

Run: ``python benchmarks/throughput.py [--steps 20 --repeats 3 --batch-size 256 --lightly-workers 0 2]``.
The last line of the output is one JSON object with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
from PIL import Image

from methods.base import Batch
from methods.data.datasets import ImageDataset, load_fashion_mnist
from methods.data.views import ViewSpec, augment, view_spec
from methods.encoders.backbones import build_backbone
from methods.registry import build_method
from methods.training import autocast_for

WARMUP = 3
MIN_WINDOW_S = 1.0
PROJ_HIDDEN, PROJ_OUT = 512, 128
TEMPERATURE = 0.5


def _sgd(params) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.06, momentum=0.9, weight_decay=5e-4)


@dataclass
class Pipeline:
    """A name, a views-only step and a training step (each one batch), and the seconds per window."""

    name: str
    view_step: Callable[[], None]
    train_step: Callable[[], float]
    warmup: int = WARMUP
    close: Callable[[], None] = lambda: None
    steps_per_s: dict[str, list[float]] = field(default_factory=lambda: {"views": [], "train": []})
    first_loss: float = float("nan")


def time_window(pipe: Pipeline, kind: str, steps: int) -> None:
    """Warm up, then time ``steps`` steps, or more until ``MIN_WINDOW_S`` has passed (a window of
    protoray's views-only steps is otherwise a few tens of ms, at the mercy of the scheduler)."""
    step = pipe.view_step if kind == "views" else pipe.train_step
    for _ in range(pipe.warmup):
        out = step()
        if kind == "train" and math.isnan(pipe.first_loss):
            pipe.first_loss = out
    done, start = 0, time.perf_counter()
    while done < steps or time.perf_counter() - start < MIN_WINDOW_S:
        step()
        done += 1
    pipe.steps_per_s[kind].append(done / (time.perf_counter() - start))


# ---------------------------------------------------------------------------------------------
# protoray: uint8 batch indexed from the in-memory tensor, views made inside training_step


def protoray_pipeline(dataset: ImageDataset, spec: ViewSpec, batch_size: int,
                      precision: str = "fp32") -> Pipeline:
    gen = torch.Generator().manual_seed(0)
    n = len(dataset)

    def next_indices() -> torch.Tensor:
        return torch.randint(n, (batch_size,), generator=gen)

    def view_step() -> None:
        images = dataset.images[next_indices()]
        augment(images, spec, gen)
        augment(images, spec, gen)

    method = build_method("simclr", build_backbone("convnet", 1, 28), spec, proj_hidden_dim=PROJ_HIDDEN)
    method.train()
    opt = _sgd(method.parameters())

    def train_step() -> float:
        idx = next_indices()
        batch = Batch(idx, dataset.images[idx], dataset.labels[idx])
        with autocast_for("cpu", precision):  # as methods.training.train_epoch does
            loss, _ = method.training_step(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        method.on_step_end()
        return loss.item()

    return Pipeline(f"protoray {precision} (batched views in training_step)", view_step, train_step)


# ---------------------------------------------------------------------------------------------
# lightly: PIL "L" images through SimCLRTransform in a DataLoader


class PILDataset(torch.utils.data.Dataset):
    """Fashion-MNIST uint8 rows as grayscale (mode "L") PIL images, through a per-image transform."""

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

    protoray skips saturation, hue and random grayscale on one channel, so they are 0 here and
    torchvision leaves them out of ColorJitter; normalisation is protoray's one-channel mean/std.
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


def lightly_pipeline(dataset: ImageDataset, spec: ViewSpec, batch_size: int, workers: int,
                     precision: str = "fp32") -> Pipeline:
    from lightly.loss import NTXentLoss
    from lightly.models.modules import SimCLRProjectionHead

    loader = torch.utils.data.DataLoader(
        PILDataset(dataset.images, dataset.labels, lightly_transform(spec)), batch_size=batch_size,
        shuffle=True, num_workers=workers, drop_last=True, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0),
    )
    # Idle workers fill the prefetch queue; warm-up drains it so the window starts steady.
    prefetched = workers * (loader.prefetch_factor or 0)
    batches = _forever(loader)
    size = spec.size or 28

    def view_step() -> None:
        (x0, x1), _ = next(batches)
        if x0.shape != (batch_size, 1, size, size):
            raise RuntimeError(f"lightly views have shape {tuple(x0.shape)}")

    backbone = build_backbone("convnet", 1, 28)
    model = nn.Sequential(backbone, SimCLRProjectionHead(backbone.feature_dim, PROJ_HIDDEN, PROJ_OUT))
    model.train()
    criterion = NTXentLoss(temperature=TEMPERATURE)
    opt = _sgd(model.parameters())

    def train_step() -> float:
        (x0, x1), _ = next(batches)
        with autocast_for("cpu", precision):
            z0, z1 = model(torch.cat([x0, x1])).chunk(2)
            loss = criterion(z0, z1)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss.item()

    return Pipeline(f"lightly {precision} (PIL SimCLRTransform, num_workers={workers})", view_step,
                    train_step,
                    warmup=max(WARMUP, prefetched + 1), close=batches.close)


# ---------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20, help="timed steps per window")
    parser.add_argument("--repeats", type=int, default=3, help="timed windows; the median is reported")
    parser.add_argument("--batch-size", type=int, default=256, help="images per step (2 views each)")
    parser.add_argument("--lightly-workers", type=int, nargs="+", default=[0, 2],
                        help="DataLoader num_workers values to try for lightly; the fastest is its baseline")
    parser.add_argument("--precisions", nargs="+", choices=["fp32", "bf16"], default=["fp32", "bf16"],
                        help="forward precisions to time; bf16 = bfloat16 autocast, for both tools")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (both pipelines)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.repeats < 1 or args.batch_size < 2 or min(args.lightly_workers) < 0:
        parser.error("--steps, --repeats >= 1, --batch-size >= 2, --lightly-workers >= 0")

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    np.random.seed(0)
    dataset = load_fashion_mnist()
    spec = view_spec("moco_v2", size=28)
    b, s, r = args.batch_size, args.steps, args.repeats
    print(f"SimCLR step on Fashion-MNIST: convnet(1 ch, 28 px) + {PROJ_HIDDEN}-{PROJ_OUT} head, batch {b}, "
          f"{s} steps x {r} interleaved repeats, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.2f} at start")

    # (tool, precision, loader workers) -> pipeline; views-only is timed at fp32 only (no network)
    keys = [("protoray", "fp32", 0), ("protoray", "bf16", 0)]
    keys += [("lightly", prec, w) for prec in args.precisions for w in args.lightly_workers]
    keys = [k for k in keys if k[1] in args.precisions]
    pipes = {k: (protoray_pipeline(dataset, spec, b, k[1]) if k[0] == "protoray"
                 else lightly_pipeline(dataset, spec, b, k[2], k[1])) for k in keys}
    try:
        for rep in range(r):
            order = keys[rep % len(keys):] + keys[:rep % len(keys)]
            for kind in ("views", "train"):
                for key in order:
                    if kind == "views" and key[1] != "fp32":
                        continue
                    time_window(pipes[key], kind, s)
    finally:
        for pipe in pipes.values():
            pipe.close()  # drops a loader, so its worker processes exit

    def median(key, kind: str) -> float:
        rates = pipes[key].steps_per_s[kind]
        return (2 * b if kind == "views" else b) * statistics.median(rates) if rates else float("nan")

    width = max(len(p.name) for p in pipes.values())
    print(f"\n{'pipeline':<{width}}  {'views/s':>10}  {'train img/s':>12}  {'train min..max':>15}  "
          f"{'first loss':>10}")
    for key, pipe in pipes.items():
        spread = sorted(b * rate for rate in pipe.steps_per_s["train"])
        print(f"{pipe.name:<{width}}  {median(key, 'views'):>10.0f}  {median(key, 'train'):>12.1f}  "
              f"{spread[0]:>7.0f}..{spread[-1]:<6.0f}  {pipe.first_loss:>10.3f}")
    print("(medians over repeats; views/s = augmentation only, 2 views per image, timed at fp32; "
          "train img/s = images per second of the whole step)")
    print(f"load average {os.getloadavg()[0]:.2f} at end")

    def best_lightly(precision: str, kind: str) -> tuple[int, float]:
        """lightly's faster loader setting at this precision: (workers, rate)."""
        return max(((w, median(("lightly", precision, w), kind)) for w in args.lightly_workers),
                   key=lambda item: item[1])

    view_workers, l_views = best_lightly("fp32", "views")
    p_views = median(("protoray", "fp32", 0), "views")
    headline: dict[str, float] = {}
    print(f"\nviews-only ratio protoray/lightly: {p_views / l_views:.2f}x "
          f"(lightly num_workers={view_workers})")
    for ours, theirs in (("fp32", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")):
        if ours not in args.precisions or theirs not in args.precisions:
            continue
        workers, l_train = best_lightly(theirs, "train")
        p_train = median(("protoray", ours, 0), "train")
        ratio = p_train / l_train
        print(f"training step ratio protoray {ours} / lightly {theirs} (num_workers={workers}): "
              f"{ratio:.2f}x")
        suffix = "" if ours == theirs == "fp32" else f"_{ours}_vs_{theirs}"
        headline[f"ratio_vs_lightly{suffix}"] = round(ratio, 3)
        headline[f"protoray_{ours}_img_per_s"] = round(p_train, 1)
        headline[f"lightly_{theirs}_img_per_s"] = round(l_train, 1)
    headline.update({
        "protoray_views_per_s": round(p_views, 1),
        "lightly_views_per_s": round(l_views, 1),
        "views_ratio_vs_lightly": round(p_views / l_views, 3),
        "batch_size": b,
        "threads": torch.get_num_threads(),
    })
    print(json.dumps(headline))
    return headline


if __name__ == "__main__":
    main()
