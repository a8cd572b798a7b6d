"""`ray job submit --working-dir . -- protoray train configs/tiny_digits.yaml` against a real head
node on loopback, with token authentication on, as clusters/local.md describes."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
pytestmark = pytest.mark.slow


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _kill_cluster(temp_dir: str) -> None:
    """Stop only this head's processes (`ray stop` would also stop the session's test cluster)."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="ignore")
        except OSError:
            continue
        if temp_dir in cmdline and int(pid) != os.getpid():
            with contextlib.suppress(ProcessLookupError):
                os.kill(int(pid), signal.SIGKILL)


@pytest.fixture
def head_node():
    temp_dir = f"/tmp/prj{os.getpid()}"  # short: Ray's socket paths must stay under 107 bytes
    shutil.rmtree(temp_dir, ignore_errors=True)
    gcs, dash, agent, agent_grpc, runtime_env, metrics, client, node_mgr, obj_mgr = _free_ports(9)
    # token auth on, with a token of this test's own (head, job client and job all share it)
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    subprocess.run(
        [BIN / "ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--dashboard-agent-grpc-port={agent_grpc}", f"--runtime-env-agent-port={runtime_env}",
         f"--metrics-export-port={metrics}", f"--ray-client-server-port={client}",
         f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}",
         "--num-cpus=4", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        env=env, check=True, capture_output=True, timeout=120)
    try:
        yield f"http://127.0.0.1:{dash}", env
    finally:
        _kill_cluster(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_ray_job_submit_runs_protoray_train(head_node, tmp_path):
    address, env = head_node
    tracking = f"sqlite:///{tmp_path}/mlruns.db"  # absolute: the job runs in an unpacked copy
    command = [str(BIN / "ray"), "job", "submit", "--address", address, "--working-dir", str(ROOT),
               "--", "protoray", "train", "configs/tiny_digits.yaml",
               "--set", f"tracking.tracking_uri={tracking}",
               "--set", f"tracking.storage_path={tmp_path}/ray"]
    for _ in range(30):  # the dashboard agent takes a few seconds to accept jobs
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
        if "No available agent" not in done.stderr + done.stdout:
            break
        time.sleep(2)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "succeeded" in done.stdout + done.stderr

    client = MlflowClient(tracking)
    experiment = client.get_experiment_by_name("tiny")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["method.name"] == "pcl"
    assert len(client.get_metric_history(run.info.run_id, "loss")) == 3
    assert "test_knn" in run.data.metrics
