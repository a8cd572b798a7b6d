"""A real multi-node Ray cluster on this machine: a head that runs no training (it hosts the
prototype actor and the job's driver) and worker nodes as separate raylets, each able to host one
Train worker. Runs are submitted with `ray job submit`, as clusters/local.md describes. The first
run is also the suite's streamed parquet run with its final evaluation."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from methods.data.image_files import list_parquet
from orchestration.write_dataset import write_dataset
from tests.conftest import ROOT
from tests.local_nodes import (
    BIN,
    kill_processes,
    ray_list,
    start_head,
    start_worker,
    submit,
    token_env,
    wait_for_nodes,
)

pytestmark = pytest.mark.slow

# the head gets the actor's resource, each worker node one Train slot: every Train worker and the
# prototype actor land on different nodes
ACTOR, SLOT = {"prototype_actor": 1}, {"train_slot": 1}
PLACEMENT = ["--set", "clustering.actor_resources={prototype_actor: 1}",
             "--set", "scaling.worker_resources={train_slot: 1}"]
EPOCHS = 6  # of the node-loss run


class Nodes:
    """The cluster of this module: head plus worker nodes started and killed one at a time."""

    def __init__(self, tmp: Path):
        self.prefix = f"/tmp/prm{os.getpid()}"  # short: Ray's socket paths stay under 107 bytes
        self.tmp, self.env, self.workers = tmp, token_env(), {}
        self.gcs, self.dashboard = start_head(self.prefix, self.env, num_cpus=1, resources=ACTOR)

    def add(self, name: str) -> None:
        # 2 CPUs: one for the Train worker, one for Ray Data's decoding tasks when streaming
        self.workers[name] = start_worker(self.gcs, f"{self.prefix}{name}", self.env, 2, SLOT,
                                          self.tmp / f"node-{name}.log")

    def kill(self, name: str) -> None:
        """A lost machine: SIGKILL for the node's `ray start`, raylet and workers, no clean-up."""
        self.workers.pop(name).kill()
        kill_processes(f"{self.prefix}{name}")

    def close(self) -> None:
        for name in list(self.workers):
            self.kill(name)
        kill_processes(self.prefix)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory):
    cluster = Nodes(tmp_path_factory.mktemp("nodes"))
    try:
        cluster.add("a")
        cluster.add("b")
        wait_for_nodes(cluster.dashboard, cluster.env, alive=3)
        yield cluster
    finally:
        cluster.close()


def _train_args(tmp_path: Path, *more: str) -> list[str]:
    # absolute paths: the job runs in an unpacked copy of the repository; one filesystem here
    # stands for the shared storage (NFS, S3) a real cluster needs
    return ["protoray", "train", "configs/tiny_digits.yaml", *PLACEMENT,
            "--set", f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db",
            "--set", f"tracking.storage_path={tmp_path}/shared", *more]


def _only_run(tmp_path: Path):
    client = MlflowClient(f"sqlite:///{tmp_path}/mlruns.db")
    (run,) = client.search_runs([client.get_experiment_by_name("tiny").experiment_id])
    return client, run


def _actor_nodes(nodes: Nodes, class_name: str) -> list[str]:
    return [a["node_id"] for a in ray_list("actors", nodes.dashboard, nodes.env)
            if a["class_name"] == class_name]


def test_streamed_parquet_trains_across_nodes(nodes, tmp_path):
    """Parquet files on the shared path streamed by Ray Data to workers on two nodes, the E-step
    on the head, the final evaluation on the files' val/ split."""
    source = write_dataset("digits", tmp_path / "digits", fmt="parquet", rows_per_group=100)
    done = submit(nodes.dashboard, nodes.env, _train_args(
        tmp_path, "--set", "data.name=parquet", "--set", f"data.root={source}",
        "--set", "data.loader=stream", "--set", "data.views=small", "--set", "optim.epochs=2"),
        cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    client, run = _only_run(tmp_path)
    assert run.info.status == "FINISHED" and run.data.tags["loader"] == "stream"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == [0, 1]
    assert run.data.metrics["skipped_images"] == 0 and run.data.metrics["test_knn"] > 0.5
    estep_log = json.loads(Path(client.download_artifacts(
        run.info.run_id, "estep_log.json", str(tmp_path))).read_text())
    holdout = len(list_parquet(source / "train")) - estep_log["1"]["encoded"]
    assert 200 <= holdout < 300  # whole row groups of 100 held out for the online kNN
    head = next(n["node_id"] for n in ray_list("nodes", nodes.dashboard, nodes.env)
                if n["is_head_node"])
    workers = _actor_nodes(nodes, "RayTrainWorker")
    assert len(set(workers)) == 2 and head not in workers  # one per worker node
    assert set(_actor_nodes(nodes, "PrototypeService")) == {head}


def test_losing_a_worker_node_resumes_on_a_node_added_back(nodes, tmp_path):
    before = {n["node_id"] for n in ray_list("nodes", nodes.dashboard, nodes.env)}
    MlflowClient(f"sqlite:///{tmp_path}/mlruns.db").search_experiments()  # tables made once
    submission = f"protoray-node-loss-{os.getpid()}"
    done = submit(nodes.dashboard, nodes.env,
                  _train_args(tmp_path, "--set", f"optim.epochs={EPOCHS}"), cwd=ROOT,
                  submission_id=submission)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    # lose node a as soon as the first checkpoint is on the shared path: a file poll is quick,
    # and 6 epochs leave the run mid-way whatever this machine's speed
    deadline, shared = time.time() + 300, tmp_path / "shared"
    while time.time() < deadline and not list(shared.rglob("state.pt")):
        time.sleep(0.1)
    assert list(shared.rglob("state.pt")), "no checkpoint was written"
    nodes.kill("a")
    nodes.add("c")
    client, run = _only_run(tmp_path)
    logged = client.get_metric_history(run.info.run_id, "loss")
    assert len(logged) < EPOCHS, "the run ended before the node was lost"

    follow = subprocess.run([BIN / "ray", "job", "logs", submission, "--follow", "--address",
                             nodes.dashboard], env=nodes.env, capture_output=True, text=True,
                            timeout=600)
    # `ray job logs --follow` ends with the job's terminal status
    assert f"Job '{submission}' succeeded" in follow.stdout + follow.stderr, follow.stdout[-3000:]

    client, run = _only_run(tmp_path)
    assert run.info.status == "FINISHED" and "test_knn" in run.data.metrics
    assert [m.step for m in client.get_metric_history(run.info.run_id, "loss")] == list(range(EPOCHS))
    added = {n["node_id"] for n in ray_list("nodes", nodes.dashboard, nodes.env)} - before
    assert added & set(_actor_nodes(nodes, "RayTrainWorker"))  # a worker restarted on node c
    assert list((tmp_path / "shared").rglob("state.pt"))  # checkpoints on the shared path
