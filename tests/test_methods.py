"""The method registry, momentum state, the training loop, and short real trainings on digits."""

from __future__ import annotations

import math

import faiss
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from methods.data.datasets import load_digits
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone
from methods.encoders.batchnorm import SplitBatchNorm, shuffled_forward, split_batchnorm
from methods.encoders.momentum import FeatureQueue, ema_update, momentum_copy
from methods.evaluation.knn import knn_accuracy
from methods.registry import available, build_method, hyperparameters
from methods.training import NonFiniteLossError, OptimConfig, encode, epoch_batches, fit


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread: on a shared 2-core machine two OpenMP threads spin on each other
    and tiny convolutions run 10-50x slower than on one."""
    torch_threads, faiss_threads = torch.get_num_threads(), faiss.omp_get_max_threads()
    torch.set_num_threads(1)
    faiss.omp_set_num_threads(1)
    yield
    torch.set_num_threads(torch_threads)
    faiss.omp_set_num_threads(faiss_threads)


@pytest.fixture(scope="module")
def digits():
    return load_digits("train"), load_digits("test")


def test_registry_lists_methods():
    assert {"simclr", "moco", "pcl"} <= set(available())
    assert hyperparameters("pcl")["warmup_epochs"] == 20
    assert "backbone" not in hyperparameters("moco") and "seed" not in hyperparameters("moco")


def test_build_method_errors():
    backbone, views = build_backbone("convnet", 1, 8), view_spec("digits")
    with pytest.raises(ValueError, match="unknown method 'byol2'") as info:
        build_method("byol2", backbone, views)
    for name in ("simclr", "moco", "pcl"):
        assert name in str(info.value)
    with pytest.raises(ValueError, match="queue_sise") as info:
        build_method("moco", backbone, views, queue_sise=16)
    assert "queue_size" in str(info.value)  # names the real ones
    for name in ("simclr", "moco", "pcl"):
        with pytest.raises(ValueError, match="method.temperature"):
            build_method(name, backbone, views, temperature=0.0)
    with pytest.raises(ValueError, match="method.momentum"):
        build_method("moco", backbone, views, momentum=1.0)
    with pytest.raises(ValueError, match="method.warmup_epochs"):
        build_method("pcl", backbone, views, warmup_epochs=-1)
    for name in ("moco", "pcl"):
        with pytest.raises(ValueError, match="method.bn_splits"):
            build_method(name, backbone, views, bn_splits=0)


def test_feature_queue_wraps_around():
    queue = FeatureQueue(5, 2)
    first = torch.arange(6, dtype=torch.float32).view(3, 2)
    second = 100 + torch.arange(6, dtype=torch.float32).view(3, 2)
    queue.enqueue(first)
    assert int(queue.ptr) == 3
    torch.testing.assert_close(queue.keys[:3], first)
    queue.enqueue(second)
    assert int(queue.ptr) == 1
    # slots 3, 4 then wrap to 0
    torch.testing.assert_close(queue.keys[3:5], second[:2])
    torch.testing.assert_close(queue.keys[0], second[2])
    torch.testing.assert_close(queue.keys[1:3], first[1:3])
    # a batch larger than the queue keeps its newest rows
    queue.enqueue(torch.arange(14, dtype=torch.float32).view(7, 2))
    assert int(queue.ptr) == (1 + 5) % 5
    assert sorted(queue.keys[:, 0].tolist()) == [4.0, 6.0, 8.0, 10.0, 12.0]
    assert set(queue.state_dict()) == {"keys", "ptr"}


def test_ema_update():
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    target = momentum_copy(online)
    assert all(not p.requires_grad for p in target.parameters())
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))
    before = [p.clone() for p in target.parameters()]
    ema_update(target, online, 0.9)
    for t, o, b in zip(target.parameters(), online.parameters(), before, strict=True):
        torch.testing.assert_close(t, 0.9 * b + 0.1 * o)
        assert not torch.allclose(t, o)
    ema_update(target, online, 0.0)
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        torch.testing.assert_close(t, o)


def test_split_batchnorm_normalises_each_slice_and_updates_statistics_once():
    """Each of the equal slices is normalised by its own statistics; the running statistics move
    once per step, by the mean of the slices' updates (MoCo's CIFAR demo), not once per slice."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 4, 4) + torch.arange(8.0).view(8, 1, 1, 1)
    plain = nn.BatchNorm2d(3)
    split = split_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), 2)[0]
    assert isinstance(split, SplitBatchNorm) and split.state_dict().keys() == plain.state_dict().keys()
    out = split(x)
    reference = nn.BatchNorm2d(3)
    torch.testing.assert_close(out, torch.cat([reference(x[:4]), reference(x[4:])]))
    m = split.momentum
    means = torch.stack([x[:4].mean((0, 2, 3)), x[4:].mean((0, 2, 3))])
    variances = torch.stack([x[:4].var((0, 2, 3)), x[4:].var((0, 2, 3))])  # unbiased, as BN keeps
    torch.testing.assert_close(split.running_mean, (1 - m) * torch.zeros(3) + m * means.mean(0))
    torch.testing.assert_close(split.running_var, (1 - m) * torch.ones(3) + m * variances.mean(0))
    assert int(split.num_batches_tracked) == 1
    split.eval()
    torch.testing.assert_close(split(x), F.batch_norm(x, split.running_mean, split.running_var,
                                                      split.weight, split.bias, False, 0, split.eps))
    split.train()
    split.splits = 4
    with pytest.raises(ValueError, match="method.bn_splits"):  # 10 images do not split in 4 equal
        split(torch.randn(10, 3, 4, 4))


