"""Train the methods of one or more experiment configs and evaluate each beside raw pixels: kNN
(k=200, InstDisc weighting), linear probe (C chosen on a validation slice), and AMI/NMI/ARI of
k-means (K = number of classes) on the test split, all at the images' own size. Methods with
several exits (SelfCon: ``exit_embeds``) add the linear probe of each exit and of their ensemble.

Configs are the only recipe source: each positional argument is a YAML file read by the loader
``protoray train`` uses, with the same ``--set section.field=value`` overrides (applied to every
config), and the method is built by ``orchestration.builders.make_method``, the Ray workers' own
builder. One table row per config, named after the file's stem (``--names`` renames them).

Single process: the script runs the config as one worker would with the whole batch
(``methods.training.fit``), so ``scaling`` is ignored, and hyperparameters that act on each
worker's share of the batch (``method.bn_splits``, SwAV's ``method.queue_length``) see all
``optim.batch_size`` images here. The configs whose file name ends in ``_1worker`` (and the
best-recipe PCL configs) set ``scaling.num_workers: 1``, so ``protoray train`` runs them the same
way. Training uses the training split minus the ``data.knn_holdout`` slice, as ``protoray train``
does; evaluation uses the test split.

    python benchmarks/fashion_mnist.py configs/pcl_fashion_mnist.yaml configs/simclr_fashion_mnist.yaml
    python benchmarks/fashion_mnist.py configs/pcl_fashion_mnist_wide1024.yaml --set seed=1
    python benchmarks/fashion_mnist.py configs/supervised_fashion_mnist.yaml \\
        --set optim.epochs=20 optim.precision=bf16 model.backbone=convnet_wide
    python benchmarks/fashion_mnist.py configs/moco_fashion_mnist_1worker.yaml \\
        configs/swav_fashion_mnist_1worker.yaml --set optim.epochs=3 --device cuda

``--set`` takes one or more overrides (and may be repeated); a value that is not a hyperparameter
of some config's method stops the run before anything trains. Each row prints as it finishes;
the last line is JSON with the headline figures (``<row>_knn``, ``<row>_linear``, ``<row>_ami``,
``<row>_epoch_s``, ``raw_pixels_*``, ``epochs``).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from methods.evaluation.linear import linear_probe_exits, sgd_linear_probe
from methods.evaluation.report import evaluate
from methods.training import encode, fit
from orchestration.builders import Splits, load_splits, make_method
from orchestration.config import ConfigError, ExperimentConfig, load_config

DEFAULT_CONFIGS = ("configs/pcl_fashion_mnist.yaml", "configs/moco_fashion_mnist.yaml",
                   "configs/simclr_fashion_mnist.yaml")
COLUMNS = ("knn", "linear", "ami", "nmi", "ari")


def pixels(images: torch.Tensor) -> np.ndarray:
    return images.reshape(len(images), -1).float().div(255).numpy()


def describe(cfg: ExperimentConfig) -> str:
    """One line of what a row trains: the method's given hyperparameters and the recipe's rest."""
    d, o, c = cfg.data, cfg.optim, cfg.clustering
    method = ", ".join(f"{k}={v}" for k, v in cfg.method.hparams.items())
    regularizer = f" + {cfg.method.regularizer}" if cfg.method.regularizer else ""
    views = f"views {d.views}" + (f" crops >= {d.crop_min_scale}" if d.crop_min_scale else "")
    views += f" at {d.view_size} px" if d.view_size else " at the images' size"
    clusters = (f", k-means {c.num_clusters} nredo {c.nredo}" if cfg.method.schedule() is not None
                else "")
    return (f"{cfg.method.name}{regularizer} ({method or 'defaults'}); {cfg.model.backbone}, "
            f"{o.epochs} epochs, batch {o.batch_size}, lr {o.lr} (warm-up {o.warmup_epochs}), "
            f"momentum {o.momentum}, weight decay {o.weight_decay}, {o.precision}, {views}"
            f"{clusters}, seed {cfg.seed}")


def run_row(row: str, cfg: ExperimentConfig, splits: Splits, device: str,
            save: Path | None = None, sgd_epochs: int = 0) -> dict[str, float]:
    """Train the config's method on ``splits.train`` in this process; scores on ``splits.test``."""
    train, test = splits.train, splits.test
    method = make_method(cfg, train.in_channels, train.image_size)
    method.check_batch_size(cfg.optim.batch_size)
    o = cfg.optim
    optim = o.training()
    start = time.perf_counter()
    history = fit(method, train, o.epochs, o.batch_size, optim, cfg.clustering.num_clusters,
                  seed=cfg.seed, nredo=cfg.clustering.nredo, niter=cfg.clustering.niter,
                  device=device,
                  on_epoch_end=lambda e, m: print(f"  {row} epoch {e}: loss {m['loss']:.3f} "
                                                  f"({m['epoch_s']:.0f}s)", flush=True))
    train_s = time.perf_counter() - start
    if save:
        save.mkdir(parents=True, exist_ok=True)
        # protoray's checkpoint layout, so `protoray eval <file>` evaluates it as a trained run
        torch.save({"model": method.state_dict(), "optimizer": None, "scheduler": None,
                    "epoch": o.epochs - 1, "prototypes": None,
                    "config": cfg.model_dump(mode="json")}, save / f"{row}.pt")

    def features(fn, images):  # at the images' own size, also after training on smaller views
        return encode(fn, images, method, device=device, native_size=True)

    y_train, y_test = train.labels.numpy(), test.labels.numpy()
    scores = evaluate(features(method.embed, train.images), y_train,
                      features(method.embed, test.images), y_test, cfg.seed)
    if hasattr(method, "exit_embeds"):  # several exits: a linear probe on each and the ensemble
        exits = {e: (features(lambda x, e=e: method.exit_embeds(x)[e], train.images),
                     features(lambda x, e=e: method.exit_embeds(x)[e], test.images))
                 for e in ("backbone", "sub")}
        per_exit = linear_probe_exits({e: v[0] for e, v in exits.items()}, y_train,
                                      {e: v[1] for e, v in exits.items()}, y_test, seed=cfg.seed)
        scores.update({f"linear_{e}": v for e, v in per_exit.items() if e != "backbone"})
    if sgd_epochs:  # the MoCo / PCL papers' protocol: SGD on augmented crops, frozen encoder
        method.eval()
        scores["linear_sgd"] = sgd_linear_probe(method.embed, method.views, train.images,
                                                train.labels, test.images, test.labels,
                                                epochs=sgd_epochs, seed=cfg.seed, device=device)
    return {**scores, "epochs": o.epochs, "train_min": train_s / 60,
            "epoch_s": float(np.median([h["epoch_s"] for h in history]))}


