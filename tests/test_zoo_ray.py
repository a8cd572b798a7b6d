"""BYOL, SimSiam, MoCo v3, SwAV, DINO, CMC and CPC through Ray Train with two workers (DDP on
gloo) on digits: two epochs each, beating the same encoder's kNN at initialisation; BYOL and
SimSiam do not collapse.
InstDisc's run, with a worker killed and its bank shard resumed, is in test_instdisc."""

from __future__ import annotations

import math

import pytest
from mlflow.tracking import MlflowClient

from orchestration.builders import load_splits, make_method
from orchestration.run import train
from orchestration.worker import _online_knn

pytestmark = pytest.mark.slow

METHODS = {
    "byol": "{name: byol, momentum: 0.99, proj_hidden_dim: 256, proj_dim: 64, pred_hidden_dim: 256}",
    "simsiam": "{name: simsiam, proj_hidden_dim: 256, proj_dim: 256, pred_hidden_dim: 64}",
    "moco_v3": "{name: moco_v3, proj_hidden_dim: 256, proj_dim: 64, pred_hidden_dim: 256}",
    "swav": ("{name: swav, num_prototypes: 30, proj_hidden_dim: 256, num_local_crops: 2, "
             "queue_length: 128, freeze_prototypes_steps: 5}"),
    "dino": "{name: dino, out_dim: 256, hidden_dim: 256, bottleneck_dim: 64, num_local_crops: 2}",
    "cmc": "{name: cmc, temperature: 0.2}",
    "cpc": "{name: cpc, prediction_steps: 2, image_size: 16}",
}
# the slow starters on digits (see test_zoo); others 2. MoCo v3 after 2 epochs: 0.800 -> 0.785
EPOCHS = {"byol": 8, "cmc": 4, "moco_v3": 4}
# SimSiam at its paper's lr rule, 0.05 x batch / 256 (sec. 4), here the global batch 64. At the
# tiny config's 0.05 it learned or not depending on the seed and on the float path: seeds 0 / 1 / 2
# went 0.800 -> 0.800, 0.840 -> 0.855, 0.765 -> 0.855 after 2 epochs; at 0.0125 0.800 -> 0.925,
# 0.840 -> 0.885, 0.765 -> 0.925.
OPTIM = {"simsiam": ["optim.lr=0.0125"]}


@pytest.mark.parametrize("name", list(METHODS))
def test_two_workers_train_and_beat_random_encoder(ray_cluster, tiny_config, name):
    cfg = tiny_config(f"method={METHODS[name]}", f"optim.epochs={EPOCHS.get(name, 2)}",
                      *OPTIM.get(name, []))
    splits = load_splits(cfg)
    initial = make_method(cfg, splits.train.in_channels, splits.train.image_size)
    random_knn = _online_knn(initial, splits.train, splits.holdout, "cpu")

    summary = train(cfg, evaluate=False)
    client = MlflowClient(summary.tracking_uri)
    history = {key: sorted((m.step, m.value) for m in client.get_metric_history(summary.run_id, key))
               for key in ("loss", "knn_holdout", "embedding_std")}
    assert [s for s, _ in history["loss"]] == list(range(cfg.optim.epochs))
    assert all(math.isfinite(v) for _, v in history["loss"])
    final_knn = history["knn_holdout"][-1][1]
    # BYOL gets 8 epochs: with each view its own BatchNorm batch of 32 (the reference's) it starts
    # slower; after 4 its kNN was still below the random encoder's (0.800 -> 0.780)
    margin = 0.0 if name == "byol" else 0.02
    assert final_knn > random_knn + margin, f"{name}: kNN {random_knn:.3f} at init -> {final_knn:.3f}"
    if name in ("byol", "simsiam"):
        dim = 64 if name == "byol" else 256
        assert all(v > 0.5 / math.sqrt(dim) for _, v in history["embedding_std"])
