"""``protoray``: the command line, and the entrypoint for ``ray job submit``.

    protoray train [CONFIG] [--set section.field=value ...] [--address ADDR] [--tracking-uri URI]
    protoray train --resume RUN_ID [--tracking-uri URI] [--address ADDR]
    protoray eval CHECKPOINT
    protoray export CHECKPOINT_OR_RUN --to DIR [--tracking-uri URI]
    protoray sweep CONFIG --space SPACE.yaml [--num-samples N] [--scheduler asha|pbt|none] [--metric M]
                   [--search random|grid|optuna]
    protoray sweep --resume SWEEP_DIR

Exit codes: 0 done, 2 bad configuration or input, 1 training failed or stopped.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

from orchestration.config import ConfigError, load_config


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="protoray", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pre-train a method (default: PCL on Fashion-MNIST)",
                       description="Pre-train one method on a Ray cluster and record it in MLflow. "
                                   "With no address, starts an embedded local Ray.")
    t.add_argument("config", nargs="?", help="experiment YAML (see configs/); defaults if omitted")
    t.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override config values, e.g. --set "
                   "method.temperature=0.1 optim.epochs=5 (repeatable)")
    t.add_argument("--address", help="Ray cluster to join ('auto', ray://host:10001); "
                                     "default: RAY_ADDRESS or an embedded local cluster")
    t.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///mlruns.db)")
    t.add_argument("--verbose", action="store_true",
                   help="show Ray's and the libraries' own output instead of one line per epoch")
    t.add_argument("--resume", metavar="RUN_ID",
                   help="continue this MLflow run from its latest checkpoint after its driver "
                        "died (Ctrl-C prints the command); takes no CONFIG or --set")
    w = sub.add_parser("sweep", help="Ray Tune sweep of a config over a search space",
                       description="Run trials of CONFIG over SPACE with Ray Tune (ASHA on --metric) "
                                   "and record them as nested MLflow runs; prints one row per trial.")
    w.add_argument("config", nargs="?", help="experiment YAML the trials start from")
    w.add_argument("--space", help="YAML: config.path: {loguniform|uniform|randint|choice|grid_search: ...}")
    w.add_argument("--num-samples", type=int, default=16, help="trials to run (default 16)")
    w.add_argument("--scheduler", choices=["asha", "pbt", "none"], default="asha",
                   help="asha: stop trials that fall behind early; pbt: population-based training "
                        "(exploit the best trials' checkpoints, perturb their values); none: run "
                        "every trial to the end")
    w.add_argument("--perturbation-interval", type=int, default=2,
                   help="pbt: epochs between exploits (default 2)")
    w.add_argument("--max-concurrent", type=int, default=2, help="trials at once (default 2)")
    w.add_argument("--search", choices=["random", "grid", "optuna"], default="random",
                   help="random (default), grid (each choice combination once) or optuna (TPE)")
    w.add_argument("--seed", type=int, default=None, help="seed of the search's sampling")
    w.add_argument("--metric", default="knn_holdout",
                   help="what ranks the trials: knn_holdout (default), probe_holdout, or a label-free "
                        "score for unlabelled images: rankme, alignment, uniformity, cluster_entropy")
    w.add_argument("--mode", choices=["max", "min"], default=None,
                   help="whether higher or lower --metric is better (default: the metric's own)")
    w.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override base config values (repeatable)")
    w.add_argument("--no-eval", action="store_true", help="skip each trial's final test evaluation")
    w.add_argument("--resume", metavar="SWEEP_DIR",
                   help="continue an interrupted sweep (its path is printed when it starts)")
    w.add_argument("--address", help="Ray cluster to join; default RAY_ADDRESS or an embedded local one")
    n = sub.add_parser("plan", help="what a run or sweep will ask for and do, without training",
                       description="Resources per worker and run, trials in parallel, the data "
                       "loader, per-worker memory, and the E-step strategy with the estimated "
                       "seconds of each (orchestration.cost_model). Starts nothing.")
    n.add_argument("config", help="experiment YAML")
    n.add_argument("--set", dest="overrides", nargs="+", action="extend", default=[],
                   metavar="KEY=VALUE", help="override config values (repeatable)")
    n.add_argument("--space", help="a sweep's space YAML: also say how many trials run at once")
    n.add_argument("--num-samples", type=int, default=16, help="the sweep's trials (default 16)")
    n.add_argument("--max-concurrent", type=int, default=None, help="the sweep's --max-concurrent")
    n.add_argument("--samples", type=int, help="assume this many training images")
    n.add_argument("--cluster", metavar="CPU=96,GPU=8,...",
                   help="assume a cluster of these resources (default: this machine)")
    n.add_argument("--address", help="plan for the live Ray cluster at ADDR (joins it, starts nothing)")
    n.add_argument("--json", action="store_true", help="print the plan as one JSON object")
    e = sub.add_parser("eval", help="evaluate a checkpoint (kNN, linear, AMI/NMI/ARI)",
                       description="Evaluate a protoray checkpoint file on its dataset's test split.")
    e.add_argument("checkpoint", help="a state.pt / final_checkpoint.pt written by protoray train, "
                                      "or a Ray Train checkpoint directory holding state.pt")
    e.add_argument("--no-pixels", action="store_true", help="skip the raw-pixel baseline")
    e.add_argument("--protocol", choices=["fast", "sgd"], default="fast",
                   help="linear evaluation: fast (logistic regression on frozen features, the "
                        "default of protoray train) or sgd (the MoCo/PCL papers': a linear layer "
                        "trained by SGD on augmented crops of the frozen encoder), added as linear_sgd")
    e.add_argument("--epochs", type=int, default=10,
                   help="epochs of the sgd protocol (default 10 for a CPU; the papers train 100)")
    x = sub.add_parser("export", help="write the trained backbone as safetensors + JSON for "
                       "torchvision / timm / protoray constructors",
                       description="Write DIR/encoder.safetensors (the backbone's weights, keys "
                       "loading with strict=True) and DIR/encoder.json (how to build the module, "
                       "the input it expects, the embedding size, the source).")
    x.add_argument("source", metavar="CHECKPOINT_OR_RUN",
                   help="a state.pt / final_checkpoint.pt, a Ray Train checkpoint directory, or "
                        "an MLflow run id")
    x.add_argument("--to", required=True, metavar="DIR", help="output directory (created if missing)")
    x.add_argument("--tracking-uri", help="MLflow store of a run id (default: MLFLOW_TRACKING_URI, "
                                          "else sqlite:///mlruns.db)")
    d = sub.add_parser("write-dataset", help="write a built-in dataset as an image folder or "
                       "parquet files (to try the streaming loader)",
                       description="Writes OUT/train and OUT/val in the layout data.name: "
                       "image_folder or parquet reads.")
    d.add_argument("name", choices=["fashion_mnist", "digits"])
    d.add_argument("out", help="a new or empty folder")
    d.add_argument("--format", default="image_folder", choices=["image_folder", "parquet"])
    d.add_argument("--size", type=int, default=None, help="resize to SIZE x SIZE pixels")
    d.add_argument("--rgb", action="store_true", help="write 3-channel images")
    d.add_argument("--repeat", type=int, default=1,
                   help="write every training image this many times under new names")
    d.add_argument("--limit", type=int, default=None, help="only the first N images of each split")
    d.add_argument("--unlabelled", action="store_true",
                   help="write the training split without labels (a flat folder, parquet without "
                        "a label column), as your own photos come; val keeps its labels")
    return p


def print_metrics(metrics: dict[str, float]) -> None:
    """The final scores: the labelled table where there is one, the label-free line always."""
    from orchestration.evaluate import NO_LABELS

    if metrics and "test_knn" not in metrics:
        print(f"protoray: note: {NO_LABELS}")
    if "test_knn" in metrics:
        names = ("knn", "linear", "ami", "nmi", "ari")
        print(f"{'features':12}" + "".join(f"{n:>9}" for n in names))
        for prefix, label in (("test_", "encoder"), ("pixels_", "raw pixels")):
            if f"{prefix}knn" in metrics:
                print(f"{label:12}" + "".join(f"{metrics[prefix + n]:9.4f}" for n in names))
    free = [f"{n} {metrics['test_' + n]:.3f}" for n in ("rankme", "alignment", "uniformity")
            if "test_" + n in metrics]
    if free:
        print("label-free   " + "  ".join(free))


def _plan(args: argparse.Namespace) -> int:
    import json

    from orchestration.plan import describe, local_cluster, make_plan, num_samples_of, parse_cluster

    cfg = load_config(args.config, args.overrides)
    if args.space:
        from orchestration.sweep import load_space, validate_space

        validate_space(cfg.model_dump(mode="json"), load_space(args.space))
    if args.address:
        import ray

        from orchestration.resources import live_cluster

        ray.init(address=args.address, log_to_driver=False, logging_level="ERROR")
        cluster, multi_node = live_cluster()
    else:
        from orchestration.resources import custom_resources, run_resources

        runs = (args.max_concurrent or 2) if args.space else 1  # sweep's default: 2 at once
        cluster = (parse_cluster(args.cluster) if args.cluster else
                   {**custom_resources(cfg, runs), **local_cluster(runs * run_resources(cfg)["CPU"])})
        multi_node = bool(args.cluster)  # an assumed cluster: the features cross the network
    tables = None
    if not args.samples and cfg.train_size() is None:
        from orchestration.run import check_source

        tables = check_source(cfg)
    plan = make_plan(cfg, num_samples_of(cfg, args.samples, tables), cluster, multi_node,
                     args.num_samples if args.space else None, args.max_concurrent)
    print(json.dumps(plan) if args.json else describe(plan))
    return 0


def _train(args: argparse.Namespace) -> int:
    from orchestration.console import quiet_libraries
    from orchestration.run import RunInterrupted, TrainingStopped, resume, train
    from orchestration.tracking import redact

    if args.resume and (args.config or args.overrides):
        raise ConfigError("train --resume RUN_ID: the run's own config is used; drop CONFIG and "
                          "--set (pass the run's MLflow store with --tracking-uri)")
    if not args.resume:
        overrides = list(args.overrides)
        if args.tracking_uri:
            overrides.append(f"tracking.tracking_uri={args.tracking_uri}")
        cfg = load_config(args.config, overrides)
        for notice in cfg.notices():
            print(f"protoray: note: {notice}", file=sys.stderr)
    quiet_libraries(args.verbose)
    try:
        if args.resume:
            from orchestration.config import TrackingSection

            uri = args.tracking_uri or TrackingSection().tracking_uri
            summary = resume(args.resume, uri, address=args.address, verbose=args.verbose)
        else:
            summary = train(cfg, address=args.address, verbose=args.verbose)
    except TrainingStopped as exc:
        print(f"protoray: training stopped: {exc}", file=sys.stderr)
        return 1
    except RunInterrupted as exc:
        print(f"\nprotoray: interrupted; continue with: protoray train --resume {exc.run_id} "
              f"--tracking-uri {redact(exc.tracking_uri)}", file=sys.stderr)
        return 130
    print()
    print_metrics(summary.metrics)
    if summary.checkpoint:
        print(f"\nFinal checkpoint: {summary.checkpoint}  (protoray eval takes this directory)")
    uri = redact(summary.tracking_uri)  # a password in the URI is never printed
    print(f"\nSee it in MLflow:  mlflow ui --backend-store-uri {uri} --workers 1"
          if uri.startswith("sqlite") else f"\nSee it in MLflow at {uri}")
    return 0


def _sweep(args: argparse.Namespace) -> int:
    if args.resume:
        from orchestration.sweep import format_table, resume_sweep

        table = resume_sweep(args.resume, address=args.address)
    else:
        if not args.config or not args.space:
            raise ConfigError("sweep: give CONFIG and --space SPACE.yaml (or --resume SWEEP_DIR)")
        from orchestration.sweep import format_table, load_space, run_sweep

        cfg = load_config(args.config, args.overrides)
        table = run_sweep(cfg, load_space(args.space), num_samples=args.num_samples,
                      scheduler=args.scheduler, max_concurrent_trials=args.max_concurrent,
                      evaluate=not args.no_eval, address=args.address, metric=args.metric,
                      mode=args.mode, search=args.search, seed=args.seed,
                      perturbation_interval=args.perturbation_interval)
    print("\n" + format_table(table))
    if not (table["status"] == "finished").any():
        print("protoray: no trial finished; their failure_reason tags in MLflow say why",
              file=sys.stderr)
        return 1
    return 0


def _eval(args: argparse.Namespace) -> int:
    from orchestration.checkpoints import checkpoint_file
    from orchestration.evaluate import evaluate_checkpoint

    if args.protocol == "sgd" and args.epochs < 1:
        raise ConfigError(f"--epochs: the sgd protocol needs at least 1 epoch (got {args.epochs})")
    path = checkpoint_file(Path(args.checkpoint))
    with tempfile.TemporaryDirectory() as out:
        metrics, _ = evaluate_checkpoint(path, Path(out), with_pixels=not args.no_pixels,
                                         sgd_epochs=args.epochs if args.protocol == "sgd" else 0)
    print_metrics(metrics)
    if "test_linear_sgd" in metrics:
        print(f"linear (sgd protocol, {args.epochs} epochs): {metrics['test_linear_sgd']:.4f}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from orchestration.console import quiet_libraries
    from orchestration.export import export

    quiet_libraries(verbose=False)
    done = export(args.source, Path(args.to), args.tracking_uri)
    d = done.description
    shape = f"{d['input']['channels']}x{d['input']['size']}x{d['input']['size']}"
    print(f"wrote {done.weights} and {done.weights.parent / 'encoder.json'}: {d['backbone']}, "
          f"input {shape} -> {d['embedding_dim']}-d embedding; rebuild it with the lines under "
          "'snippet' in encoder.json")
    return 0


def _write_dataset(args: argparse.Namespace) -> int:
    from orchestration.write_dataset import write_dataset

    out = write_dataset(args.name, args.out, args.format, args.size, args.rgb, args.repeat,
                        args.limit, unlabelled=args.unlabelled)
    from orchestration.config import KNOWN_SHAPES

    side = args.size or KNOWN_SHAPES[args.name][1]  # else trained at data.image_size's default
    print(f"wrote {out}/train and {out}/val; train on it with --set data.name={args.format} "
          f"data.root={out} data.image_size={side}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        commands = {"train": _train, "eval": _eval, "sweep": _sweep, "export": _export, "plan": _plan,
                    "write-dataset": _write_dataset}
        return commands[args.command](args)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        print(f"protoray: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
