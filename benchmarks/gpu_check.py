"""The CUDA/NCCL path on a GPU machine, and the speed of a ResNet training step there.

Tests and CI run on CPU (gloo); this is the check that the same code runs unchanged on CUDA:

1. **Every registered method under DDP with the NCCL backend.** One process group of world size 1
   (one GPU: NCCL refuses two ranks on one device), each method wrapped in
   ``DistributedDataParallel`` the way ``ray.train.torch.prepare_model`` wraps it, a few steps of
   ``methods.training.train_epoch`` on Fashion-MNIST under bf16 autocast, PCL with a
   faiss E-step first. A method that leaves a tensor on the CPU, or whose loss is not finite,
   fails here with its name. The collectives it exercises are ``all_ranks``' all-reduce and DDP's
   gradient all-reduce; gathers across ranks need two GPUs.
2. **Images/s of a SimCLR step** (two views from ``methods.data.views.augment`` on the GPU, forward,
   backward, SGD) for the small convnet and ResNet-18/50 with the small-image stem, at fp32 and
   bf16, the median of ``--repeats`` timed windows after warm-up.

3. **A sharded Lloyd round at ImageNet size** (``--lloyd-n`` x 128 features, K = ``--lloyd-k``,
   default 1.28M x 128 and K = 25,000): one rank's ``methods.clustering.lloyd.shard_sums`` on
   the GPU plus the all-reduce of its sums over the NCCL group (world size 1), median of 3; its
   FLOP rate is the ``GPU_FLOPS`` constant of ``orchestration/cost_model.py``.

4. **The GPU prototype actor's gather** (``clustering.gpus: 1``): ``gather_on_device`` on
   ``--gather-n`` x 128 features, K = 25,000, 5 iterations, one restart, on the GPU.
5. **A PCL ResNet-50 step at 224 px** (batch ``--pcl-batch``, bf16): its FLOP counted by
   ``torch.utils.flop_counter`` over the measured seconds, as a fraction of the card's bf16
   peak (``--bf16-peak``): ``benchmarks/scale_model.py --gpu-fraction`` takes it.

Run on a GPU machine: ``python benchmarks/gpu_check.py [--data-root DIR]``. It refuses to run
without CUDA. The last line is JSON with the headline figures.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import time

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from methods.base import Batch
from methods.clustering.kmeans import run_kmeans
from methods.data.datasets import FASHION_MNIST_ROOT, ImageDataset, load_fashion_mnist
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone
from methods.registry import available, build_method
from methods.training import (
    OptimConfig,
    autocast_for,
    encode,
    epoch_batches,
    make_optimizer,
    memory_batches,
    train_epoch,
)

# Smaller queues, banks and prototype sets than the papers' so every method builds and steps fast
# on a few thousand images (PCL with no warm-up, so its ProtoNCE term runs); the rest are defaults.
SMALL = {
    "moco": {"queue_size": 4096},
    "pcl": {"queue_size": 4096, "num_negative_prototypes": 50, "warmup_epochs": 0},
    "instdisc": {"num_negatives": 1024},
    "cmc": {"memory_bank": True, "num_negatives": 1024},
    "swav": {"num_prototypes": 50, "queue_length": 0},
    "dino": {"out_dim": 1024},
}


def init_process_group(device: str) -> None:
    """NCCL on CUDA; gloo for ``--device cpu``, a dry run of this script before GPU time."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if device == "cuda":
        dist.init_process_group("nccl", rank=0, world_size=1, device_id=torch.device("cuda", 0))
    else:
        dist.init_process_group("gloo", rank=0, world_size=1)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def check_methods(train: ImageDataset, steps: int, backbone: str, device: str) -> dict[str, float]:
    """Every method, DDP-wrapped: the mean loss of ``steps`` bf16 steps. ``train_epoch`` stops
    on a non-finite loss; the method's name is printed first, so the failure says which."""
    losses = {}
    for name, regularizer in [(n, None) for n in available()] + [("simclr", "icl_msr")]:
        torch.manual_seed(0)
        method = build_method(name, build_backbone(backbone, 1, 28), view_spec("small", size=28),
                              regularizer=regularizer, **SMALL.get(name, {})).to(device)
        name = f"{name}+{regularizer}" if regularizer else name
        print(f"  {name:15}", end=" ", flush=True)
        method.bind_data(len(train), 0, 1)
        model = DistributedDataParallel(method, device_ids=[0] if device == "cuda" else None,
                                        broadcast_buffers=False)
        batches = epoch_batches(len(train), 128, 0, 0)[:steps]
        optimizer, scheduler = make_optimizer(method, OptimConfig(lr=0.03, precision="bf16"),
                                              len(batches), 1)
        prototypes = None
        if method.schedule is not None:
            features = encode(method.cluster_embed, train.images, method, device=device)
            prototypes = run_kmeans(features, [20, 40], method.schedule.temperature, seed=0,
                                    nredo=1).on_device(device)
        start = time.perf_counter()
        metrics = train_epoch(method, memory_batches(train, batches), len(batches), optimizer,
                              scheduler, 0, prototypes, device,
                              model=model, total_epochs=1, precision="bf16")
        sync(device)
        losses[name] = metrics["loss"]
        print(f"ok: loss {metrics['loss']:.3f}, {steps} steps in "
              f"{time.perf_counter() - start:.1f}s", flush=True)
    return losses


