"""``methods/`` in a plain torch.distributed program: two gloo processes, no Ray.
The gathering losses' value and each rank's gradient match one process holding both ranks' rows;
PCL's E-step encodes every rank's shard with the same (rank 0's) BatchNorm statistics; every
method trained under DDP on two shards keeps its parameters identical on both ranks."""

from __future__ import annotations

import math
import os
import socket
import warnings

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

from methods.clustering.kmeans import run_kmeans
from methods.data.datasets import ImageDataset
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone
from methods.encoders.batchnorm import broadcast_batchnorm_stats
from methods.losses.codes import sinkhorn
from methods.losses.contrastive import nt_xent
from methods.registry import available, build_method
from methods.training import (
    OptimConfig,
    encode,
    epoch_batches,
    make_optimizer,
    memory_batches,
    train_epoch,
)

WORLD = 2


def _rows(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return (F.normalize(torch.randn(2 * WORLD * 4, 16, generator=g, dtype=torch.float64), dim=1)
            .chunk(2))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, out: dict) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        z0, z1 = _rows()
        mine = slice(rank * 4, rank * 4 + 4)
        a, b = z0[mine].clone().requires_grad_(), z1[mine].clone().requires_grad_()
        loss = nt_xent(a, b, temperature=0.3, gather=True)
        loss.backward()
        # each rank's loss is its anchors' mean, so the global loss is the mean over ranks; the
        # gather's backward sums every rank's gradient for this rank's rows (as DDP then averages)
        grads = torch.cat([a.grad, b.grad])
        scores = torch.randn(6, 5, generator=torch.Generator().manual_seed(rank), dtype=torch.float64)
        codes = sinkhorn(scores, epsilon=0.05, gather=True)
        out[rank] = (loss.item(), grads / WORLD, codes)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks() -> dict:
    out = mp.get_context("spawn").Manager().dict()  # no fork of a process with gRPC threads
    mp.spawn(_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    return dict(out)


def test_nt_xent_gathers_with_gradients_in_a_plain_gloo_group(two_ranks):
    z0, z1 = _rows()
    a, b = z0.clone().requires_grad_(), z1.clone().requires_grad_()
    expected = nt_xent(a, b, temperature=0.3)
    expected.backward()
    assert sum(two_ranks[r][0] for r in range(WORLD)) / WORLD == pytest.approx(expected.item(), 1e-9)
    for rank in range(WORLD):
        mine = slice(rank * 4, rank * 4 + 4)
        torch.testing.assert_close(two_ranks[rank][1], torch.cat([a.grad[mine], b.grad[mine]]))


def test_sinkhorn_equipartition_holds_across_ranks(two_ranks):
    scores = torch.cat([torch.randn(6, 5, generator=torch.Generator().manual_seed(r),
                                    dtype=torch.float64) for r in range(WORLD)])
    expected = sinkhorn(scores, epsilon=0.05)
    torch.testing.assert_close(torch.cat([two_ranks[r][2] for r in range(WORLD)]), expected)


def _estep_worker(rank: int, port: int, out: dict) -> None:
    """Two ranks with the same weights but BatchNorm statistics from different batches, as
    workers have after training with ``broadcast_buffers=False``, encode the same images."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        torch.manual_seed(0)
        method = build_method("pcl", build_backbone("convnet", 1, 8), view_spec("digits"),
                              queue_size=64, proj_hidden_dim=32, bn_splits=2)
        own = torch.Generator().manual_seed(100 + rank)
        with torch.no_grad():  # a training-mode pass on this rank's own batch moves its statistics
            method.train()
            method.encoder_k(torch.rand(16, 1, 8, 8, generator=own) * (1 + rank))
        images = torch.randint(0, 256, (12, 1, 8, 8), dtype=torch.uint8,
                               generator=torch.Generator().manual_seed(7))
        before = encode(method.cluster_embed, images, method)
        broadcast_batchnorm_stats(method)
        out[rank] = (before, encode(method.cluster_embed, images, method))
    finally:
        dist.destroy_process_group()


def test_estep_encodes_every_shard_with_rank_zeros_batchnorm_statistics():
    out = mp.get_context("spawn").Manager().dict()  # no fork of a process with gRPC threads
    mp.spawn(_estep_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    assert not torch.allclose(torch.as_tensor(out[0][0]), torch.as_tensor(out[1][0]))  # differed
    torch.testing.assert_close(torch.as_tensor(out[0][1]), torch.as_tensor(out[1][1]), rtol=0, atol=0)
    torch.testing.assert_close(torch.as_tensor(out[0][1]), torch.as_tensor(out[0][0]))  # rank 0's


# Small queues, banks and heads (benchmarks/gpu_check.py's SMALL, smaller still) so every method
# steps fast on 256 images; SwAV's prototypes and DINO's last layer unfrozen so their sync is tested.
_NARROW = {"proj_hidden_dim": 256}
_SMALL = {
    "byol": {**_NARROW, "pred_hidden_dim": 256},
    "moco": {**_NARROW, "queue_size": 256},
    "moco_v3": {**_NARROW, "pred_hidden_dim": 256},
    "pcl": {**_NARROW, "queue_size": 256, "num_negative_prototypes": 50, "warmup_epochs": 0},
    "selfcon": _NARROW,
    "simclr": _NARROW,
    "simsiam": {**_NARROW, "proj_dim": 256, "pred_hidden_dim": 64},
    "supcon": _NARROW,
    "instdisc": {"num_negatives": 256},
    "cmc": {"memory_bank": True, "num_negatives": 256},
    "swav": {**_NARROW, "num_prototypes": 50, "freeze_prototypes_steps": 0},
    "dino": {"out_dim": 256, "hidden_dim": 256, "bottleneck_dim": 64, "num_local_crops": 2,
             "freeze_last_layer": 0},
}
_DDP_STEPS, _DDP_BATCH = 2, 32


def _ddp_worker(rank: int, port: int, out: dict) -> None:
    """Each method, DDP-wrapped as the Ray workers wrap it, trains on this rank's own batches
    with this rank's own augmentation seed; returns its loss and parameters by name."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)  # two ranks on a small shared machine
    try:
        g = torch.Generator().manual_seed(0)
        data = ImageDataset(torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=g),
                            torch.randint(0, 10, (256,), generator=g))
        results: dict[str, tuple[float, dict[str, torch.Tensor]]] = {}
        for name, regularizer in [(n, None) for n in available()] + [("simclr", "icl_msr")]:
            torch.manual_seed(0)  # identical initial weights on both ranks
            method = build_method(name, build_backbone("convnet", 1, 28), view_spec("small", size=28),
                                  seed=rank, regularizer=regularizer, **_SMALL.get(name, {}))
            key = f"{name}+{regularizer}" if regularizer else name
            method.bind_data(len(data), rank, WORLD)
            with warnings.catch_warnings():
                # as orchestration.worker: the replacement for broadcast_buffers=False still syncs
                # buffers at init, and per-rank buffers (memory-bank shards) must stay per rank
                warnings.simplefilter("ignore", FutureWarning)
                model = DistributedDataParallel(method, broadcast_buffers=False)
            batches = epoch_batches(len(data), _DDP_BATCH, 0, 0, rank, WORLD)[:_DDP_STEPS]
            optimizer, scheduler = make_optimizer(method, OptimConfig(lr=0.03), len(batches), 1)
            prototypes = None
            if method.schedule is not None:
                # one clustering for all ranks, as the prototype actor hands every rank the same
                found = [run_kmeans(encode(method.cluster_embed, data.images, method), [20, 40],
                                    method.schedule.temperature, seed=0, nredo=1)
                         if rank == 0 else None]
                dist.broadcast_object_list(found, src=0)
                prototypes = found[0].on_device("cpu")
            metrics = train_epoch(method, memory_batches(data, batches), len(batches), optimizer,
                                  scheduler, 0, prototypes, model=model, total_epochs=1)
            results[key] = (metrics["loss"], {n: p.detach().clone()
                                              for n, p in method.named_parameters()})
        out[rank] = results
    finally:
        dist.destroy_process_group()


def test_every_method_keeps_its_parameters_identical_across_ranks_under_ddp():
    """DDP all-reduces every gradient and each rank updates its replica alike: after steps on
    different shards and augmentations, every parameter of every method (EMA targets, prototypes
    and ICL-MSR's f_msr, stepped outside DDP, included) is bit-identical on both ranks, and every
    loss is finite."""
    out = mp.get_context("spawn").Manager().dict()  # no fork of a process with gRPC threads
    mp.spawn(_ddp_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    ranks = [out[r] for r in range(WORLD)]
    assert set(ranks[0]) == set(ranks[1]) == set(available()) | {"simclr+icl_msr"}
    diverged: dict[str, str] = {}
    for key in ranks[0]:
        (loss0, params0), (loss1, params1) = ranks[0][key], ranks[1][key]
        assert math.isfinite(loss0) and math.isfinite(loss1), key
        assert loss0 != loss1, f"{key}: both ranks trained on the same batches"
        differ = [n for n in params0 if not torch.equal(params0[n], params1[n])]
        if differ:
            diverged[key] = f"{len(differ)} of {len(params0)}, e.g. {', '.join(differ[:3])}"
    assert not diverged, f"parameters differ across ranks: {diverged}"
