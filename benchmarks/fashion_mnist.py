"""Contrastive methods (PCL, MoCo v2, SimCLR, SupCon, SelfCon-S/M, ICL-MSR) on Fashion-MNIST
for a fixed epoch budget on this machine, evaluated beside raw pixels: kNN (k=200, InstDisc
weighting), linear probe, and AMI/NMI/ARI of k-means (K=10) on the test split. SupCon and SelfCon
use the labels (their papers' setting); SelfCon rows add the linear probe of the sub-network exit
and of the two exits' ensemble. The ``supervised`` row trains the same backbone with cross-entropy
on the labels: the line an unsupervised row's kNN and AMI can be read against.

Runs the plain single-process ``methods.training.fit`` (the path the Ray workers reuse), all
methods with the same backbone, views, batch and schedule, so rows differ only by the method.

    python benchmarks/fashion_mnist.py --epochs 10                # PCL, MoCo, SimCLR, 10 epochs each
    python benchmarks/fashion_mnist.py --methods pcl --epochs 30
    python benchmarks/fashion_mnist.py --methods simclr icl_msr supcon selfcon_s selfcon_m --epochs 4
    python benchmarks/fashion_mnist.py --methods supervised --epochs 20 --precision bf16
    python benchmarks/fashion_mnist.py --methods pcl --device cuda --backbone resnet18 --precision bf16
    python benchmarks/fashion_mnist.py --methods pcl --weight-decay 1e-4 --set queue_size=4096

The last line is JSON with the headline figures.
"""

from __future__ import annotations

import argparse
import ast
import json
import time

import numpy as np
import torch

from methods.backbones import BACKBONES, build_backbone
from methods.data import FASHION_MNIST_ROOT, load_fashion_mnist
from methods.evaluation import evaluate, linear_probe_exits
from methods.registry import build_method, hyperparameters
from methods.training import OptimConfig, encode, fit
from methods.views import view_spec

# Shared settings, chosen for a 2-core CPU; each method keeps its paper temperature family.
# Row name -> (registered method, hyperparameters).
# MoCo/PCL normalise 32-image BatchNorm slices of the 256 batch, keys shuffled (shuffling BN).
_QUEUE = {"momentum": 0.99, "queue_size": 16384, "proj_hidden_dim": 512, "bn_splits": 8}
_SUPCON = {"temperature": 0.1, "base_temperature": 0.07, "proj_hidden_dim": 512}
ROWS: dict[str, tuple[str, dict]] = {
    "simclr": ("simclr", {"temperature": 0.2, "proj_hidden_dim": 512}),
    "moco": ("moco", {"temperature": 0.2, **_QUEUE}),
    "pcl": ("pcl", {"temperature": 0.2, **_QUEUE, "num_negative_prototypes": 1000}),
    "supcon": ("supcon", _SUPCON),
    "selfcon_s": ("selfcon", {**_SUPCON, "multi_view": False}),
    "selfcon_m": ("selfcon", {**_SUPCON, "multi_view": True}),
    "icl_msr": ("simclr", {"temperature": 0.2, "proj_hidden_dim": 512, "regularizer": "icl_msr"}),
    "icl_msr_fo": ("simclr", {"temperature": 0.2, "proj_hidden_dim": 512, "regularizer": "icl_msr",
                              "second_order": False}),
    "moco_v1": ("moco", {"temperature": 0.07, "momentum": 0.999, "queue_size": 16384,
                         "proj_layers": 1}),
    "moco_v3": ("moco_v3", {"temperature": 0.2, "momentum": 0.99, "proj_hidden_dim": 1024,
                            "proj_dim": 256, "pred_hidden_dim": 1024}),
    "byol": ("byol", {"momentum": 0.99, "proj_hidden_dim": 1024, "proj_dim": 256,
                      "pred_hidden_dim": 1024}),
    "simsiam": ("simsiam", {"proj_hidden_dim": 1024, "proj_dim": 1024, "pred_hidden_dim": 256}),
    "swav": ("swav", {"temperature": 0.1, "num_prototypes": 100, "proj_hidden_dim": 512,
                      "num_local_crops": 2, "queue_length": 3840}),
    "dino": ("dino", {"out_dim": 4096, "hidden_dim": 1024, "bottleneck_dim": 256,
                      "num_local_crops": 2}),
    "instdisc": ("instdisc", {"temperature": 0.1, "num_negatives": 4096, "lr": 0.01}),
    "cmc_bank": ("cmc", {"temperature": 0.2, "memory_bank": True, "num_negatives": 4096}),
    "cpc": ("cpc", {"prediction_steps": 3, "temperature": 0.1}),
    "cmc": ("cmc", {"temperature": 0.2}),
    "supervised": ("supervised", {}),  # cross-entropy with the labels: the reference line
}


