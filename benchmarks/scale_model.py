"""How long an ImageNet-1k PCL epoch takes on 8 and 64 GPUs, projected from parts measured here
and checked against epochs measured here.

The model (per epoch, W GPU workers, global batch B, N images)
    step    = FLOP per image x B/W / (peak x fraction) + ring all-reduce of the gradients
              (2 (W-1)/W x 4 bytes x parameters, NVLink inside one 8-GPU node, the network
              across nodes); FLOP counted by ``torch.utils.flop_counter`` on the real PCL step
              (query forward + backward, key forward, ProtoNCE) and on the E-step's encoding.
    train   = max(N/B steps x step, N/W / (decode rate per core x cores per GPU)): Ray Data
              decodes ahead of the step, so the slower of the two sets the pace.
    E-step  = encoding all N images (forward FLOP / (W x peak x fraction)) + k-means by
              ``orchestration.cost_model`` (the strategy ``auto`` picks).
    epoch   = train + E-step.

Validated on this machine: single-process PCL epochs of ResNet-50 on ``--images`` JPEGs at
``--sizes`` px (decode every JPEG, encode them all, k-means, train every step, in turn, so the
model's parts add instead of overlapping). The CPU's fraction of peak is calibrated at one size
(``--calibrate``) and the other sizes are predictions; the goal is within 25%.

Projected: ResNet-50 at 224 px, B = 256, K = 25k/50k/100k, on H100s. Not measured (no GPU
lent): the GPU's fraction of its bf16 peak (``--gpu-fraction``; ``gpu_check.py`` prints the
measured one), NVLink and network rates (assumed, as the cost model's). Measured: the decode rate
of a 500 x 375 JPEG to 224 px per core, the FLOP per image, the cost model's CPU constants.

Run: ``python benchmarks/scale_model.py [--sizes 64 96 128 --images 256]``; the last line is JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from methods.base import Batch
from methods.clustering.kmeans import run_kmeans
from methods.data.image_files import decode_image
from methods.training import OptimConfig, encode, make_optimizer, train_epoch
from orchestration.config import load_config
from orchestration.cost_model import NETWORK_BYTES_PER_S, config_estep_cost

ROOT = Path(__file__).resolve().parent.parent
H100_BF16_PEAK = 989e12  # dense bf16 tensor-core FLOP/s, H100 SXM (NVIDIA's data sheet)
NVLINK_BYTES_PER_S = 2e11  # assumed all-reduce bus rate inside one 8-GPU NVLink node
IMAGENET_N, GLOBAL_BATCH = 1_281_167, 256
IMAGENET_K = [25_000, 50_000, 100_000]


def pcl_config(size: int, batch: int, extra: list[str] = ()):
    return load_config(ROOT / "configs" / "pcl_fashion_mnist.yaml", [
        # views at the images' side (the Fashion-MNIST recipe downsizes them); shuffled BN off:
        # at 64 GPUs a worker's batch is 4 images
        "model.backbone=resnet50", "data.views=simclr", "method.queue_size=1024",
        f"data.view_size={size}", "data.crop_min_scale=0.08", "method.bn_splits=1",
        f"optim.batch_size={batch}", "scaling.num_workers=1", "method.warmup_epochs=1",
        "data.name=image_folder", f"data.image_size={size}", "data.channels=3", *extra])


def write_jpegs(folder: Path, count: int) -> list[Path]:
    """``count`` 500 x 375 RGB JPEGs (ImageNet's typical size) from Fashion-MNIST images with
    photo-like noise, so they compress like photos rather than like flat drawings."""
    from PIL import Image

    from methods.data.datasets import load_fashion_mnist

    images = load_fashion_mnist(split="train").images[:count, 0].numpy()
    rng = np.random.default_rng(0)
    paths = []
    for i, image in enumerate(images):
        big = np.asarray(Image.fromarray(image).resize((500, 375), Image.Resampling.BICUBIC), np.float32)
        rgb = np.stack([big, big * 0.8 + 30, 255 - big * 0.6], -1) + rng.normal(0, 12, (375, 500, 3))
        path = folder / f"{i:05d}.jpg"
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(path, quality=90)
        paths.append(path)
    return paths


def decode_rate(paths: list[Path], size: int) -> float:
    """Images/s one thread decodes (``decode_image``: JPEG draft, EXIF, centre square, resize)."""
    blobs = [p.read_bytes() for p in paths]
    start = time.perf_counter()
    for blob in blobs:
        decode_image(blob, size, 3)
    return len(blobs) / (time.perf_counter() - start)


def matmul_peak(threads: int) -> float:
    """FLOP/s of a large float32 matmul on ``threads`` threads: the CPU's practical peak."""
    torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    a @ b
    times = []
    for _ in range(5):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * 2048**3 / statistics.median(times)


def step_flop(method, images: torch.Tensor) -> tuple[float, float]:
    """(FLOP of one training step on ``images``, FLOP of encoding them for the E-step)."""
    optimizer, scheduler = make_optimizer(method, OptimConfig(lr=0.01), 1, 1)
    batch = Batch(torch.arange(len(images)), images, torch.zeros(len(images), dtype=torch.long))
    with FlopCounterMode(display=False) as train_count:
        train_epoch(method, [batch], 1, optimizer, scheduler, 0)
    with FlopCounterMode(display=False) as encode_count:
        encode(method.cluster_embed, images, method, batch_size=len(images))
    return float(train_count.get_total_flops()), float(encode_count.get_total_flops())


def measure_epoch(paths: list[Path], size: int, batch: int, num_clusters: list[int]) -> dict:
    """One PCL epoch in this process, its parts timed: decode, encode, k-means, train."""
    cfg = pcl_config(size, batch, [f"clustering.num_clusters={json.dumps(num_clusters)}",
                                   "clustering.nredo=1"])
    torch.manual_seed(0)
    method = cfg.build_method(3, size)
    t = {}
    start = time.perf_counter()
    images = torch.from_numpy(np.stack([decode_image(p.read_bytes(), size, 3) for p in paths]))
    t["decode"] = time.perf_counter() - start
    # warm-up step (allocator, oneDNN kernels), not timed, then the FLOP count
    train_flop, encode_flop = step_flop(method, images[:batch])
    optimizer, scheduler = make_optimizer(method, OptimConfig(lr=0.01), len(paths) // batch, 1)
    start = time.perf_counter()
    features = encode(method.cluster_embed, images, method, batch_size=batch)
    t["encode"] = time.perf_counter() - start
    start = time.perf_counter()
    run_kmeans(features, num_clusters, 0.2, 0, cfg.clustering.niter, cfg.clustering.nredo)
    t["kmeans"] = time.perf_counter() - start
    batches = [Batch(torch.arange(i, i + batch), images[i:i + batch], torch.zeros(batch, dtype=torch.long))
               for i in range(0, len(paths) - batch + 1, batch)]
    start = time.perf_counter()
    train_epoch(method, batches, len(batches), optimizer, scheduler, 0)
    t["train"] = time.perf_counter() - start
    t["epoch"] = sum(t.values())
    return {"seconds": t, "steps": len(batches), "train_flop": train_flop / batch,
            "encode_flop": encode_flop / batch, "dim": features.shape[1], "cfg": cfg}


def predict_epoch(m: dict, n: int, rate: float, fraction: float, encode_fraction: float,
                  peak: float) -> dict:
    """The model's parts for a measured epoch's shape, on this CPU (one process, in turn)."""
    cost = config_estep_cost(m["cfg"], n, m["dim"], multi_node=False)
    speed = fraction * peak
    p = {"decode": n / rate, "encode": n * m["encode_flop"] / (encode_fraction * peak),
         "kmeans": cost.gather_s, "train": m["steps"] * m["cfg"].optim.batch_size * m["train_flop"] / speed}
    p["epoch"] = sum(p.values())
    return p


def project(workers: int, train_flop: float, encode_flop: float, params: int, rate_224: float,
            cpus_per_gpu: int, fraction: float) -> dict:
    """ImageNet-1k PCL epoch on ``workers`` H100s: seconds of each part and the epoch."""
    cfg = load_config(ROOT / "configs" / "pcl_fashion_mnist.yaml", [
        "model.backbone=resnet50", "scaling.use_gpu=true", f"scaling.num_workers={workers}",
        f"optim.batch_size={GLOBAL_BATCH}", f"clustering.num_clusters={json.dumps(IMAGENET_K)}",
        "clustering.nredo=5", "clustering.niter=20", "data.name=image_folder", "data.image_size=224",
        "data.channels=3", "method.queue_size=16384", "data.view_size=224", "method.bn_splits=1"])
    speed = fraction * H100_BF16_PEAK
    link = NVLINK_BYTES_PER_S if workers <= 8 else NETWORK_BYTES_PER_S
    allreduce = 2 * (workers - 1) / workers * 4 * params / link
    steps = IMAGENET_N // GLOBAL_BATCH
    compute = GLOBAL_BATCH / workers * train_flop / speed
    data = IMAGENET_N / workers / (rate_224 * cpus_per_gpu)
    train = max(steps * (compute + allreduce), data)
    cost = config_estep_cost(cfg, IMAGENET_N, 128, multi_node=workers > 8)
    estep = IMAGENET_N / workers * encode_flop / speed + min(cost.gather_s, cost.sharded_s)
    return {"workers": workers, "step_compute_s": compute, "allreduce_s": allreduce,
            "data_s": data, "train_s": train, "estep_s": estep, "strategy": cost.cheaper,
            "epoch_s": train + estep, "bound": "data" if data > steps * (compute + allreduce)
            else ("all-reduce" if allreduce > compute else "compute")}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--calibrate", type=int, default=96, help="size whose fraction of peak is used")
    p.add_argument("--images", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--clusters", type=int, nargs="+", default=[16, 32])
    # assumed until gpu_check.py measures it: well-tuned ResNet-50 training reaches a fifth or
    # less of the bf16 peak; a plain DDP step with small per-GPU batches, less
    p.add_argument("--gpu-fraction", type=float, default=0.15,
                   help="fraction of the H100's bf16 peak a PCL ResNet-50 step reaches (assumed)")
    p.add_argument("--cpus-per-gpu", type=int, default=12, help="decoding cores per GPU")
    args = p.parse_args()
    threads = torch.get_num_threads()
    peak = matmul_peak(threads)

    with tempfile.TemporaryDirectory() as tmp:
        paths = write_jpegs(Path(tmp), args.images)
        measured = {s: measure_epoch(paths, s, args.batch, args.clusters) for s in args.sizes}
        rates = {s: decode_rate(paths, s) for s in args.sizes}  # the epochs decode on one thread
        rate_224 = decode_rate(paths, 224)
    m = measured[args.calibrate]
    achieved = (m["steps"] * args.batch * m["train_flop"]) / m["seconds"]["train"]
    fraction = achieved / peak
    # the E-step's encoding (eval mode, no backward) runs at its own fraction, calibrated alike
    encode_fraction = args.images * m["encode_flop"] / m["seconds"]["encode"] / peak
    print(f"CPU: {threads} threads, matmul peak {peak / 1e9:.0f} GFLOP/s; PCL ResNet-50 at "
          f"{args.calibrate} px (calibration): the training step reaches {fraction:.2f} of it, "
          f"the E-step's encoding {encode_fraction:.2f}")
    print(f"\n{'px':>4}{'part':>8}{'measured s':>12}{'model s':>10}{'error':>8}")
    errors = {}
    for s, mm in measured.items():
        pred = predict_epoch(mm, args.images, rates[s], fraction, encode_fraction, peak)
        for part in ("decode", "encode", "kmeans", "train", "epoch"):
            got, want = mm["seconds"][part], pred[part]
            print(f"{s:4d}{part:>8}{got:12.2f}{want:10.2f}{(want - got) / got:+8.0%}")
        errors[s] = (pred["epoch"] - mm["seconds"]["epoch"]) / mm["seconds"]["epoch"]

    resnet = pcl_config(224, GLOBAL_BATCH).build_method(3, 224)
    params = sum(p.numel() for p in resnet.parameters() if p.requires_grad)
    flop_224 = step_flop(resnet, torch.zeros(4, 3, 224, 224, dtype=torch.uint8))
    train_flop, encode_flop = flop_224[0] / 4, flop_224[1] / 4
    print(f"\nResNet-50 PCL at 224 px: {train_flop / 1e9:.1f} GFLOP per image per step, "
          f"{encode_flop / 1e9:.1f} to encode; {params / 1e6:.1f}M trained parameters; JPEG "
          f"500x375 -> 224 px decodes at {rate_224:.0f} images/s per core")
    print(f"ImageNet-1k PCL epoch, H100 at {args.gpu_fraction:.2f} of bf16 peak (assumed), "
          f"{args.cpus_per_gpu} decoding cores per GPU, global batch {GLOBAL_BATCH}, K {IMAGENET_K}")
    print(f"{'GPUs':>5}{'step ms':>9}{'allred ms':>10}{'train s':>9}{'data s':>8}{'E-step s':>9}"
          f"{'epoch min':>10}  bound, E-step")
    rows = [project(w, train_flop, encode_flop, params, rate_224, args.cpus_per_gpu, args.gpu_fraction)
            for w in (8, 64)]
    for r in rows:
        print(f"{r['workers']:5d}{r['step_compute_s'] * 1e3:9.1f}{r['allreduce_s'] * 1e3:10.1f}"
              f"{r['train_s']:9.0f}{r['data_s']:8.0f}{r['estep_s']:9.0f}{r['epoch_s'] / 60:10.1f}  "
              f"{r['bound']}, {r['strategy']}")
    worst = max(abs(e) for s, e in errors.items() if s != args.calibrate)
    print(f"\nValidation: epoch model error at the predicted sizes, worst {worst:.0%} (goal <= 25%)")
    print(json.dumps({"cpu_fraction_of_peak": round(fraction, 3),
                      **{f"epoch_error_{s}px": round(e, 3) for s, e in errors.items()},
                      "worst_predicted_error": round(worst, 3),
                      "imagenet_epoch_min_8gpu": round(rows[0]["epoch_s"] / 60, 1),
                      "imagenet_epoch_min_64gpu": round(rows[1]["epoch_s"] / 60, 1),
                      "resnet50_pcl_gflop_per_image": round(train_flop / 1e9, 1),
                      "decode_224_per_core": round(rate_224)}))


if __name__ == "__main__":
    main()
