"""Reliability of the Ray side on a real local cluster with tiny data (digits, 3 epochs)."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from mlflow.tracking import MlflowClient

from methods.clustering.prototypes import Prototypes
from orchestration.config import load_config
from orchestration.run import TrainingStopped, train
from tests.conftest import ROOT
from tests.faults import Faults

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def pcl_run(ray_cluster, tmp_path_factory):
    """One run of the tiny PCL config (2 workers, 3 epochs, final evaluation) for the tests that
    only read what it left: each Ray Train run costs tens of seconds on 2 cores."""
    tmp = tmp_path_factory.mktemp("pcl")
    cfg = load_config(ROOT / "configs" / "tiny_digits.yaml", [
        f"tracking.tracking_uri=sqlite:///{tmp}/mlruns.db", f"tracking.storage_path={tmp}/ray"])
    return train(cfg, plugins=[Faults(probe_dir=str(tmp))]), tmp


def _history(summary, key: str) -> list[tuple[int, float]]:
    client = MlflowClient(summary.tracking_uri)
    return sorted((m.step, m.value) for m in client.get_metric_history(summary.run_id, key))


def _artifacts(summary) -> set[str]:
    client = MlflowClient(summary.tracking_uri)
    out, stack = set(), [""]
    while stack:
        for item in client.list_artifacts(summary.run_id, stack.pop() or None):
            (stack.append(item.path) if item.is_dir else out.add(item.path))
    return out


def test_pcl_two_workers_share_prototypes_and_log_everything(pcl_run):
    summary, tmp_path = pcl_run

    # every epoch after the warm-up: one E-step, one ObjectRef, fetched by both ranks
    assert sorted(summary.estep_log) == [1, 2]
    for entry in summary.estep_log.values():
        assert sorted(entry["ranks"]) == [0, 1]
    assert len({e["ref"] for e in summary.estep_log.values()}) == 2  # a new E-step each epoch

    losses = _history(summary, "loss")
    assert [step for step, _ in losses] == [0, 1, 2]
    assert all(math.isfinite(v) for _, v in losses)
    assert [s for s, _ in _history(summary, "loss_proto")] == [1, 2]
    assert [s for s, _ in _history(summary, "knn_holdout")] == [0, 1, 2]
    assert summary.metrics["test_knn"] > 0.5 and summary.metrics["pixels_knn"] > 0.5
    assert {"config.yaml", "estep_log.json", "plots/embedding_by_label.png",
            "plots/embedding_by_cluster.png", "plots/prototype_neighbours.png",
            "checkpoint/final_checkpoint.pt"} <= _artifacts(summary)

    # the checkpoint loads with weights_only=True and carries the last prototypes
    state = torch.load(Path(summary.checkpoint) / "state.pt", weights_only=True)
    assert state["epoch"] == 2
    protos = Prototypes.from_state_dict(state["prototypes"])
    assert protos.num_clusters == [20, 40] and protos.epoch == 2
    assert np.isclose(protos.density[0].mean(), 0.2, atol=1e-5)

    # the online linear probe: logged every epoch, the same on both ranks and in the checkpoint
    probe = _history(summary, "probe_holdout")
    assert [step for step, _ in probe] == [0, 1, 2] and all(0.1 < v <= 1.0 for _, v in probe)
    assert _history(summary, "probe_loss")
    ranks = [torch.load(tmp_path / f"probe_rank_{r}.pt", weights_only=True) for r in (0, 1)]
    for key, value in ranks[0].items():
        assert torch.equal(value, ranks[1][key]), f"rank 1's probe {key} differs from rank 0's"
        assert torch.equal(value, state["probe"]["model"][key])  # what a resumed run restores


def test_eval_cli_reads_a_checkpoint_directory_with_the_sgd_protocol(pcl_run, capsys):
    from orchestration.cli import main

    summary, _ = pcl_run
    assert main(["eval", summary.checkpoint, "--protocol", "sgd", "--epochs", "1",
                 "--no-pixels"]) == 0
    out = capsys.readouterr().out
    accuracy = float(out.split("linear (sgd protocol, 1 epochs): ")[1].split()[0])
    assert 0.3 < accuracy <= 1.0


def test_killed_worker_and_killed_actor_are_recovered(ray_cluster, tiny_config, tmp_path):
    """A Train worker SIGKILLed after epoch 0 and the prototype actor killed during epoch 1's
    E-step (gathering), in one run: Ray restarts each and the run finishes every epoch once."""
    summary = train(tiny_config("clustering.strategy=gather"), evaluate=False,
                    plugins=[Faults(kill_worker_epoch=0, kill_rank=1, kill_actor_epoch=1,
                            marker_dir=str(tmp_path))])
    assert (tmp_path / "worker_killed").exists() and (tmp_path / "actor_killed").exists()
    assert [step for step, _ in _history(summary, "loss")] == [0, 1, 2]  # none logged twice
    assert torch.load(Path(summary.checkpoint) / "state.pt", weights_only=True)["epoch"] == 2
    _check_estep_redone(summary)


def test_sharded_estep_survives_its_actor_and_a_worker_killed_mid_estep(ray_cluster, tiny_config,
                                                                         tmp_path):
    """Sharded k-means: the actor dies at the start of epoch 1's E-step; in epoch 2's, rank 1
    dies as it enters Lloyd iteration 1 of the second granularity (half-way: by then epoch 1's
    checkpoint is registered), where rank 0 contributes and waits for it. The
    restarted workers redo epoch 2 from its checkpoint: the finished rounds come back from the
    actor as they were (none is reduced twice), a stale contribution is replaced, and the run
    ends with every epoch once."""
    summary = train(tiny_config("clustering.strategy=sharded"), evaluate=False,
                    plugins=[Faults(kill_actor_epoch=1, kill_round=("iter", 2, 1, 0, 1),
                            kill_rank=1, marker_dir=str(tmp_path))])
    assert (tmp_path / "actor_killed").exists() and (tmp_path / "worker_killed_in_round").exists()
    assert [step for step, _ in _history(summary, "loss")] == [0, 1, 2]
    assert sorted(summary.estep_log[2]["ranks"]) == [0, 1]
    assert summary.estep_log[2]["rounds"] == summary.estep_log[1]["rounds"]
    _check_estep_redone(summary)


def _check_estep_redone(summary) -> None:
    # both ranks took the same final round's result: the same prototypes on every worker
    assert summary.estep_log[1]["ref"] and summary.estep_log[2]["encoded"] == 1347 - 200
    # the restarted actor lost its state, the workers resubmitted, epoch 1's E-step was redone
    assert 1 in summary.estep_log and sorted(summary.estep_log[1]["ranks"]) == [0, 1]
    assert [s for s, _ in _history(summary, "loss_proto")] == [1, 2]


def test_nan_loss_stops_and_keeps_last_good_checkpoint(ray_cluster, tiny_config, tmp_path):
    with pytest.raises(TrainingStopped, match=r"epoch 1 step 0") as info:
        train(tiny_config(), evaluate=False, plugins=[Faults(nan_epoch=1)])
    message = str(info.value)
    checkpoint = Path(message.split("last good checkpoint: ")[1])
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


ICL_PCL = ("{name: pcl, regularizer: icl_msr, temperature: 0.2, momentum: 0.9, queue_size: 256, "
           "proj_hidden_dim: 128, num_negative_prototypes: 64, warmup_epochs: 1, lambda_: 0.5, "
           "num_semantics: 2, second_order: false}")


@pytest.mark.parametrize("method", [ICL_PCL, "{name: selfcon, proj_hidden_dim: 128}"],
                         ids=["icl_msr_on_pcl", "selfcon_s"])
def test_two_workers_train_icl_msr_and_selfcon(ray_cluster, tiny_config, method):
    """ICL-MSR's meta step (its own optimiser and all-reduce beside DDP) and SelfCon's two exits
    through Ray Train with two workers."""
    from orchestration.builders import make_method

    cfg = tiny_config(f"method={method}", "optim.epochs=2")
    summary = train(cfg, evaluate=False)
    losses = _history(summary, "loss")
    assert [step for step, _ in losses] == [0, 1] and all(math.isfinite(v) for _, v in losses)
    assert [s for s, _ in _history(summary, "knn_holdout")] == [0, 1]
    state = torch.load(Path(summary.checkpoint) / "state.pt", weights_only=True)["model"]
    if "icl_msr" in method:
        assert [s for s, _ in _history(summary, "loss_msr")] == [0, 1]
        assert [s for s, _ in _history(summary, "loss_proto")] == [1]  # the PCL base's E-step ran
        initial = make_method(cfg, 1, 8).state_dict()
        moved = [k for k in state if k.startswith("f_msr.") and not torch.equal(state[k], initial[k])]
        assert moved, "the meta step never updated f_msr"


def _check_logged_encoder(summary) -> None:
    """The run's MLflow model maps uint8 images to the embeddings protoray's encoder gives."""
    import mlflow.pytorch

    from orchestration.export import load_checkpoint

    mlflow.set_tracking_uri(summary.tracking_uri)
    model = mlflow.pytorch.load_model(f"runs:/{summary.run_id}/encoder")
    loaded, _ = load_checkpoint(Path(summary.checkpoint) / "state.pt")
    images = torch.randint(0, 256, (4, loaded.channels, loaded.side, loaded.side), dtype=torch.uint8)
    views = loaded.method.views
    with torch.no_grad():
        expected = loaded.method.embed((images.float() / 255 - views.mean) / views.std)
        torch.testing.assert_close(model(images), expected, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(model(images.float() / 255), expected, atol=1e-5, rtol=1e-5)
    assert expected.shape == (4, loaded.method.backbone.feature_dim)


def test_simclr_run_starts_no_prototype_actor_and_is_named_and_tagged(pcl_run, tiny_config):
    """A method that never clusters gets no prototype actor (nor its CPU); the MLflow run is
    named <method>-<dataset>, tagged, and has the dataset as its input. ``1e-1`` is a float."""
    from ray.util.state import list_actors

    before = {a.actor_id for a in list_actors(filters=[("class_name", "=", "PrototypeService")],
                                              raise_on_missing_output=False)}
    assert before, "the query does not see the PCL run's actor"  # so it would see SimCLR's
    cfg = tiny_config("method={name: simclr, proj_hidden_dim: 128}", "method.temperature=1e-1",
                      "optim.epochs=1")
    summary = train(cfg, evaluate=False)
    after = {a.actor_id for a in list_actors(filters=[("class_name", "=", "PrototypeService")],
                                             raise_on_missing_output=False)}
    assert after == before and summary.estep_log == {}
    run = MlflowClient(summary.tracking_uri).get_run(summary.run_id)
    assert run.info.run_name == "simclr-digits"
    assert {"method": "simclr", "dataset": "digits", "backbone": "convnet",
            "regularizer": "none"}.items() <= run.data.tags.items()
    assert run.data.params["method.temperature"] == "0.1"
    [dataset] = run.inputs.dataset_inputs
    assert dataset.dataset.name == "digits"
    assert [s for s, _ in _history(summary, "loss")] == [0]
    _check_logged_encoder(summary)