def test_shuffled_forward_returns_outputs_in_input_order():
    x = torch.randn(8, 3)
    linear = nn.Linear(3, 2)
    torch.testing.assert_close(shuffled_forward(linear, x, torch.Generator().manual_seed(3)), linear(x))
    bn = split_batchnorm(nn.Sequential(nn.BatchNorm1d(3)), 2)
    order = torch.randperm(8, generator=torch.Generator().manual_seed(3))
    expected = torch.empty(8, 3)
    expected[order] = bn(x[order])
    torch.testing.assert_close(shuffled_forward(bn, x, torch.Generator().manual_seed(3)), expected)


@pytest.mark.parametrize("name", ["moco", "pcl"])
def test_moco_and_pcl_shuffle_bn_by_default(name):
    """The reference's shuffling BN is the default: 8 slices in the query and key backbones."""
    m = build_method(name, build_backbone("convnet", 1, 8), view_spec("digits"))
    assert m.bn_splits == 8
    for encoder in (m.encoder_q[0], m.encoder_k[0]):
        norms = [x for x in encoder.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
        assert norms and all(isinstance(x, SplitBatchNorm) and x.splits == 8 for x in norms)


_BASE = dict(proj_hidden_dim=128, temperature=0.2)
_MOCO = dict(_BASE, queue_size=256, momentum=0.9, bn_splits=4)
_HPARAMS = {"simclr": _BASE, "moco": _MOCO,
            "pcl": dict(_MOCO, warmup_epochs=1, num_negative_prototypes=64)}


@pytest.mark.parametrize("name", ["simclr", "moco", "pcl"])
def test_training_beats_random_encoder(name, digits):
    tr, te = digits
    torch.manual_seed(0)
    m = build_method(name, build_backbone("convnet", 1, 8), view_spec("digits"), **_HPARAMS[name])

    def knn() -> float:
        return knn_accuracy(encode(m.embed, tr.images, m), tr.labels.numpy(),
                            encode(m.embed, te.images, m), te.labels.numpy())

    before = knn()
    history = fit(m, tr, epochs=2, batch_size=64, optim=OptimConfig(lr=0.05), num_clusters=[20, 40])
    after = knn()
    assert after > before + 0.03, f"{name}: kNN {before:.3f} -> {after:.3f}"
    assert len(history) == 2
    assert [h["epoch"] for h in history] == [0, 1]
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in history)
    assert history[-1]["lr"] == pytest.approx(0.0, abs=1e-9)  # cosine schedule ends at 0
    if name == "pcl":
        assert "loss_proto" not in history[0] and history[0]["estep_s"] == 0.0  # warm-up epoch
        assert "loss_proto" in history[1] and history[1]["loss_proto"] > 0
        assert history[1]["estep_s"] > 0
        assert history[1]["loss"] == pytest.approx(history[1]["loss_info_nce"] + history[1]["loss_proto"])
    if name in ("moco", "pcl"):
        # the queue was filled by the keys of 2 epochs x 21 steps x 64
        assert int(m.queue.ptr) == (2 * 21 * 64) % 256
        torch.testing.assert_close(m.queue.keys.norm(dim=1), torch.ones(256))


def test_nan_loss_names_epoch_and_step(digits):
    tr, _ = digits
    torch.manual_seed(0)
    m = build_method("simclr", build_backbone("convnet", 1, 8), view_spec("digits"), **_BASE)
    with torch.no_grad():
        m.backbone.stages[0][0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError, match="epoch 0 step 0"):
        fit(m, tr.subset(range(128)), epochs=1, batch_size=64)
    assert issubclass(NonFiniteLossError, FloatingPointError)


