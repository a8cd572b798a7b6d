"""The cost of running across Ray nodes: the same `ray job submit` run on one node and on three
(a head that trains nothing plus two worker nodes, each a separate raylet on this machine), and the
head node's peak memory while it runs the dashboard, the job's driver and the prototype actor.

What is measured
    One node: `ray start --head --num-cpus 5`, nothing else. Three nodes: the head with 1 CPU and
    the resource `prototype_actor`, two worker nodes with 2 CPUs and one `train_slot` each, so the
    Train workers and the actor sit on different nodes (tests/test_multinode.py's layout). The run
    is `protoray train CONFIG` submitted with `ray job submit --working-dir .`, 2 workers; the
    wall time is from submit to the job's end (Train's worker group start, the E-steps' object
    transfers and the checkpoints to the shared path included). The head's memory is the summed
    proportional set size (PSS, shared pages split between the processes that map them) of every
    process of the head node and its descendants (GCS, dashboard, raylet, the job's driver, the
    Train controller, the actor), sampled every 0.5 s. Layouts alternate, ``--repeats`` times
    each; medians are reported.

Run: ``python benchmarks/multinode.py [--config configs/tiny_digits.yaml --repeats 3]``; the
last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests/local_nodes.py holds the node commands the tests run

from tests.local_nodes import (  # noqa: E402
    kill_processes,
    start_head,
    start_worker,
    submit,
    token_env,
    wait_for_nodes,
)

PLACEMENT = ["--set", "clustering.actor_resources={prototype_actor: 1}",
             "--set", "scaling.worker_resources={train_slot: 1}"]


def head_pss_mb(temp_dir: str) -> float:
    """Summed PSS in MB of the processes naming a path under ``temp_dir`` (the worker nodes' temp
    dirs only share its prefix) and all their descendants."""
    roots = []
    for proc in psutil.process_iter(["cmdline"]):
        if f"{temp_dir}/" in " ".join(proc.info["cmdline"] or []):
            roots.append(proc)
    seen: dict[int, psutil.Process] = {}
    for proc in roots:
        seen[proc.pid] = proc
        try:
            for child in proc.children(recursive=True):
                seen[child.pid] = child
        except psutil.Error:
            continue
    total = 0
    for proc in seen.values():
        try:
            total += proc.memory_full_info().pss
        except psutil.Error:
            continue
    return total / 2**20


def sample_peak(temp_dir: str, stop: threading.Event, out: list[float]) -> None:
    while not stop.is_set():
        out.append(head_pss_mb(temp_dir))
        stop.wait(0.5)


def one_run(layout: str, config: str, work: Path) -> tuple[float, float]:
    """(wall seconds of the job, peak head PSS in MB) for ``layout`` one|multi."""
    prefix = f"/tmp/prb{os.getpid()}"
    env = token_env()
    multi = layout == "multi"
    gcs, dashboard = start_head(prefix, env, num_cpus=1 if multi else 5,
                                resources={"prototype_actor": 1} if multi else None)
    nodes = []
    try:
        if multi:
            nodes = [start_worker(gcs, f"{prefix}{n}", env, 2, {"train_slot": 1}, work / f"{n}.log")
                     for n in "ab"]
        wait_for_nodes(dashboard, env, alive=3 if multi else 1)
        run_dir = Path(tempfile.mkdtemp(dir=work))
        args = ["protoray", "train", config, *(PLACEMENT if multi else []),
                "--set", f"tracking.tracking_uri=sqlite:///{run_dir}/mlruns.db",
                "--set", f"tracking.storage_path={run_dir}/shared"]
        stop, peaks = threading.Event(), []
        sampler = threading.Thread(target=sample_peak, args=(prefix, stop, peaks))
        sampler.start()
        start = time.perf_counter()
        done = submit(dashboard, env, args, cwd=ROOT)
        wall = time.perf_counter() - start
        stop.set()
        sampler.join()
        if done.returncode != 0:
            raise RuntimeError(f"{layout} run failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return wall, max(peaks)
    finally:
        for node in nodes:
            node.kill()
        for name in ("", "a", "b"):
            kill_processes(f"{prefix}{name}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="configs/tiny_digits.yaml")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()

    results: dict[str, dict[str, list[float]]] = {"one": {"wall": [], "peak": []},
                                                   "multi": {"wall": [], "peak": []}}
    with tempfile.TemporaryDirectory() as work:
        for repeat in range(args.repeats):
            for layout in ("one", "multi") if repeat % 2 == 0 else ("multi", "one"):
                wall, peak = one_run(layout, args.config, Path(work))
                results[layout]["wall"].append(wall)
                results[layout]["peak"].append(peak)
                print(f"  repeat {repeat} {layout:5s}: {wall:6.1f} s, head peak {peak:7.0f} MB",
                      flush=True)

    med = {layout: {k: statistics.median(v) for k, v in r.items()} for layout, r in results.items()}
    print(f"\n{args.config}, 2 Train workers, medians of {args.repeats}")
    print(f"{'layout':28s} {'job wall s':>11s} {'head peak PSS MB':>17s}")
    print(f"{'one node':28s} {med['one']['wall']:11.1f} {med['one']['peak']:17.0f}")
    print(f"{'head + 2 worker nodes':28s} {med['multi']['wall']:11.1f} {med['multi']['peak']:17.0f}")
    extra = med["multi"]["wall"] / med["one"]["wall"] - 1
    print(f"multi-node extra wall time: {100 * extra:+.1f}%")
    print(json.dumps({"config": args.config, "repeats": args.repeats,
                      "one_node_wall_s": round(med["one"]["wall"], 1),
                      "multi_node_wall_s": round(med["multi"]["wall"], 1),
                      "multi_node_extra_wall": round(extra, 3),
                      "head_peak_pss_mb_one_node": round(med["one"]["peak"]),
                      "head_peak_pss_mb_multi_node": round(med["multi"]["peak"])}))


if __name__ == "__main__":
    main()
