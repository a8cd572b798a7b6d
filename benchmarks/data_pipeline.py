"""The streaming data path (Ray Data) against a torchvision DataLoader and the in-memory path:
training throughput, worker and node memory as the folder grows 10x, and one PCL epoch.

What is measured
    The data is Fashion-MNIST written as an image folder of 64 px RGB PNG files by
    ``protoray write-dataset`` (60,000 training images; for memory also 600,000, the same
    pictures repeated under new names). Every run is a Ray Train run with 2 workers of 1 CPU
    each, SimCLR on the default convnet, global batch 256 (128 per worker), ``small`` views.

    * throughput: images per second over ``--steps`` training steps after ``--warmup`` steps,
      timed on rank 0 between barriers, for three ways of feeding the same step:
      - stream: protoray's streaming path (``data.loader: stream``; decoding in Ray Data tasks
        with ``data.decode_cpus`` CPUs per worker, the views batched in the worker);
      - dataloader: torchvision ``ImageFolder`` + ``DataLoader`` (2 loader processes per
        worker, ``DistributedSampler``), two views per image by ``torchvision.transforms.v2``
        matching the ``small`` preset, then the same backbone and NT-Xent step;
      - memory: protoray's in-memory path (every worker decodes the folder first, untimed).
      The modes alternate, ``--repeats`` times; the table shows medians.
      Targets: stream >= 1.3x dataloader, stream >= 0.8x memory.
      The same three feeds alone (batches and the two views, no training step) show each data
      path's capacity, what a GPU step would be waiting on.
    * memory: peak resident memory of one training worker (``ru_maxrss``, rank 0) and the peak
      proportional set size (PSS) summed over every process of the Ray node (sampled each 0.5 s),
      for the streamed 60k and 600k folders (``--memory-steps`` steps each) and for the in-memory
      path on the 60k folder. Target: the worker's peak grows by less than 15% for 10x images.
    * PCL epoch: one epoch of ``configs/pcl_fashion_mnist.yaml`` on the streamed 60k folder at
      64 px (views at 64 px, E-step in epoch 0) through ``orchestration.run.train``, the
      function ``protoray train`` calls (final evaluation off): wall time, epoch time and the
      E-step's share of it.

Run: ``python benchmarks/data_pipeline.py [--data-dir outputs/bench_data] [--repeats 2]``; the
folders are written on the first run and reused. The last line is JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
import ray
import ray.train
import ray.train.torch
import torch
from ray.train import RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from orchestration.builders import load_splits, make_method, table_splits
from orchestration.config import ExperimentConfig, load_config
from orchestration.streaming import stream_datasets
from orchestration.write_dataset import write_dataset

ROOT = Path(__file__).resolve().parent.parent
MODES = ("stream", "dataloader", "memory")


def ensure_folder(data_dir: Path, repeat: int) -> Path:
    out = data_dir / f"fashion_mnist_64_rgb_x{repeat}"
    if not (out / "train").is_dir():
        start = time.perf_counter()
        write_dataset("fashion_mnist", out, size=64, rgb=True, repeat=repeat)
        print(f"wrote {out} in {time.perf_counter() - start:.0f} s", flush=True)
    return out


OVERRIDES: list[str] = []  # --set, for every run


def simclr_config(folder: Path, loader: str, tmp: str, *more: str) -> ExperimentConfig:
    return load_config(None, [
        "method.name=simclr", "data.name=image_folder", f"data.root={folder}",
        "data.image_size=64", "data.channels=3", "data.views=small", f"data.loader={loader}",
        "optim.batch_size=256", "scaling.num_workers=2", "scaling.cpus_per_worker=1",
        f"tracking.tracking_uri=sqlite:///{tmp}/mlruns.db", f"tracking.storage_path={tmp}/ray",
        *OVERRIDES, *more])


class PairStep(torch.nn.Module):
    """The method's backbone and pair loss on two views made elsewhere (the DataLoader's)."""

    def __init__(self, method):
        super().__init__()
        self.method = method

    def forward(self, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
        h0, h1 = self.method.backbone(torch.cat([v0, v1])).chunk(2)
        return self.method.pair_loss(h0, h1, None)[0]


def loader_batches(folder: Path, per_rank: int, rank: int, world: int):
    """torchvision's per-image pipeline: ImageFolder, two v2 views, DataLoader with 2 workers."""
    from torchvision import datasets
    from torchvision.transforms import v2

    view = v2.Compose([
        v2.RandomResizedCrop(64, scale=(0.3, 1.0), antialias=True), v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.4)], p=0.8), v2.RandomGrayscale(0.2),
        v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize([0.5] * 3, [0.25] * 3)])
    ds = datasets.ImageFolder(str(folder / "train"), transform=lambda im: (view(im), view(im)))
    sampler = torch.utils.data.DistributedSampler(ds, world, rank, shuffle=True, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_size=per_rank, sampler=sampler, num_workers=2,
                                         drop_last=True, persistent_workers=True)
    for (v0, v1), _ in loader:
        yield v0, v1