def run_method(row: str, train, test, epochs: int, batch_size: int, lr: float,
               num_clusters: list[int], seed: int, crop_min_scale: float | None = None,
               precision: str = "fp32", backbone: str = "convnet", nredo: int = 5,
               device: str = "cpu", bn_splits: int | None = None,
               temperature: float | None = None, view_size: int = 28,
               save: str | None = None, weight_decay: float = OptimConfig.weight_decay,
               extra: dict | None = None, warmup_epochs: int = 0,
               blur_p: float | None = None) -> dict[str, float]:
    torch.manual_seed(seed)
    name, hparams = ROWS[row][0], dict(ROWS[row][1])
    # command-line overrides, for the rows whose method has the setting (for PCL the temperature
    # is also the mean concentration phi of eq. 12)
    known = hyperparameters(name)
    hparams.update({key: value for key, value in {"bn_splits": bn_splits,
                                                  "temperature": temperature}.items()
                    if value is not None and key in known})
    hparams.update(extra or {})  # checked against ``known`` in ``main``, before any row trains
    lr = hparams.pop("lr", lr)  # a row's own learning rate where the shared one diverges
    if name == "pcl":
        hparams["warmup_epochs"] = max(1, epochs // 10)  # the paper's 20 of 200
    overrides = {} if crop_min_scale is None else {"crop_scale": (crop_min_scale, 1.0)}
    if blur_p is not None:
        overrides["blur_p"] = blur_p
    views = view_spec("small", size=view_size, **overrides)
    method = build_method(name, build_backbone(backbone, 1, 28), views,
                          seed=seed, **hparams)
    start = time.perf_counter()
    history = fit(method, train, epochs, batch_size, OptimConfig(lr=lr, weight_decay=weight_decay,
                                                               precision=precision,
                                                               warmup_epochs=warmup_epochs), num_clusters,
                  kmeans_temperature=hparams.get("temperature", 0.2), seed=seed, nredo=nredo,
                  device=device, on_epoch_end=lambda e, m: print(f"  {row} epoch {e}: loss {m['loss']:.3f} "
                                                  f"({m['epoch_s']:.0f}s)", flush=True))
    train_s = time.perf_counter() - start
    if save:
        torch.save(method.state_dict(), save)

    def features(fn, images):  # at the images' own 28 px, also after training on smaller views
        return encode(fn, images, method, device=device, native_size=True)

    scores = evaluate(features(method.embed, train.images), train.labels.numpy(),
                      features(method.embed, test.images), test.labels.numpy(), seed)
    if hasattr(method, "exit_embeds"):  # SelfCon: linear probe on each exit and the ensemble
        exits = {e: (features(lambda x, e=e: method.exit_embeds(x)[e], train.images),
                     features(lambda x, e=e: method.exit_embeds(x)[e], test.images))
                 for e in ("backbone", "sub")}
        per_exit = linear_probe_exits({e: v[0] for e, v in exits.items()}, train.labels.numpy(),
                                      {e: v[1] for e, v in exits.items()}, test.labels.numpy(), seed=seed)
        scores.update({f"linear_{e}": v for e, v in per_exit.items()})
    return {**scores, "epochs": epochs, "train_min": train_s / 60,
            "epoch_s": float(np.median([h["epoch_s"] for h in history]))}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--methods", nargs="+", default=["pcl", "moco", "simclr"], choices=list(ROWS))
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.06)
    p.add_argument("--num-clusters", type=int, nargs="+", default=[50, 100, 200])
    p.add_argument("--crop-min-scale", type=float, default=None,
                   help="smallest crop area of the 'small' views (default theirs, 0.3)")
    p.add_argument("--blur-p", type=float, default=None,
                   help="probability of the Gaussian blur (3 px kernel at 20..28 px, sigma "
                        "0.1..2) in the 'small' views (default theirs, 0)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default="fp32",
                   help="bf16: forward under bfloat16 autocast")
    p.add_argument("--backbone", default="convnet", choices=list(BACKBONES),
                   help="resnet18/resnet50 are for GPUs (about 50 min an epoch on 2 cores)")
    p.add_argument("--nredo", type=int, default=5, help="k-means restarts per granularity (E-step)")
    p.add_argument("--bn-splits", type=int, default=None,
                   help="MoCo/PCL: BatchNorm slices per batch, the keys' shuffled (default the row's)")
    p.add_argument("--temperature", type=float, default=None,
                   help="the loss temperature of every row that has one (default the row's)")
    p.add_argument("--view-size", type=int, default=28,
                   help="side the views and the E-step resize the 28 px images to (evaluation stays at "
                        "28 px); 20 trades resolution for about 1.4x the epochs per hour")
    p.add_argument("--save", default=None, help="write the last method's state_dict here")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--data-root", default=FASHION_MNIST_ROOT)
    p.add_argument("--limit", type=int, default=None, help="train on the first N images only")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-decay", type=float, default=OptimConfig.weight_decay)
    p.add_argument("--warmup-epochs", type=int, default=0,
                   help="epochs of linear learning-rate warm-up before the cosine decay (for large lr)")
    p.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE",
                   help="override a row's hyperparameter, e.g. --set queue_size=4096 momentum=0.996")
    args = p.parse_args()
    extra = {}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            p.error(f"--set {item!r}: expected KEY=VALUE")
        try:
            extra[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            extra[key] = value  # a bare word, e.g. regularizer=icl_msr
    for name in args.methods:
        unknown = set(extra) - set(hyperparameters(ROWS[name][0]))
        if unknown:
            p.error(f"--set {sorted(unknown)}: not hyperparameters of the {name!r} row; it takes "
                    f"{sorted(hyperparameters(ROWS[name][0]))}")

    train, test = load_fashion_mnist(args.data_root, "train"), load_fashion_mnist(args.data_root, "test")
    if args.limit:
        train = train.subset(torch.arange(args.limit))
    print(f"Fashion-MNIST: {len(train)} train / {len(test)} test, {torch.get_num_threads()} threads, "
          f"batch {args.batch_size}, {args.epochs} epochs per method, {args.precision}, {args.backbone}, "
          f"{args.device}, k-means nredo {args.nredo}, bn splits {args.bn_splits or 'row default'}, "
          f"temperature {args.temperature or 'row default'}, views {args.view_size} px, "
          f"weight decay {args.weight_decay}, lr {args.lr} (warm-up {args.warmup_epochs} epochs), "
          f"blur p {args.blur_p if args.blur_p is not None else 'preset'}, overrides {extra or 'none'}")

    rows: dict[str, dict[str, float]] = {}
    flat = lambda x: x.images.reshape(len(x), -1).float().div(255).numpy()  # noqa: E731
    rows["raw pixels"] = evaluate(flat(train), train.labels.numpy(), flat(test), test.labels.numpy(),
                                  args.seed)
    for name in args.methods:
        rows[name] = run_method(name, train, test, args.epochs, args.batch_size, args.lr,
                                args.num_clusters, args.seed, args.crop_min_scale,
                                args.precision, args.backbone, args.nredo, args.device,
                                args.bn_splits, args.temperature, args.view_size, args.save,
                                args.weight_decay, extra, args.warmup_epochs, args.blur_p)
        r = rows[name]  # each row as it finishes, so an interrupted run keeps what it measured
        print(f"  {name} done: kNN {r['knn']:.4f} linear {r['linear']:.4f} AMI {r['ami']:.4f} "
              f"({r['epoch_s']:.0f} s/epoch)", flush=True)

    cols = ("knn", "linear", "ami", "nmi", "ari")
    print(f"\n{'method':12}{'epochs':>7}{'s/epoch':>9}{'train min':>10}" + "".join(f"{c:>8}" for c in cols))
    for name, r in rows.items():
        timing = (f"{r['epochs']:7d}{r['epoch_s']:9.0f}{r['train_min']:10.1f}" if "epochs" in r
                  else f"{'-':>7}{'-':>9}{'-':>10}")
        print(f"{name:12}{timing}" + "".join(f"{r[c]:8.4f}" for c in cols))
    headline = {f"{name.replace(' ', '_')}_{c}": round(r[c], 4) for name, r in rows.items()
                for c in ("knn", "linear", "ami")}
    headline.update({f"{n}_epoch_s": round(r["epoch_s"], 1) for n, r in rows.items() if "epoch_s" in r})
    for name, r in rows.items():
        for key in ("linear_sub", "linear_ensemble"):
            if key in r:
                print(f"{name}: {key.replace('_', ' ')} {r[key]:.4f} (backbone exit {r['linear']:.4f})")
                headline[f"{name}_{key}"] = round(r[key], 4)
    headline["epochs"] = args.epochs
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
