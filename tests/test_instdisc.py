"""InstDisc: the NCE loss against the paper's probabilities computed directly, the
sharded memory bank, its per-rank checkpoint files, MoCo's FIFO queue against lightly's
MemoryBankModule, and training on digits in one process and through Ray with two workers
(including a worker killed and resumed with its bank shard)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from lightly.models.modules.memory_bank import MemoryBankModule

from methods.data.datasets import load_digits
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone
from methods.encoders.momentum import FeatureQueue, MemoryBank
from methods.evaluation.knn import knn_accuracy
from methods.losses.contrastive import nce_loss
from methods.registry import build_method
from methods.training import OptimConfig, encode, epoch_batches, fit
from orchestration.builders import load_splits
from orchestration.checkpoints import load_rank_state, save_rank_state
from tests.faults import Faults

# T 0.1 (the authors' CIFAR setting) and a small lr: the NCE gradient sums m noise terms; on
# digits (n = 1,347, 4 epochs) kNN went 0.896 -> 0.871 at lr 0.05, -> 0.951 at lr 0.002
DIGITS = {"temperature": 0.1, "num_negatives": 512}
DIGITS_LR = 0.002


def test_nce_loss_matches_the_papers_probabilities():
    g = torch.Generator().manual_seed(0)
    n, m, t = 1000, 16, 0.07
    f = F.normalize(torch.randn(5, 8, generator=g), dim=1)
    v = F.normalize(torch.randn(5, 8, generator=g), dim=1)  # each anchor's own memory entry
    noise = F.normalize(torch.randn(m, 8, generator=g), dim=1)
    z = 37.5
    expected = 0.0
    for i in range(5):
        p_pos = math.exp(float(f[i] @ v[i]) / t) / z  # eq. 2 with Z fixed
        expected -= math.log(p_pos / (p_pos + m / n))  # eq. 3, P_n = 1 / n
        for j in range(m):
            p_neg = math.exp(float(f[i] @ noise[j]) / t) / z
            expected -= math.log(1 - p_neg / (p_neg + m / n))  # eq. 4's noise term
    got = nce_loss((f * v).sum(1) / t, f @ noise.T / t, math.log(z), n)
    assert got.item() == pytest.approx(expected / 5, rel=1e-5)


def test_memory_bank_shards_by_rank_and_updates_with_momentum():
    g = torch.Generator().manual_seed(0)
    banks = [MemoryBank(4) for _ in range(2)]
    for rank, bank in enumerate(banks):
        bank.allocate(7, rank, 2, g)
    assert [len(b.features) for b in banks] == [4, 3]  # images 0,2,4,6 and 1,3,5
    assert torch.allclose(banks[1].features.norm(dim=1), torch.ones(3))
    old = banks[1].lookup(torch.tensor([5])).clone()
    new = F.normalize(torch.randn(1, 4, generator=g), dim=1)
    banks[1].update(torch.tensor([5]), new, momentum=0.5)
    assert torch.allclose(banks[1].features[2], F.normalize(0.5 * old + 0.5 * new, dim=1)[0])
    with pytest.raises(ValueError, match="outside its shard"):
        banks[1].lookup(torch.tensor([4]))
    with pytest.raises(RuntimeError, match="bind_data"):
        MemoryBank(4).lookup(torch.tensor([0]))
    # the batches a rank is given are exactly the images its bank holds
    for rank in range(2):
        for idx in epoch_batches(7, 3, epoch=1, seed=0, rank=rank, world_size=2):
            banks[rank].lookup(idx)


def test_queue_matches_lightly_memory_bank_fifo():
    """MoCo's queue holds what lightly's MemoryBankModule holds, batch after batch (when the
    size is a multiple of the batch: at a wrap lightly drops the overflow, ours wraps it)."""
    ours, theirs = FeatureQueue(12, 3), MemoryBankModule((12, 3), feature_dim_first=False)
    theirs.bank.copy_(ours.keys)
    g = torch.Generator().manual_seed(0)
    for _ in range(7):
        keys = F.normalize(torch.randn(4, 3, generator=g), dim=1)
        _, bank = theirs(keys, update=True)
        assert torch.equal(bank, ours.keys)  # both return the bank before this batch
        ours.enqueue(keys)
    assert torch.equal(theirs.bank, ours.keys)


def test_rank_state_round_trip_and_worker_count_check(tmp_path):
    tr = load_digits("train")
    m = build_method("instdisc", build_backbone("convnet", 1, 8), view_spec("digits"), **DIGITS)
    m.bind_data(len(tr), rank=1, world_size=2)
    state = m.rank_state()
    assert set(state) == {"bank"} and len(state["bank"]) == len(tr) // 2
    save_rank_state(tmp_path, 1, 2, state)
    fresh = build_method("instdisc", build_backbone("convnet", 1, 8), view_spec("digits"),
                         seed=5, **DIGITS)
    fresh.bind_data(len(tr), rank=1, world_size=2)
    assert not torch.equal(fresh.bank.features, m.bank.features)
    fresh.load_rank_state(load_rank_state(tmp_path, 1, 2))
    assert torch.equal(fresh.bank.features, m.bank.features)
    with pytest.raises(ValueError, match="num_workers: 2"):
        load_rank_state(tmp_path, 1, 3)
    with pytest.raises(FileNotFoundError, match="rank_0.pt"):
        load_rank_state(tmp_path, 0, 2)
    assert build_method("simclr", build_backbone("convnet", 1, 8), view_spec("digits")).rank_state() is None


def test_instdisc_learns_on_digits():
    torch.set_num_threads(1)
    tr, te = load_digits("train"), load_digits("test")
    torch.manual_seed(0)
    m = build_method("instdisc", build_backbone("convnet", 1, 8), view_spec("digits"), **DIGITS)

    def knn() -> float:
        return knn_accuracy(encode(m.embed, tr.images, m), tr.labels.numpy(),
                            encode(m.embed, te.images, m), te.labels.numpy())

    before = knn()
    history = fit(m, tr, epochs=4, batch_size=64, optim=OptimConfig(lr=DIGITS_LR))
    assert all(math.isfinite(h["loss"]) for h in history)
    assert history[-1]["positive_score"] > 0.2  # from ~0: anchors moved toward their entries
    after = knn()
    assert after > before + 0.02, f"kNN {before:.3f} -> {after:.3f}"


@pytest.mark.slow
def test_two_workers_shard_checkpoint_and_resume_the_bank(ray_cluster, tiny_config, tmp_path):
    from mlflow.tracking import MlflowClient

    from orchestration.builders import make_method
    from orchestration.run import train
    from orchestration.worker import _online_knn

    cfg = tiny_config("method={name: instdisc, temperature: 0.1, num_negatives: 512}",
                      f"optim.lr={DIGITS_LR}", "optim.epochs=4")
    splits = load_splits(cfg)
    random_knn = _online_knn(make_method(cfg, 1, 8), splits.train, splits.holdout, "cpu")
    summary = train(cfg, evaluate=False,
                    plugins=[Faults(kill_worker_epoch=0, kill_rank=1, marker_dir=str(tmp_path))])
    assert (tmp_path / "worker_killed").exists()
    knn = sorted((m.step, m.value) for m in
                 MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, "knn_holdout"))
    assert [step for step, _ in knn] == [0, 1, 2, 3]
    assert knn[-1][1] > random_knn + 0.02, f"kNN {random_knn:.3f} at init -> {knn[-1][1]:.3f}"
    directory = Path(summary.checkpoint)
    n = len(splits.train)
    shards = [load_rank_state(directory, r, 2)["bank"] for r in range(2)]
    assert [len(s) for s in shards] == [len(range(r, n, 2)) for r in range(2)]
    for r, shard in enumerate(shards):  # trained rows, not the random initial ones
        init = MemoryBank(shard.shape[1])
        init.allocate(n, r, 2, torch.Generator().manual_seed(cfg.seed * 1000 + r))  # as the worker
        assert (shard * init.features).sum(1).mean() < 0.5
        assert torch.allclose(shard.norm(dim=1), torch.ones(len(shard)), atol=1e-5)
    state = torch.load(directory / "state.pt", weights_only=True)
    assert state["epoch"] == 3 and "bank.features" not in state["model"]  # banks are per rank


def test_cmc_memory_bank_scores_the_other_views_bank_and_updates_both():
    tr = load_digits("train")
    torch.manual_seed(0)
    m = build_method("cmc", build_backbone("convnet", 1, 8), view_spec("digits"), memory_bank=True,
                     num_negatives=64, temperature=0.2)
    m.bind_data(len(tr))
    assert set(m.rank_state()) == {"banks.0", "banks.1"}
    idx = torch.arange(10, 42)
    z = [F.normalize(torch.randn(32, 128), dim=1) for _ in range(2)]
    gen_state = m.generator.get_state()
    loss, _ = m.memory_loss(idx, z)
    # the same draws by hand: view 1 against bank 2's entries and noise, then view 2 against bank 1
    m.generator.set_state(gen_state)
    expected = 0.0
    for view, other in ((0, 1), (1, 0)):
        bank = m.banks[other].features
        noise = bank[torch.randint(len(bank), (64,), generator=m.generator)]
        logits = torch.cat([(z[view] * bank[idx]).sum(1, keepdim=True), z[view] @ noise.T], 1) / 0.2
        expected = expected + F.cross_entropy(logits, torch.zeros(32, dtype=torch.long))
    torch.testing.assert_close(loss, expected)
    before = [b.features.clone() for b in m.banks]
    m.on_step_end()
    for bank, old, new in zip(m.banks, before, z, strict=True):
        torch.testing.assert_close(bank.features[idx], F.normalize(0.5 * old[idx] + 0.5 * new, dim=1))
        untouched = torch.ones(len(old), dtype=torch.bool)
        untouched[idx] = False
        assert torch.equal(bank.features[untouched], old[untouched])
