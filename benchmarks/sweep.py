"""Which search reaches the grid's best with the least compute: random + ASHA, TPE + ASHA, PBT.

What is measured
    Compute = trial-epochs (one trial training one epoch), counted in the order the trials
    report. "Compute to reach" is the trial-epochs spent up to the first report within 0.5 point
    of the full grid's best online kNN; the ratio divides it by the full grid's compute (every
    configuration to the last epoch). Median over ``--seeds`` seeds of each search.

    1. grid: the 16 configurations (4 temperatures x 4 cluster-count settings) of PCL on the
       first ``--limit`` Fashion-MNIST training images (1,000 held out for the online kNN),
       ``--epochs`` epochs, each to the end, through ``orchestration.sweep.run_sweep`` (grid
       search, no scheduler). Each configuration's per-epoch kNN is read back from MLflow into
       ``--curves`` (reused when the file exists and matches the settings).
    2. replay: random + ASHA and TPE (Optuna) + ASHA as real Tune runs, with protoray's own
       search algorithm and scheduler, over trials that report the recorded curve of their
       configuration instead of training it again. Trials are seeded and single-threaded, so a
       configuration reaches the same kNN whenever it runs; replaying its curve is the run it
       would be (a tabular benchmark, as HPOBench does for the same reason: three searches x three
       seeds of real training would take hours on 2 cores).
    3. pbt: real PBT sweeps (``run_sweep(scheduler="pbt")``): a population of ``--population``
       trials over the same two hyperparameters, exploiting every ``--interval`` epochs from the
       donor's checkpoint. PBT changes values mid-run, so it cannot be replayed. Also reported:
       the best fixed configuration at equal compute (the best of ``--population`` random grid
       configurations run to the end, median over 200 draws).

Run: ``python benchmarks/sweep.py [--limit 5000 --epochs 6 --seeds 3]``; ``--phase grid`` only
measures the curves. The last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import ray
from mlflow.tracking import MlflowClient
from ray import tune

from orchestration.config import load_config
from orchestration.sweep import asha_scheduler, run_sweep, search_algorithm

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "configs" / "pcl_fashion_mnist.yaml"
TEMPERATURES = [0.05, 0.1, 0.2, 0.4]
CLUSTERS = [[10, 20], [10, 20, 50], [25, 50], [50, 100, 200]]
SPACE = {"method.temperature": tune.choice(TEMPERATURES), "clustering.num_clusters": tune.choice(CLUSTERS)}
TOLERANCE = 0.005  # "within 0.5 point" of the grid's best kNN
ASHA = {"grace_period": 1, "reduction_factor": 4}


def key(config: dict) -> str:
    return json.dumps([config["method.temperature"], list(config["clustering.num_clusters"])])


def base_config(args, tmp: str):
    return load_config(CONFIG, [
        f"data.limit={args.limit}", f"optim.epochs={args.epochs}", "method.warmup_epochs=1",
        "optim.batch_size=128", "scaling.num_workers=1", "scaling.max_failures=0",
        "clustering.nredo=1", f"tracking.tracking_uri=sqlite:///{tmp}/mlruns.db",
        f"tracking.storage_path={tmp}/ray", "tracking.experiment_name=sweep-benchmark"])


def start_ray(args) -> None:
    # the dashboard serves the state API that removes the placement groups of stopped trials
    ray.init(num_cpus=args.max_concurrent * 3, include_dashboard=True, dashboard_host="127.0.0.1",
             log_to_driver=False)


def measure_grid(args) -> dict:
    """Every configuration to the end; its per-epoch kNN from the trial's MLflow run."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = base_config(args, tmp)
        start_ray(args)
        start = time.perf_counter()
        table = run_sweep(cfg, SPACE, search="grid", scheduler="none", evaluate=False, seed=0,
                          max_concurrent_trials=args.max_concurrent)
        wall = time.perf_counter() - start
        client = MlflowClient(cfg.tracking.tracking_uri)
        curves = {}
        for _, row in table.iterrows():
            history = sorted(client.get_metric_history(row["mlflow_run_id"], "knn_holdout"),
                             key=lambda m: m.step)
            curves[key(row)] = [m.value for m in history]
        ray.shutdown()
    return {"settings": settings(args), "curves": curves, "wall_min": wall / 60}


def settings(args) -> dict:
    return {"limit": args.limit, "epochs": args.epochs, "config": CONFIG.name}


def reach(reports: list[tuple[float, float]], target: float) -> float:
    """Trial-epochs spent (reports in time order) up to the first kNN >= target; inf if never."""
    for spent, (_, knn) in enumerate(sorted(reports), start=1):
        if knn >= target:
            return spent
    return float("inf")


def replay(curves: dict, search: str, seed: int, args) -> tuple[float, int]:
    """(compute to reach the target, total trial-epochs) of one replayed search + ASHA."""

    def trial(config):
        for epoch, knn in enumerate(curves[key(config)]):
            time.sleep(0.05)  # epochs of equal length, so concurrent trials interleave as in training
            tune.report({"knn_holdout": knn, "epochs_done": epoch + 1, "t": time.time()})

    algorithm, space = search_algorithm(search, SPACE, seed, args.max_concurrent)
    with tempfile.TemporaryDirectory() as tmp:
        results = tune.Tuner(
            tune.with_resources(trial, {"CPU": 1}), param_space=space,
            tune_config=tune.TuneConfig(metric="knn_holdout", mode="max", num_samples=16,
                                        search_alg=algorithm,
                                        scheduler=asha_scheduler(args.epochs, **ASHA)),
            run_config=tune.RunConfig(storage_path=tmp, verbose=0)).fit()
        reports = [(t, k) for r in results for t, k in zip(r.metrics_dataframe["t"],
                                                            r.metrics_dataframe["knn_holdout"], strict=True)]
    return reach(reports, target(curves)), len(reports)