def train_steps(config: dict) -> None:
    """Ray Train loop: ``warmup + steps`` SimCLR steps fed by ``config["mode"]``."""
    from orchestration.shards import MemoryShard, StreamShard

    cfg = ExperimentConfig.model_validate(config["experiment"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)
    per_rank = cfg.optim.batch_size // world
    mode, warmup, steps = config["mode"], config["warmup"], config["steps"]
    method = make_method(cfg, 3, 64, rank)
    if mode == "dataloader":
        model = ray.train.torch.prepare_model(PairStep(method))
        batches = loader_batches(Path(cfg.data.root), per_rank, rank, world)
    else:
        shard = (StreamShard(config["stream"], 64, per_rank, cfg.data.prefetch_batches, rank)
                 if mode == "stream" else MemoryShard(load_splits(cfg), per_rank, 0, rank, world))
        model = ray.train.torch.prepare_model(method)
        batches = (b for epoch in range(100) for b in shard.batches(epoch))
    optimizer = torch.optim.SGD(method.parameters(), lr=0.06, momentum=0.9)
    torch.distributed.barrier()
    start, waited = time.perf_counter(), 0.0
    for step in range(warmup + steps):
        if step == warmup:
            torch.distributed.barrier()
            start, waited = time.perf_counter(), 0.0
        asked = time.perf_counter()
        batch = next(batches)
        waited += time.perf_counter() - asked
        if config["feed_only"]:  # the views the step would get, and no step
            if mode != "dataloader":
                method.view(batch.images), method.view(batch.images)
            continue
        loss = model(*batch) if mode == "dataloader" else model(batch)[0]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.distributed.barrier()
    seconds = time.perf_counter() - start
    metrics = {"images_per_s": steps * cfg.optim.batch_size / seconds, "wait_share": waited / seconds,
               "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    with tempfile.TemporaryDirectory() as directory:  # Train V2 keeps metrics with checkpoints
        ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory)
                         if rank == 0 else None)


class NodeMemory:
    """Peak PSS summed over this process's descendants (the embedded Ray node), sampled."""

    def __init__(self, every_s: float = 0.5):
        self.peak, self.every_s, self._stop = 0.0, every_s, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                with contextlib.suppress(psutil.Error, OSError):  # a process that just ended
                    total += p.memory_full_info().pss
            self.peak = max(self.peak, total / 2**20)
            self._stop.wait(self.every_s)

    def __enter__(self) -> NodeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def run_mode(cfg: ExperimentConfig, mode: str, warmup: int, steps: int, feed_only: bool = False
             ) -> dict[str, float]:
    stream = stream_datasets(cfg, table_splits(cfg)) if mode == "stream" else None
    trainer = TorchTrainer(
        train_steps,
        train_loop_config={"experiment": cfg.model_dump(mode="json"), "mode": mode,
                           "warmup": warmup, "steps": steps, "feed_only": feed_only,
                           "stream": stream.info if stream else None},
        scaling_config=ScalingConfig(num_workers=2, resources_per_worker={"CPU": 1}),
        run_config=RunConfig(storage_path=cfg.tracking.storage_path),
        datasets=stream.datasets if stream else None,
        dataset_config=stream.data_config if stream else None)
    with NodeMemory() as node:
        start = time.perf_counter()
        result = trainer.fit()
    if result.error:
        raise result.error
    return {**result.metrics, "node_peak_mb": node.peak, "wall_s": time.perf_counter() - start}


