"""Population-based training: the space PBT can take, a restart from another run's checkpoint
starting from its weights, and a PBT sweep on a real local cluster that exploits and records it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient
from ray import tune

from orchestration.checkpoints import CHECKPOINT_FILE, load_state
from orchestration.config import ConfigError
from orchestration.pbt import check_pbt_space
from orchestration.run import execute, train
from orchestration.sweep import run_sweep
from tests.faults import Faults


@pytest.mark.parametrize("space, interval, search, fragment", [
    ({"method.temperature": tune.uniform(0.1, 0.5)}, 1, "optuna", "--search optuna"),
    ({"method.temperature": tune.uniform(0.1, 0.5)}, 0, "random", "--perturbation-interval 0"),
    ({"method.temperature": tune.uniform(0.1, 0.5)}, 3, "random", "--perturbation-interval 3"),
    ({"method.queue_size": tune.choice([64, 128])}, 1, "random", "method.queue_size"),
    ({"model.backbone": tune.choice(["convnet", "resnet18"])}, 1, "random", "model.backbone"),
    ({"optim.batch_size": tune.choice([32, 64])}, 1, "random", "optim.batch_size"),
    ({"optim.lr": tune.sample_from(lambda _: 0.1)}, 1, "random", "optim.lr"),
])
def test_pbt_refuses_what_it_cannot_perturb(space, interval, search, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        check_pbt_space(space, interval, 3, search)


def test_pbt_takes_rates_temperatures_and_cluster_counts():
    check_pbt_space({"optim.lr": tune.loguniform(0.01, 0.1), "method.temperature": tune.choice([0.1, 0.2]),
                     "clustering.num_clusters": tune.choice([[10], [20]]), "optim.epochs": 3,
                     "method.proto_weight": tune.grid_search([0.5, 1.0])}, 1, 3, "random")


def test_run_sweep_refuses_a_pbt_space_before_ray(tiny_config):
    cfg = tiny_config("optim.epochs=3")
    with pytest.raises(ConfigError, match="method.queue_size"):
        run_sweep(cfg, {"method.queue_size": tune.choice([64, 128])}, scheduler="pbt")


def test_a_run_from_a_donor_checkpoint_starts_from_its_weights(ray_cluster, tiny_config, tmp_path):
    """What an exploited trial runs: a new Train run from another run's checkpoint, with a new
    lr. Its first epoch is the donor's next one and starts from the donor's weights."""
    donor_cfg = tiny_config("scaling.num_workers=1", "optim.epochs=1")
    donor = train(donor_cfg, evaluate=False)
    state = load_state(Path(donor.checkpoint) / CHECKPOINT_FILE)

    cfg = tiny_config("scaling.num_workers=1", "optim.epochs=2", "optim.lr=0.2")
    uri = cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    run_id = client.create_run(client.get_experiment_by_name(cfg.tracking.experiment_name)
                               .experiment_id).info.run_id
    weights = tmp_path / "weights"
    weights.mkdir()
    execute(cfg, run_id, uri, evaluate=False, plugins=(Faults(weights_dir=str(weights)),),
            name="exploit", initial_checkpoint=donor.checkpoint)

    assert sorted(p.name for p in weights.iterdir()) == ["epoch_1.pt"]  # epoch 0 was the donor's
    started = torch.load(weights / "epoch_1.pt")
    for key, value in state["model"].items():
        torch.testing.assert_close(started[key], value, msg=key)
    assert [m.step for m in client.get_metric_history(run_id, "knn_holdout")] == [1]


def test_pbt_sweep_exploits_the_better_trial_and_records_it(ray_cluster, tiny_config):
    # Two trials, one perturbation point (epoch 2 of 3, both paused there): the lower one takes
    # the other's checkpoint and a perturbed lr, and trains the last epoch from it.
    cfg = tiny_config("scaling.num_workers=1", "optim.epochs=3")
    table = run_sweep(cfg, {"optim.lr": tune.grid_search([0.001, 0.05])}, num_samples=1,
                      scheduler="pbt", perturbation_interval=2, max_concurrent_trials=2,
                      evaluate=False, seed=0)
    print(table.to_string())
    assert list(table["status"]) == ["finished", "finished"]

    uri = cfg.tracking.tracking_uri
    client = MlflowClient(uri)
    runs = {row["mlflow_run_id"]: row for _, row in table.iterrows()}
    exploits = [(run_id, json.loads(v)) for run_id in runs
                for k, v in client.get_run(run_id).data.tags.items() if k.startswith("exploit_e")]
    assert len(exploits) == 1, "one trial is exploited at the one perturbation point"
    for run_id, exploit in exploits:
        assert exploit["donor_run_id"] in runs and exploit["donor_run_id"] != run_id
        epoch = exploit["donor_epoch"] + 1  # the first epoch trained from the donor's weights
        assert f"exploit_e{epoch}" in client.get_run(run_id).data.tags
        lr = {m.step: m.value for m in client.get_metric_history(run_id, "pbt/optim.lr")}
        assert lr[epoch] == pytest.approx(exploit["values"]["optim.lr"])
        assert epoch in [m.step for m in client.get_metric_history(run_id, "knn_holdout")]
        trial = runs[run_id]["trial_id"]
        donor = runs[exploit["donor_run_id"]]["trial_id"]
        sweep_dir = next(Path(cfg.tracking.storage_path).glob("sweep-*"))
        assert (sweep_dir / "train" / f"trial-{trial}-from-{donor}-e{epoch - 1}").is_dir()
    parent = client.get_run(client.get_run(exploits[0][0]).data.tags["mlflow.parentRunId"])
    assert parent.data.tags["scheduler"] == "pbt" and parent.data.tags["best_run_id"] in runs
