"""``methods/`` in a plain torch.distributed program: two gloo processes, no DDP model, no Ray.
The gathering losses' value and each rank's gradient match one process holding both ranks' rows;
PCL's E-step encodes every rank's shard with the same (rank 0's) BatchNorm statistics."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

from methods.backbones import build_backbone
from methods.batchnorm import broadcast_batchnorm_stats
from methods.losses import nt_xent, sinkhorn
from methods.registry import build_method
from methods.training import encode
from methods.views import view_spec

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
    out = mp.Manager().dict()
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
    out = mp.Manager().dict()
    mp.spawn(_estep_worker, args=(_free_port(), out), nprocs=WORLD, join=True)
    assert not torch.allclose(torch.as_tensor(out[0][0]), torch.as_tensor(out[1][0]))  # differed
    torch.testing.assert_close(torch.as_tensor(out[0][1]), torch.as_tensor(out[1][1]), rtol=0, atol=0)
    torch.testing.assert_close(torch.as_tensor(out[0][1]), torch.as_tensor(out[0][0]))  # rank 0's
