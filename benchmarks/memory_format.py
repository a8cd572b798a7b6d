"""Channels-last against NCHW for the CPU convnets: one PCL training step and the E-step's encoding.

What is measured
    The benchmark's PCL row on Fashion-MNIST (MoCo v2 + ProtoNCE, 8 BatchNorm slices, queue
    16384, granularities [50, 100, 200], crops >= 0.5), one step = forward of both views, loss,
    backward, SGD step, momentum update. The encoding is one eval-mode pass over the 60,000
    training images, as each epoch's E-step does before k-means. Both layouts start from the same
    weights: the NCHW model is the shipped one converted with
    ``.to(memory_format=torch.contiguous_format)``; its 1-channel input is NCHW and NHWC at once,
    so the weights' layout decides every activation's.

    Windows are interleaved (each repeat times one window of each layout in turn) so a burst of
    load on the shared machine lands on both; the figures are medians over ``--repeats``.

Why: oneDNN's NCHW max-pool on this CPU ran 7-10x slower than its NHWC one, the largest single
cost in a profile of the step (``methods/encoders/backbones.py``).

Run: ``python benchmarks/memory_format.py [--backbones convnet convnet_wide convnet_1024
--precision bf16 --steps 20 --repeats 3]``. The last line is one JSON object of the headline
figures.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from methods.clustering.kmeans import run_kmeans
from methods.data.datasets import FASHION_MNIST_ROOT, load_fashion_mnist
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone
from methods.registry import build_method
from methods.training import (
    OptimConfig,
    encode,
    epoch_batches,
    make_optimizer,
    memory_batches,
    train_epoch,
)
from orchestration.config import load_config

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}
# the method table's PCL recipe, with prototypes from the first step
RECIPE = Path(__file__).resolve().parents[1] / "configs" / "pcl_fashion_mnist_1worker.yaml"
PCL = {**load_config(RECIPE).method.hparams, "warmup_epochs": 0}


def measure(backbone: str, train, precision: str, steps: int, repeats: int) -> dict[str, dict]:
    """Median step ms and encoding s for each layout of ``backbone``, from the same weights."""
    views = view_spec("small", size=28, crop_scale=(0.5, 1.0))
    torch.manual_seed(0)
    shipped = build_method("pcl", build_backbone(backbone, 1, 28), views, seed=0, **PCL)
    state = shipped.state_dict()
    batches = epoch_batches(len(train), 256, 0, 0)
    runs = {}
    for name, layout in LAYOUTS.items():
        method = build_method("pcl", build_backbone(backbone, 1, 28), views, seed=0, **PCL)
        method.load_state_dict(state)
        method.to(memory_format=layout)
        method.bind_data(len(train))
        optimizer, scheduler = make_optimizer(method, OptimConfig(lr=0.03, precision=precision),
                                              len(batches), 1)
        runs[name] = {"method": method, "optimizer": optimizer, "scheduler": scheduler,
                      "step_s": [], "encode_s": []}
    features = encode(shipped.cluster_embed, train.images, shipped, precision=precision)
    prototypes = run_kmeans(features, [50, 100, 200], 0.2, 0, nredo=1).on_device("cpu")

    def window(run: dict, first: int) -> None:
        train_epoch(run["method"], memory_batches(train, batches[first : first + steps]), steps,
                    run["optimizer"],
                    run["scheduler"], 0, prototypes, precision=precision)

    for run in runs.values():  # warm-up: oneDNN picks and caches its kernels
        window(run, 0)
    for r in range(repeats):
        order = list(runs.values())[r % 2 :] + list(runs.values())[: r % 2]
        for run in order:
            start = time.perf_counter()
            window(run, (1 + r) * steps)
            run["step_s"].append((time.perf_counter() - start) / steps)
            start = time.perf_counter()
            encode(run["method"].cluster_embed, train.images, run["method"], precision=precision)
            run["encode_s"].append(time.perf_counter() - start)
    return {name: {"step_ms": 1000 * statistics.median(run["step_s"]),
                   "encode_s": statistics.median(run["encode_s"])} for name, run in runs.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--backbones", nargs="+", default=["convnet", "convnet_wide", "convnet_1024"])
    p.add_argument("--precision", choices=["fp32", "bf16"], default="bf16")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--data-root", default=FASHION_MNIST_ROOT)
    args = p.parse_args()
    train = load_fashion_mnist(args.data_root, "train")
    print(f"PCL step at batch 256 and E-step encoding of {len(train)} images, {args.precision}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats} windows of {args.steps} steps")
    print(f"{'backbone':14}{'layout':>15}{'step ms':>10}{'encode s':>10}{'step speed-up':>15}")
    headline = {"precision": args.precision}
    for backbone in args.backbones:
        res = measure(backbone, train, args.precision, args.steps, args.repeats)
        base = res["nchw"]
        for name, r in res.items():
            print(f"{backbone:14}{name:>15}{r['step_ms']:10.1f}{r['encode_s']:10.2f}"
                  f"{base['step_ms'] / r['step_ms']:14.2f}x")
        headline[f"{backbone}_step_speedup"] = round(base["step_ms"] / res["channels_last"]["step_ms"], 2)
        headline[f"{backbone}_encode_speedup"] = round(base["encode_s"] / res["channels_last"]["encode_s"], 2)
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