def pcl_epoch(folder: Path, tmp: str) -> dict[str, float]:
    import mlflow

    from orchestration.run import train

    cfg = load_config(ROOT / "configs" / "pcl_fashion_mnist.yaml", [
        "data.name=image_folder", f"data.root={folder}", "data.image_size=64", "data.channels=3",
        "data.view_size=null", "data.loader=stream", "optim.epochs=1", "method.warmup_epochs=0",
        f"tracking.tracking_uri=sqlite:///{tmp}/mlruns.db", f"tracking.storage_path={tmp}/ray"])
    start = time.perf_counter()
    summary = train(cfg, evaluate=False, verbose=False)
    wall = time.perf_counter() - start
    run = mlflow.MlflowClient(summary.tracking_uri).get_run(summary.run_id).data.metrics
    return {"wall_s": wall, "epoch_s": run["epoch_s"], "estep_s": run["estep_s"],
            "estep_share": run["estep_s"] / run["epoch_s"], "kmeans_s": run["kmeans_s"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", type=Path, default=ROOT / "outputs" / "bench_data")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--memory-steps", type=int, default=40)
    p.add_argument("--skip", nargs="*", default=[], choices=["throughput", "memory", "pcl"])
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--set", nargs="+", default=[], dest="overrides", metavar="KEY=VALUE",
                   help="config overrides for every run (e.g. data.object_store_mb=128)")
    args = p.parse_args()
    OVERRIDES.extend(args.overrides)
    modes = tuple(args.modes)

    small = ensure_folder(args.data_dir, 1)
    large = ensure_folder(args.data_dir, 10) if "memory" not in args.skip else None
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "600")
    # 2 workers + 2 decoding CPUs + the PCL actor and driver, as logical CPUs on 2 cores
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    print(f"{os.cpu_count()} cores; 2 workers x 1 CPU; SimCLR, convnet, batch 256, 64 px RGB; "
          f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} repeats", flush=True)
    headline: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        if "throughput" not in args.skip:
            speeds: dict[str, list[float]] = {m: [] for m in modes}
            for repeat in range(args.repeats):
                for mode in modes if repeat % 2 == 0 else modes[::-1]:
                    loader = "memory" if mode == "memory" else "stream"
                    out = run_mode(simclr_config(small, loader, tmp), mode, args.warmup, args.steps)
                    speeds[mode].append(out["images_per_s"])
                    print(f"  {mode:10} {out['images_per_s']:7.1f} images/s, rank 0 waited for "
                          f"data {100 * out['wait_share']:.0f}% of the time", flush=True)
            feeds: dict[str, list[float]] = {m: [] for m in modes}
            for repeat in range(args.repeats):  # the data path alone: batches and views, no step
                for mode in modes if repeat % 2 == 0 else modes[::-1]:
                    loader = "memory" if mode == "memory" else "stream"
                    out = run_mode(simclr_config(small, loader, tmp), mode, args.warmup,
                                   args.steps, feed_only=True)
                    feeds[mode].append(out["images_per_s"])
                    print(f"  {mode:10} {out['images_per_s']:7.1f} images/s fed (no step)",
                          flush=True)
            feed = {m: statistics.median(v) for m, v in feeds.items()}
            med = {m: statistics.median(v) for m, v in speeds.items()}
            print(f"\n{'mode':12}{'training img/s':>16}{'vs dataloader':>15}{'vs memory':>11}"
                  f"{'fed img/s (no step)':>21}{'vs dataloader':>15}")
            for m in modes:
                ratio = {b: f"{med[m] / med[b]:.2f}" if b in med else "-"
                         for b in ("dataloader", "memory")}
                fed = f"{feed[m] / feed['dataloader']:.2f}" if "dataloader" in feed else "-"
                print(f"{m:12}{med[m]:16.1f}{ratio['dataloader']:>15}{ratio['memory']:>11}"
                      f"{feed[m]:21.1f}{fed:>15}")
            headline.update({f"{m}_images_per_s": round(med[m], 1) for m in modes})
            headline.update({f"{m}_fed_images_per_s": round(feed[m], 1) for m in modes})
            if "stream" in feed and "dataloader" in feed:
                headline["stream_vs_dataloader_fed"] = round(feed["stream"] / feed["dataloader"], 3)
            for base in ("dataloader", "memory"):
                if "stream" in med and base in med:
                    headline[f"stream_vs_{base}"] = round(med["stream"] / med[base], 3)
        if "memory" not in args.skip:
            rows = {}
            for label, folder, loader in (("stream 60k", small, "stream"),
                                          ("stream 600k", large, "stream"),
                                          ("memory 60k", small, "memory")):
                mode = "stream" if loader == "stream" else "memory"
                out = run_mode(simclr_config(folder, loader, tmp), mode, 0, args.memory_steps)
                rows[label] = out
                print(f"  {label:12} worker {out['peak_rss_mb']:7.0f} MB, node "
                      f"{out['node_peak_mb']:7.0f} MB", flush=True)
            print(f"\n{'':14}{'worker peak MB':>16}{'node peak MB':>14}")
            for label, out in rows.items():
                print(f"{label:14}{out['peak_rss_mb']:16.0f}{out['node_peak_mb']:14.0f}")
            growth = rows["stream 600k"]["peak_rss_mb"] / rows["stream 60k"]["peak_rss_mb"] - 1
            print(f"worker peak growth for 10x images: {100 * growth:.1f}%")
            headline.update({"worker_peak_mb_60k": round(rows["stream 60k"]["peak_rss_mb"]),
                             "worker_peak_mb_600k": round(rows["stream 600k"]["peak_rss_mb"]),
                             "worker_peak_growth": round(growth, 3),
                             "node_peak_mb_60k": round(rows["stream 60k"]["node_peak_mb"]),
                             "node_peak_mb_600k": round(rows["stream 600k"]["node_peak_mb"]),
                             "memory_path_worker_peak_mb_60k":
                                 round(rows["memory 60k"]["peak_rss_mb"])})
        if "pcl" not in args.skip:
            out = pcl_epoch(small, tmp)
            print(f"\nPCL, one epoch streamed at 64 px: wall {out['wall_s']:.0f} s, epoch "
                  f"{out['epoch_s']:.0f} s, E-step {out['estep_s']:.0f} s "
                  f"({100 * out['estep_share']:.0f}% of the epoch; k-means {out['kmeans_s']:.1f} s)")
            headline.update({f"pcl_{k}": round(v, 3) for k, v in out.items()})
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