def target(curves: dict) -> float:
    return max(max(c) for c in curves.values()) - TOLERANCE


def run_pbt(curves: dict, seed: int, args) -> dict:
    """One real PBT sweep, the whole population at once: compute to reach, its trial-epochs,
    its best kNN."""
    with tempfile.TemporaryDirectory() as tmp:
        cfg = base_config(args, tmp)
        ray.init(num_cpus=args.population * 3, include_dashboard=True, dashboard_host="127.0.0.1",
                 log_to_driver=False)
        start = time.perf_counter()
        table = run_sweep(cfg, SPACE, num_samples=args.population, scheduler="pbt", evaluate=False,
                          seed=seed, max_concurrent_trials=args.population,
                          perturbation_interval=args.interval)
        wall = time.perf_counter() - start
        client = MlflowClient(cfg.tracking.tracking_uri)
        reports = [(m.timestamp, m.value) for run_id in table["mlflow_run_id"]
                   for m in client.get_metric_history(run_id, "knn_holdout")]
        exploits = sum(len([k for k in client.get_run(run_id).data.tags if k.startswith("exploit_")])
                       for run_id in table["mlflow_run_id"])
        ray.shutdown()
    return {"reach": reach(reports, target(curves)), "trial_epochs": len(reports),
            "best_knn": max(k for _, k in reports), "exploits": exploits, "wall_min": wall / 60}


def fixed_at_equal_compute(curves: dict, population: int) -> float:
    """Median over seeded draws of the best final kNN of ``population`` random configurations run
    to the end: what the same compute buys without PBT."""
    rng = random.Random(0)
    finals = [c[-1] for c in curves.values()]
    return statistics.median(max(rng.choices(finals, k=population)) for _ in range(200))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--limit", type=int, default=5000)
    p.add_argument("--epochs", type=int, default=6)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--population", type=int, default=4)
    p.add_argument("--interval", type=int, default=2, help="PBT: epochs between exploits")
    p.add_argument("--max-concurrent", type=int, default=2)
    p.add_argument("--phase", choices=("grid", "all"), default="all")
    p.add_argument("--curves", type=Path, default=ROOT / "benchmarks" / "results" / "sweep_grid_curves.json")
    args = p.parse_args()

    grid = json.loads(args.curves.read_text()) if args.curves.is_file() else None
    if grid is None or grid["settings"] != settings(args):
        grid = measure_grid(args)
        args.curves.parent.mkdir(parents=True, exist_ok=True)
        args.curves.write_text(json.dumps(grid, indent=1))
    curves = grid["curves"]
    full = sum(len(c) for c in curves.values())
    best = max(max(c) for c in curves.values())
    print(f"grid: {len(curves)} configurations, {full} trial-epochs, best kNN {best:.4f}, "
          f"{grid['wall_min']:.1f} min")
    if args.phase == "grid":
        print(json.dumps({"grid_best_knn": round(best, 4), "grid_trial_epochs": full}))
        return

    rows = {}
    ray.init(num_cpus=args.max_concurrent, include_dashboard=False, log_to_driver=False)
    for search in ("random", "optuna"):
        runs = [replay(curves, search, seed, args) for seed in range(args.seeds)]
        rows[f"{search} + ASHA"] = {"reach": [r for r, _ in runs], "spent": [s for _, s in runs]}
        print(f"{search} + ASHA: (to reach, spent) per seed {runs}", flush=True)
    ray.shutdown()
    pbt = []
    for seed in range(args.seeds):
        pbt.append(run_pbt(curves, seed, args))
        print(f"PBT seed {seed}: {pbt[-1]}", flush=True)
    rows["PBT"] = {"reach": [r["reach"] for r in pbt], "spent": [r["trial_epochs"] for r in pbt]}

    print(f"\nPCL, {args.limit - 1000} images, {args.epochs} epochs; grid best {best:.4f}, "
          f"{full} trial-epochs; target kNN >= {best - TOLERANCE:.4f}; {args.seeds} seeds")
    print(f"{'search':16}{'to reach (per seed)':>26}{'median':>8}{'ratio':>7}{'spent':>8}")
    summary = {}
    for name, r in rows.items():
        med = statistics.median(r["reach"])
        summary[name] = med / full
        seeds = ", ".join("never" if x == float("inf") else f"{x:g}" for x in r["reach"])
        print(f"{name:16}{seeds:>26}{med:8g}{med / full:7.2f}{statistics.median(r['spent']):8g}")
    fixed = fixed_at_equal_compute(curves, args.population)
    pbt_best = statistics.median(r["best_knn"] for r in pbt)
    print(f"PBT best kNN (median) {pbt_best:.4f}, exploits {[r['exploits'] for r in pbt]}, "
          f"wall {[round(r['wall_min'], 1) for r in pbt]} min; best fixed configuration at equal "
          f"compute ({args.population} trials to the end) {fixed:.4f}")
    print(json.dumps({"grid_best_knn": round(best, 4), "grid_trial_epochs": full,
                      **{f"{n.split()[0].lower()}_{'asha' if 'ASHA' in n else 'pbt'}_reach_ratio":
                         (None if v == float("inf") else round(v, 3)) for n, v in summary.items()},
                      "pbt_best_knn": round(pbt_best, 4), "fixed_equal_compute_knn": round(fixed, 4)}))


if __name__ == "__main__":
    main()
