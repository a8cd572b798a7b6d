"""Real Ray nodes on this machine for the tests: `ray start` processes on loopback, each with its
own free ports and temp dir, so they can be stopped one at a time without `ray stop` (which would
also stop the session's test cluster). These are the commands clusters/local.md gives."""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

BIN = Path(sys.executable).parent


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def kill_processes(temp_dir: str) -> None:
    """SIGKILL every process whose command line names ``temp_dir``: one node's processes."""
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


def token_env() -> dict[str, str]:
    """This machine's environment with token authentication on and a token of the test's own
    (every node, the job client and the job share it)."""
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    env.pop("RAY_ADDRESS", None)
    env.pop("RAY_AUTH_TOKEN_PATH", None)
    return env


def _node_ports() -> list[str]:
    agent, agent_grpc, runtime_env, metrics, node_mgr, obj_mgr = free_ports(6)
    return [f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}", f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_mgr}", f"--object-manager-port={obj_mgr}"]


def start_head(temp_dir: str, env: dict[str, str], num_cpus: int,
               resources: dict[str, float] | None = None) -> tuple[str, str]:
    """`ray start --head` with the dashboard on loopback; returns (GCS address, jobs API URL)."""
    shutil.rmtree(temp_dir, ignore_errors=True)
    gcs, dash, client = free_ports(3)
    extra = [f"--resources={json.dumps(resources)}"] if resources else []
    subprocess.run([BIN / "ray", "start", "--head", f"--port={gcs}", "--dashboard-host=127.0.0.1",
                    f"--dashboard-port={dash}", f"--ray-client-server-port={client}", *_node_ports(),
                    f"--num-cpus={num_cpus}", *extra, f"--temp-dir={temp_dir}",
                    "--disable-usage-stats"], env=env, check=True, capture_output=True, timeout=120)
    return f"127.0.0.1:{gcs}", f"http://127.0.0.1:{dash}"


def start_worker(gcs: str, temp_dir: str, env: dict[str, str], num_cpus: int,
                 resources: dict[str, float], log: Path) -> subprocess.Popen:
    """`ray start --address GCS --block`: a worker node whose processes all name ``temp_dir``."""
    shutil.rmtree(temp_dir, ignore_errors=True)
    with open(log, "w") as out:
        return subprocess.Popen(
            [BIN / "ray", "start", f"--address={gcs}", *_node_ports(), f"--num-cpus={num_cpus}",
             f"--resources={json.dumps(resources)}", f"--temp-dir={temp_dir}", "--block",
             "--disable-usage-stats"], env=env, stdout=out, stderr=subprocess.STDOUT,
            start_new_session=True)


def ray_list(kind: str, dashboard: str, env: dict[str, str]) -> list[dict]:
    """`ray list nodes|actors --detail` as JSON (dead actors included)."""
    done = subprocess.run([BIN / "ray", "list", kind, "--address", dashboard, "--detail",
                           "--format", "json", "--limit", "1000"],
                          env=env, capture_output=True, text=True, timeout=120, check=True)
    return json.loads(done.stdout)


def wait_for_nodes(dashboard: str, env: dict[str, str], alive: int, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if sum(n["state"] == "ALIVE" for n in ray_list("nodes", dashboard, env)) == alive:
            return
        time.sleep(1)
    raise TimeoutError(f"{alive} Ray nodes did not come up within {timeout:.0f} s")


def submit(dashboard: str, env: dict[str, str], args: list[str], cwd: Path,
           submission_id: str | None = None) -> subprocess.CompletedProcess:
    """`ray job submit --working-dir CWD -- ARGS`, retried while the dashboard agent starts;
    with ``submission_id``, `--no-wait` under that id."""
    detach = ["--submission-id", submission_id, "--no-wait"] if submission_id else []
    command = [str(BIN / "ray"), "job", "submit", "--address", dashboard, "--working-dir", str(cwd),
               *detach, "--", *args]
    for _ in range(30):
        done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in done.stderr + done.stdout:
            return done
        time.sleep(2)
    return done