def test_epoch_batches_shards():
    n, bs = 103, 10
    r0 = epoch_batches(n, bs, epoch=3, seed=7, rank=0, world_size=2)
    r1 = epoch_batches(n, bs, epoch=3, seed=7, rank=1, world_size=2)
    assert len(r0) == len(r1) == 5  # 51 (rank 1) // 10; rank 0's 52 also give 5
    assert all(len(b) == bs for b in r0 + r1)
    s0, s1 = set(torch.cat(r0).tolist()), set(torch.cat(r1).tolist())
    assert len(s0) == len(s1) == 50
    assert not s0 & s1
    assert {i % 2 for i in s0} == {0} and {i % 2 for i in s1} == {1}  # fixed shards (memory banks)
    assert (s0 | s1) <= set(range(n))
    # reproducible from (seed, epoch); a different epoch reshuffles
    again = epoch_batches(n, bs, epoch=3, seed=7, rank=0, world_size=2)
    assert all(torch.equal(a, b) for a, b in zip(r0, again, strict=True))
    other = epoch_batches(n, bs, epoch=4, seed=7, rank=0, world_size=2)
    assert not all(torch.equal(a, b) for a, b in zip(r0, other, strict=True))
    # one rank covers everything but the dropped remainder
    single = torch.cat(epoch_batches(n, bs, epoch=0, seed=0))
    assert len(single) == 100 and len(set(single.tolist())) == 100
    with pytest.raises(ValueError, match="batch size 60"):
        epoch_batches(n, 60, epoch=0, seed=0, rank=0, world_size=2)


def test_encode_is_eval_mode_and_restores(digits):
    _, te = digits
    torch.manual_seed(0)
    m = build_method("moco", build_backbone("convnet", 1, 8), view_spec("digits"), **_MOCO)
    m.train()
    feats = encode(m.cluster_embed, te.images[:50], m, batch_size=16)
    assert m.training
    assert feats.shape == (50, 128)
    torch.testing.assert_close(torch.from_numpy(feats).norm(dim=1), torch.ones(50))
    # eval mode: BatchNorm uses running stats, so a row does not depend on its batch mates
    alone = encode(m.cluster_embed, te.images[:1], m)
    torch.testing.assert_close(torch.from_numpy(alone[0]), torch.from_numpy(feats[0]), atol=1e-5, rtol=0)
    assert F.normalize(torch.from_numpy(encode(m.embed, te.images[:4], m)), dim=1).shape == (4, 256)


def test_bf16_autocast_trains_with_float32_weights(digits):
    tr, te = digits
    torch.manual_seed(0)
    m = build_method("simclr", build_backbone("convnet", 1, 8), view_spec("digits"))
    seen = []
    m.backbone.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    history = fit(m, tr, epochs=1, batch_size=64, optim=OptimConfig(precision="bf16"))
    assert torch.bfloat16 in seen  # the forward really ran in bfloat16
    assert all(p.dtype == torch.float32 for p in m.parameters())
    assert math.isfinite(history[0]["loss"])
    with pytest.raises(ValueError, match="optim.precision"):
        fit(m, tr, epochs=1, batch_size=64, optim=OptimConfig(precision="fp16"))


def test_bf16_encode_runs_in_bf16_and_returns_float32(digits):
    """The E-step's encode follows optim.precision; its features stay close to fp32's."""
    _, te = digits
    torch.manual_seed(0)
    m = build_method("moco", build_backbone("convnet", 1, 8), view_spec("digits"), queue_size=256)
    seen = []  # cluster_embed runs the momentum encoder, a copy of the backbone
    m.encoder_k[0].register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    full = encode(m.cluster_embed, te.images[:64], m)
    assert seen and set(seen) == {torch.float32}
    seen.clear()
    half = encode(m.cluster_embed, te.images[:64], m, precision="bf16")
    assert set(seen) == {torch.bfloat16} and half.dtype == np.float32
    cosine = F.cosine_similarity(torch.from_numpy(full), torch.from_numpy(half), dim=1)
    assert cosine.min() > 0.98
    with pytest.raises(ValueError, match="optim.precision"):
        encode(m.cluster_embed, te.images[:4], m, precision="fp16")


@pytest.mark.parametrize(("name", "hparams", "named"), [
    ("swav", {"num_prototypes": 20, "proj_hidden_dim": 64}, "method.epsilon"),
    ("simclr", _BASE, "method.temperature"),
    ("byol", {"proj_hidden_dim": 64, "pred_hidden_dim": 64}, "lower optim.lr"),
])
def test_nan_stop_names_the_settings_of_the_method_that_stopped(digits, name, hparams, named):
    """The advice comes from the method's own constructor: SwAV's Sinkhorn epsilon, SimCLR's
    temperature; BYOL has neither and gets the learning rate alone."""
    tr, _ = digits
    m = build_method(name, build_backbone("convnet", 1, 8), view_spec("digits"), **hparams)
    with torch.no_grad():
        m.backbone.stages[0][0].weight.fill_(float("nan"))
    with pytest.raises(NonFiniteLossError) as info:
        fit(m, tr.subset(range(128)), epochs=1, batch_size=64)
    assert named in str(info.value)
    if name == "byol":
        assert "temperature" not in str(info.value)
