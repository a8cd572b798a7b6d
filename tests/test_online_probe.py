"""The online linear probe (``methods.evaluation.online_probe``): it never changes the encoder (parameters,
BatchNorm buffers and the global RNG bit-identical with and without it), every method exposes
the feature its ``embed`` computes, the probe learns digits, it is off without labels, and
through Ray two workers keep identical probes and log ``probe_holdout`` every epoch."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from methods.evaluation.online_probe import OnlineProbe, embedding_dim, probe_features
from methods.training import encode, epoch_batches, make_optimizer, memory_batches, train_epoch
from orchestration.builders import load_splits, make_method
from orchestration.config import load_config
from orchestration.shards import MemoryShard

ROOT = Path(__file__).resolve().parents[1]
BATCH = 32
# tiny versions of every method (test_zoo_ray's sizes); pcl is tiny_digits.yaml's own
METHODS = {
    "pcl": None,
    "simclr": "{name: simclr, proj_hidden_dim: 64}",
    "moco": "{name: moco, queue_size: 256, proj_hidden_dim: 64, bn_splits: 2}",
    "supcon": "{name: supcon, proj_hidden_dim: 64}",
    "byol": "{name: byol, proj_hidden_dim: 64, proj_dim: 32, pred_hidden_dim: 64}",
    "simsiam": "{name: simsiam, proj_hidden_dim: 64, proj_dim: 64, pred_hidden_dim: 32}",
    "moco_v3": "{name: moco_v3, proj_hidden_dim: 64, proj_dim: 32, pred_hidden_dim: 64}",
    "swav": ("{name: swav, num_prototypes: 30, proj_hidden_dim: 64, num_local_crops: 2, "
             "queue_length: 64}"),
    "dino": "{name: dino, out_dim: 64, hidden_dim: 64, bottleneck_dim: 32, num_local_crops: 2}",
    "instdisc": "{name: instdisc, num_negatives: 64}",
    "cmc": "{name: cmc, temperature: 0.2}",
    "cpc": "{name: cpc, prediction_steps: 2, image_size: 16}",
    "selfcon": "{name: selfcon, proj_hidden_dim: 64}",
    "supervised": "{name: supervised}",
    "icl_msr": "{name: simclr, proj_hidden_dim: 64, regularizer: icl_msr, second_order: false}",
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread (as test_methods): two OpenMP threads on a shared 2-core machine spin
    on each other and tiny convolutions run many times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(name: str = "pcl", *overrides: str):
    method = [f"method={METHODS[name]}"] if METHODS[name] else []
    return load_config(ROOT / "configs" / "tiny_digits.yaml",
                       [*method, f"optim.batch_size={BATCH}", "scaling.num_workers=1", *overrides])


def _train(cfg, with_probe: bool, steps: int, epochs: int = 1):
    """The method built as the workers build it, ``epochs`` x ``steps`` batches of digits through
    ``train_epoch``; returns (method, probe or None, splits, the global RNG state after)."""
    splits = load_splits(cfg)
    method = make_method(cfg, splits.train.in_channels, splits.train.image_size)
    method.bind_data(len(splits.train))
    optimizer, scheduler = make_optimizer(method, cfg.optim.training(), steps, epochs)
    probe = None
    if with_probe:
        dim = embedding_dim(method, splits.train.in_channels, splits.train.image_size)
        probe = OnlineProbe(dim, int(splits.train.labels.max()) + 1, seed=cfg.seed)
    for epoch in range(epochs):
        index = epoch_batches(len(splits.train), BATCH, epoch, cfg.seed)[:steps]
        train_epoch(method, memory_batches(splits.train, index), steps, optimizer, scheduler,
                    epoch, total_epochs=epochs, probe=probe)
    return method, probe, splits, torch.get_rng_state()


@pytest.mark.parametrize("name", ["pcl", "byol", "swav", "dino", "cmc", "cpc"])
def test_encoder_is_bit_identical_with_and_without_the_probe(name):
    cfg = _config(name)
    plain, _, _, rng_plain = _train(cfg, with_probe=False, steps=3)
    probed, probe, _, rng_probed = _train(cfg, with_probe=True, steps=3)
    before, after = plain.state_dict(), probed.state_dict()
    assert before.keys() == after.keys()
    assert any("running_mean" in key for key in before)  # BatchNorm statistics are compared too
    for key in before:
        assert torch.equal(before[key], after[key]), f"{name}: {key} differs"
    assert torch.equal(rng_plain, rng_probed)  # the probe drew nothing from the global RNG
    assert probe.linear.weight.abs().sum() > 0


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_exposes_what_embed_computes(name):
    """The training step's exposed feature has embed's width, one row per image (so the probe
    never needs the eval-mode fallback forward)."""
    cfg = _config(name)
    splits = load_splits(cfg)
    method = make_method(cfg, splits.train.in_channels, splits.train.image_size)
    method.bind_data(len(splits.train))
    batch = next(memory_batches(splits.train, [torch.arange(BATCH)]))
    method.train()
    method.training_step(batch)
    exposed = method.pop_probe_feature()
    assert exposed is not None and not exposed.requires_grad
    dim = embedding_dim(method, splits.train.in_channels, splits.train.image_size)
    assert exposed.shape == (BATCH, dim)
    assert method.pop_probe_feature() is None  # forgotten once read


def test_probe_learns_digits():
    cfg = _config("pcl")
    method, probe, splits, _ = _train(cfg, with_probe=True, steps=45, epochs=3)
    features = torch.from_numpy(encode(method.embed, splits.holdout.images, method,
                                       native_size=True))
    accuracy = probe.accuracy(features, splits.holdout.labels)
    assert accuracy > 0.6, f"probe accuracy {accuracy:.3f} on 10 classes"


def test_probe_is_off_and_training_unharmed_without_labels():
    from orchestration.worker import _make_probe

    cfg = _config("pcl")
    splits = load_splits(cfg)
    unlabelled = replace(splits, train=replace(splits.train, labels=torch.full_like(
        splits.train.labels, -1)), holdout=replace(splits.holdout, labels=torch.full_like(
            splits.holdout.labels, -1)))
    shard = MemoryShard(unlabelled, BATCH, cfg.seed, 0, 1)
    method = make_method(cfg, shard.in_channels, shard.image_size)
    assert shard.num_classes() == 0 and _make_probe(cfg, shard, method, "cpu") is None
    assert _make_probe(cfg, MemoryShard(splits, BATCH, 0, 0, 1), method, "cpu") is not None
    off = _config("pcl", "optim.online_probe=false")
    assert _make_probe(off, MemoryShard(splits, BATCH, 0, 0, 1), method, "cpu") is None

    # a probe given unlabelled batches anyway: no step, no metric, no error
    method.bind_data(len(splits.train))
    optimizer, scheduler = make_optimizer(method, cfg.optim.training(), 2, 1)
    probe = OnlineProbe(embedding_dim(method, 1, 8), 10)
    start = probe.linear.weight.clone()
    out = train_epoch(method, shard.batches(0), 2, optimizer, scheduler, 0, probe=probe)
    assert "probe_loss" not in out and math.isfinite(out["loss"])
    assert torch.equal(probe.linear.weight, start)
    assert math.isnan(probe.accuracy(torch.randn(4, start.shape[1]), torch.full((4,), -1)))


def test_probe_checkpoint_round_trip_continues_identically(tmp_path):
    g = torch.Generator().manual_seed(0)
    features, labels = torch.randn(16, 8, generator=g), torch.randint(0, 3, (16,), generator=g)
    probe = OnlineProbe(8, 3, seed=1)
    probe.step(features, labels)
    torch.save(probe.checkpoint_state(), tmp_path / "probe.pt")
    resumed = OnlineProbe(8, 3, seed=99)
    resumed.load_checkpoint_state(torch.load(tmp_path / "probe.pt", weights_only=True))
    assert probe.step(features, labels) == resumed.step(features, labels)  # momentum restored
    assert torch.equal(probe.linear.weight, resumed.linear.weight)


def test_fallback_forward_leaves_batchnorm_statistics_alone():
    cfg = _config("pcl")
    splits = load_splits(cfg)
    method = make_method(cfg, splits.train.in_channels, splits.train.image_size).train()
    before = {k: v.clone() for k, v in method.state_dict().items()}
    features = probe_features(method, splits.train.images[:BATCH])  # nothing exposed yet
    assert features.shape[0] == BATCH and method.training
    assert all(torch.equal(before[k], v) for k, v in method.state_dict().items())