def simclr_img_per_s(train: ImageDataset, backbone: str, precision: str, batch_size: int, steps: int,
                     repeats: int, device: str) -> float:
    """Median images/s; the dataset sits on the device, so the figure is the step alone (views,
    network, optimiser) and not a host-to-device copy."""
    torch.manual_seed(0)
    method = build_method("simclr", build_backbone(backbone, 1, 28), view_spec("small", size=28),
                          proj_hidden_dim=512).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.06, momentum=0.9, weight_decay=5e-4)
    images, labels = train.images.to(device), train.labels.to(device)
    autocast = autocast_for(device, precision)

    def step() -> None:
        idx = torch.randint(0, len(images), (batch_size,), device=device)
        with autocast:
            loss, _ = method(Batch(idx, images[idx], labels[idx]), None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    sync(device)
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync(device)
        rates.append(steps * batch_size / (time.perf_counter() - start))
    return statistics.median(rates)


def lloyd_round(n: int, k: int, device: str, dim: int = 128) -> dict[str, float]:
    """Seconds of one sharded Lloyd round on this rank (assignment and sums on ``device``, the
    all-reduce of the sums over the process group), median of 3 after a warm-up, and the FLOP
    rate of its 2 n K D distance matmul."""
    import numpy as np

    from methods.clustering.lloyd import all_reduce_sums, shard_sums

    rng = np.random.default_rng(0)
    features = rng.standard_normal((n, dim), dtype=np.float32)
    centroids = features[rng.choice(n, k, replace=False)]
    where = device if device == "cuda" else "faiss"
    times = []
    for _ in range(4):
        start = time.perf_counter()
        sums, _ = shard_sums(features, centroids, where)
        all_reduce_sums(sums, device)
        sync(device)
        times.append(time.perf_counter() - start)
    seconds = statistics.median(times[1:])
    return {"seconds": seconds, "flops": 2 * n * k * dim / seconds}


def gather_seconds(n: int, k: int, device: str) -> float:
    """Seconds of the GPU actor's gathered k-means (5 iterations, 1 restart) on n x 128."""
    import numpy as np

    from orchestration.prototypes import gather_on_device

    features = np.random.default_rng(0).standard_normal((n, 128), dtype=np.float32)
    start = time.perf_counter()
    gather_on_device(np.arange(n), features, n, 0, [k], 0.2, 0, niter=5, nredo=1, device=device)
    sync(device)
    return time.perf_counter() - start


def pcl_resnet50_step(batch: int, device: str, steps: int = 10) -> dict[str, float]:
    """A bf16 PCL ResNet-50 step at 224 px on random images: seconds (median after warm-up) and
    FLOP per step (forward and backward, counted by torch)."""
    from torch.utils.flop_counter import FlopCounterMode

    torch.manual_seed(0)
    method = build_method("pcl", build_backbone("resnet50", 3, 224), view_spec("simclr", size=224),
                          queue_size=16384, warmup_epochs=1, bn_splits=min(8, batch // 2)
                          ).to(device, memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(method.parameters(), lr=0.03, momentum=0.9)
    images = torch.randint(0, 256, (batch, 3, 224, 224), dtype=torch.uint8, device=device)
    batch_data = Batch(torch.arange(batch, device=device), images,
                       torch.zeros(batch, dtype=torch.long, device=device))
    autocast = autocast_for(device, "bf16")

    def step() -> None:
        with autocast:
            loss, _ = method(batch_data, None)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    with FlopCounterMode(display=False) as count:
        step()
    for _ in range(3):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return {"seconds": statistics.median(times), "flop": float(count.get_total_flops())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-root", default=FASHION_MNIST_ROOT)
    p.add_argument("--check-images", type=int, default=4096)
    p.add_argument("--check-steps", type=int, default=8)
    p.add_argument("--check-backbone", default="resnet18")
    p.add_argument("--backbones", nargs="+", default=["convnet", "resnet18", "resnet50"])
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--lloyd-n", type=int, default=1_281_167, help="features of the Lloyd round")
    p.add_argument("--lloyd-k", type=int, default=25_000, help="centroids of the Lloyd round")
    p.add_argument("--gather-n", type=int, default=400_000, help="features of the GPU actor's gather")
    p.add_argument("--pcl-batch", type=int, default=64, help="per-GPU batch of the ResNet-50 step")
    p.add_argument("--bf16-peak", type=float, default=989e12, help="the card's dense bf16 FLOP/s "
                   "(H100 SXM 989e12; H200 the same)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda",
                   help="cpu: a dry run of the script with gloo (tiny sizes advised)")
    args = p.parse_args()
    device = args.device
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("gpu_check: no CUDA device here; --device cpu is a dry run with gloo")
    torch.backends.cudnn.benchmark = True
    train = load_fashion_mnist(args.data_root, "train")
    where = (f"{torch.cuda.get_device_name(0)}, NCCL {'.'.join(map(str, torch.cuda.nccl.version()))}"
             if device == "cuda" else f"CPU, {torch.get_num_threads()} threads")
    print(f"torch {torch.__version__}, {where}", flush=True)

    init_process_group(device)
    print(f"DDP ({dist.get_backend()}, world 1), {args.check_backbone}, {args.check_steps} bf16 "
          f"steps of batch 128 per method:")
    losses = check_methods(train.subset(torch.arange(args.check_images)), args.check_steps,
                           args.check_backbone, device)
    lloyd = lloyd_round(args.lloyd_n, args.lloyd_k, device)
    print(f"\nsharded Lloyd round, {args.lloyd_n:,} x 128, K = {args.lloyd_k:,}: "
          f"{lloyd['seconds']:.2f} s ({lloyd['flops'] / 1e12:.1f} TFLOP/s, the cost model's GPU_FLOPS)")
    dist.destroy_process_group()

    print(f"\nSimCLR step, batch {args.batch_size}, views on the GPU, median of {args.repeats} "
          f"windows of {args.steps} steps:")
    print(f"{'backbone':10}{'fp32 img/s':>12}{'bf16 img/s':>12}{'bf16/fp32':>10}")
    headline: dict[str, float] = {"methods_ok": len(losses),
                                  "lloyd_round_s": round(lloyd["seconds"], 3),
                                  "gpu_flops": round(lloyd["flops"])}
    for backbone in args.backbones:
        rates = {prec: simclr_img_per_s(train, backbone, prec, args.batch_size, args.steps,
                                        args.repeats, device) for prec in ("fp32", "bf16")}
        print(f"{backbone:10}{rates['fp32']:12.0f}{rates['bf16']:12.0f}"
              f"{rates['bf16'] / rates['fp32']:10.2f}", flush=True)
        headline.update({f"{backbone}_{k}_img_per_s": round(v) for k, v in rates.items()})

    gather = gather_seconds(args.gather_n, 25_000, device)
    print(f"\nGPU actor gather (clustering.gpus: 1), {args.gather_n:,} x 128, K = 25,000, 5 "
          f"iterations: {gather:.2f} s")
    pcl = pcl_resnet50_step(args.pcl_batch, device)
    fraction = pcl["flop"] / pcl["seconds"] / args.bf16_peak
    print(f"PCL ResNet-50 224 px bf16 step, batch {args.pcl_batch}: {pcl['seconds'] * 1e3:.0f} ms, "
          f"{pcl['flop'] / pcl['seconds'] / 1e12:.0f} TFLOP/s = {fraction:.2f} of bf16 peak "
          "(scale_model.py --gpu-fraction)")
    headline.update({"gpu_gather_s": round(gather, 2), "pcl_resnet50_step_ms": round(pcl["seconds"] * 1e3, 1),
                     "pcl_resnet50_fraction_of_peak": round(fraction, 3)})
    print(json.dumps(headline))


if __name__ == "__main__":
    main()