def row_names(paths: list[str], names: list[str] | None) -> list[str]:
    """The file stems, or ``names``; a repeated stem gets ``_2``, ``_3``... so rows stay apart."""
    if names is not None:
        return names
    out: list[str] = []
    for path in paths:
        stem, n = Path(path).stem, 2
        name = stem
        while name in out:
            name, n = f"{stem}_{n}", n + 1
        out.append(name)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[3:]))
    p.add_argument("configs", nargs="*", default=list(DEFAULT_CONFIGS), metavar="CONFIG",
                   help="experiment YAML files, one table row each (default: "
                        f"{' '.join(DEFAULT_CONFIGS)})")
    p.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override a value of every config, as protoray train's "
                   "--set, e.g. --set optim.epochs=1 method.temperature=0.1")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="row names, one per config (default: the config files' stems)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--sgd-epochs", type=int, default=0, metavar="N",
                   help="also score each row with the SGD linear protocol for N epochs (column "
                        "linear_sgd; the MoCo/PCL papers train 100)")
    p.add_argument("--save", type=Path, default=None, metavar="DIR",
                   help="write each row's trained method to DIR/<row>.pt (readable by protoray eval)")
    args = p.parse_args(argv)
    if args.names is not None and len(args.names) != len(args.configs):
        p.error(f"--names: {len(args.names)} names for {len(args.configs)} configs")
    names = row_names(args.configs, args.names)
    if len(set(names)) != len(names):
        p.error(f"--names: row names must differ (got {' '.join(names)})")

    configs: dict[str, tuple[str, ExperimentConfig]] = {}
    for name, path in zip(names, args.configs, strict=True):  # every config checked before any row trains
        try:
            cfg = load_config(path, args.overrides)
        except ConfigError as exc:
            p.error(f"{path}: {exc}")
        for notice in cfg.notices():
            print(f"{path}: note: {notice}", file=sys.stderr)
        configs[name] = (path, cfg)

    print(f"{len(configs)} config(s), single process, {torch.get_num_threads()} threads, "
          f"{args.device}, overrides {' '.join(args.overrides) or 'none'}", flush=True)
    rows: dict[str, dict[str, float]] = {}
    data: dict[str, tuple[Splits, str]] = {}  # the splits (and raw-pixel row) of each data section
    for name, (path, cfg) in configs.items():
        key = json.dumps([cfg.seed, cfg.data.model_dump(mode="json")], sort_keys=True)
        if key not in data:
            splits = load_splits(cfg, with_test=True)
            if splits.test is None:
                p.error(f"{path}: data.name {cfg.data.name} has no test split to evaluate on")
            raw = "raw pixels" if not data else f"raw pixels {name}"
            print(f"{cfg.data.name}: {len(splits.train)} train ({len(splits.holdout)} held out) / "
                  f"{len(splits.test)} test images", flush=True)
            rows[raw] = evaluate(pixels(splits.train.images), splits.train.labels.numpy(),
                                 pixels(splits.test.images), splits.test.labels.numpy(), cfg.seed)
            data[key] = (splits, raw)
        print(f"{name}: {path}\n  {describe(cfg)}", flush=True)
        rows[name] = run_row(name, cfg, data[key][0], args.device, args.save,
                             args.sgd_epochs)
        r = rows[name]  # each row as it finishes, so an interrupted run keeps what it measured
        print(f"  {name} done: kNN {r['knn']:.4f} linear {r['linear']:.4f} AMI {r['ami']:.4f} "
              f"({r['epoch_s']:.0f} s/epoch)", flush=True)

    width = max(12, *(len(n) + 2 for n in rows))
    print(f"\n{'row':{width}}{'epochs':>7}{'s/epoch':>9}{'train min':>10}"
          + "".join(f"{c:>8}" for c in COLUMNS))
    for name, r in rows.items():
        timing = (f"{r['epochs']:7d}{r['epoch_s']:9.0f}{r['train_min']:10.1f}" if "epochs" in r
                  else f"{'-':>7}{'-':>9}{'-':>10}")
        print(f"{name:{width}}{timing}" + "".join(f"{r[c]:8.4f}" for c in COLUMNS))
    headline = {f"{name.replace(' ', '_')}_{c}": round(r[c], 4) for name, r in rows.items()
                for c in ("knn", "linear", "ami")}
    headline.update({f"{n}_epoch_s": round(r["epoch_s"], 1) for n, r in rows.items() if "epoch_s" in r})
    for name, r in rows.items():
        for key in sorted(k for k in r if k.startswith("linear_")):
            print(f"{name}: {key.replace('_', ' ')} {r[key]:.4f} (backbone probe {r['linear']:.4f})")
            headline[f"{name}_{key}"] = round(r[key], 4)
    epochs = {n: r["epochs"] for n, r in rows.items() if "epochs" in r}
    headline["epochs"] = epochs.popitem()[1] if len(set(epochs.values())) == 1 else epochs
    print(json.dumps(headline))
    return 0


if __name__ == "__main__":
    sys.exit(main())
