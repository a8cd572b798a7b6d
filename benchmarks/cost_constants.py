"""The constants of the E-step cost model (``orchestration.cost_model``), measured on this
machine: how fast faiss assigns points on one CPU thread, how fast torch's matmul path does on
the GPU (where there is one), how fast the object store moves a feature matrix, and what one
Lloyd round through the prototype actor costs beyond its arithmetic.

What is measured
    - ``cpu_flops_per_thread``: an exact faiss search (``methods.clustering.lloyd.assign``) of
      N x D float32 points against K centroids on 1 thread, counted as 2 N K D FLOP (the
      distance matmul that dominates), median of ``--repeats``; the same with every thread for
      the ratio.
    - ``gpu_flops`` (CUDA only): ``methods.clustering.lloyd.nearest_torch`` at the same shape.
    - ``object_store_bytes_per_s``: ``ray.put`` in one process and ``ray.get`` in another of a
      256 MB float32 matrix (what a gathered E-step moves), on one node.
    - ``round_overhead_s``: ``benchmarks/estep_scale.py``'s seconds per Lloyd round at K = 64
      (arithmetic negligible) with 2 workers: Ray calls, the barrier and the all-reduce.

Run: ``python benchmarks/cost_constants.py [--repeats 3]``; the last line is one JSON object,
the values ``orchestration/cost_model.py`` holds (copy them there with the RESULTS.md entry).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import faiss
import numpy as np
import ray
import torch


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def assign_rate(n: int, d: int, k: int, threads: int, repeats: int) -> float:
    """FLOP/s of faiss's exact assignment on ``threads`` threads."""
    from methods.clustering.lloyd import assign

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    c = rng.normal(size=(k, d)).astype(np.float32)
    faiss.omp_set_num_threads(threads)
    seconds = _median_seconds(lambda: assign(x, c), repeats)
    return 2 * n * k * d / seconds


def gpu_rate(n: int, d: int, k: int, repeats: int) -> float | None:
    if not torch.cuda.is_available():
        return None
    from methods.clustering.lloyd import nearest_torch

    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32)
    c = torch.from_numpy(rng.normal(size=(k, d)).astype(np.float32)).cuda()

    def run():
        nearest_torch(c, x)
        torch.cuda.synchronize()

    return 2 * n * k * d / _median_seconds(run, repeats)


@ray.remote(num_cpus=0)
def _fetch(refs) -> float:
    start = time.perf_counter()
    value = ray.get(refs[0])
    value.sum()  # touch it
    return time.perf_counter() - start


def object_store_rate(megabytes: int, repeats: int) -> float:
    matrix = np.random.default_rng(0).normal(size=(megabytes * 2**20 // 512, 128)).astype(np.float32)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        ref = ray.put(matrix)
        put = time.perf_counter() - start
        times.append(put + ray.get(_fetch.remote([ref])))
        del ref
    return matrix.nbytes / statistics.median(times)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    n, d, k = 20_000, 128, 1000
    threads = faiss.omp_get_max_threads()  # before assign_rate sets it
    one = assign_rate(n, d, k, 1, args.repeats)
    every = assign_rate(n, d, k, threads, args.repeats)
    gpu = gpu_rate(200_000, d, 25_000, args.repeats)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    store = object_store_rate(256, args.repeats)
    ray.shutdown()
    from estep_scale import main as estep_scale  # this script's folder is on sys.path

    overhead = estep_scale(["--quick", "--repeats", str(args.repeats)])["ms_per_round_w2_allreduce"] / 1e3
    print(f"faiss assignment, {n} x {d} against K = {k}: {one / 1e9:.1f} GFLOP/s on 1 thread, "
          f"{every / 1e9:.1f} on {threads} ({every / one:.2f}x)")
    if gpu:
        print(f"torch assignment on {torch.cuda.get_device_name()}: {gpu / 1e12:.2f} TFLOP/s")
    print(f"object store, 256 MB put + get in another process: {store / 1e9:.2f} GB/s")
    print(f"sharded round overhead, 2 workers, K = 64: {overhead * 1e3:.0f} ms")
    out = {"cpu_flops_per_thread": round(one), "cpu_thread_scaling": round(every / one, 2),
           "gpu_flops": round(gpu) if gpu else None, "object_store_bytes_per_s": round(store),
           "round_overhead_s": round(overhead, 4)}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
