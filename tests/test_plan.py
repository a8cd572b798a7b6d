"""protoray plan, the E-step cost model and whole-trial placement: ImageNet-size PCL on GPU
workers is sharded, digits gathered; trials count every resource they hold; the all-reduced
sums give the actor the same round as the funnelled ones."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from methods.clustering.lloyd import shard_sums
from orchestration.config import ConfigError, load_config
from orchestration.cost_model import choose_strategy, config_estep_cost, lloyd_flop
from orchestration.plan import make_plan
from orchestration.prototypes import payload_bytes, reduce_round
from orchestration.sweep import trials_in_parallel
from tests.conftest import ROOT

IMAGENET = ["scaling.use_gpu=true", "scaling.num_workers=8", "model.backbone=resnet50",
            "clustering.num_clusters=[25000, 50000, 100000]", "data.name=image_folder",
            "data.root=/nowhere", "data.image_size=224"]


def _plan_json(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-m", "orchestration.cli", "plan", *args, "--json"],
                         capture_output=True, text=True, cwd=ROOT, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_lloyd_flop_counts_the_sample_and_the_final_assignment():
    # 1.28M x 128 at K = 100k: every point is in the sample (1000 K > N), 2 N K D per iteration
    assert lloyd_flop(1_281_167, 100_000, 128, niter=1, nredo=1) == 2 * 2 * 1_281_167 * 100_000 * 128
    assert lloyd_flop(10**6, 10, 4, niter=3, nredo=2) == 2 * 4 * 10 * (2 * 3 * 10_000 + 10**6)


def test_imagenet_pcl_on_8_gpus_is_sharded_and_digits_gathered():
    cfg = load_config(ROOT / "configs" / "pcl_fashion_mnist.yaml", IMAGENET)
    cost = config_estep_cost(cfg, 1_281_167, 128, multi_node=True)
    assert cost.sharded_s * 100 < cost.gather_s  # one CPU process: hours; 8 GPUs: about a minute
    assert choose_strategy(cfg, 1_281_167, 128, multi_node=True) == "sharded"
    digits = load_config(ROOT / "configs" / "tiny_digits.yaml")
    assert choose_strategy(digits, 1_147, 128, multi_node=False) == "gather"
    fixed = load_config(ROOT / "configs" / "tiny_digits.yaml", ["clustering.strategy=sharded"])
    assert choose_strategy(fixed, 1_147, 128, multi_node=False) == "sharded"
    plan = make_plan(cfg, 1_281_167, {"CPU": 96, "GPU": 8}, multi_node=True)
    assert plan["estep"]["strategy"] == "sharded" and plan["loader"] == "stream"
    assert plan["estep"]["seconds_est"] == plan["estep"]["sharded_seconds_est"]


def test_plan_cli_for_a_2_gpu_sweep_on_a_2_gpu_cluster_says_one_at_a_time(tmp_path):
    space = tmp_path / "space.yaml"
    space.write_text("method.temperature: {choice: [0.1, 0.2]}\n")
    plan = _plan_json(str(ROOT / "configs" / "tiny_digits.yaml"), "--space", str(space),
                      "--cluster", "CPU=16,GPU=2", "--set", "scaling.use_gpu=true")
    assert plan["trials_in_parallel"] == 1 and plan["limited_by"] == "GPU"
    assert plan["estep"]["strategy"] == "gather"
    for key in ("seconds_est", "gather_seconds_est"):
        assert plan["estep"][key] > 0
    imagenet = _plan_json(str(ROOT / "configs" / "pcl_fashion_mnist.yaml"), "--samples", "1281167",
                          "--cluster", "CPU=96,GPU=8", "--set", *IMAGENET)
    assert imagenet["estep"]["strategy"] == "sharded"
    assert imagenet["estep"]["gather_seconds_est"] > imagenet["estep"]["sharded_seconds_est"]


def test_trials_count_gpus_and_custom_resources_not_only_cpus():
    cfg = load_config(ROOT / "configs" / "tiny_digits.yaml",
                      ["scaling.use_gpu=true", "scaling.worker_resources={train_slot: 1}"])
    # 16 CPUs would hold four trials of 4 CPUs; 2 GPUs hold one trial of two GPU workers
    assert trials_in_parallel(4, cfg, {"CPU": 16, "GPU": 2, "train_slot": 8}) == 1
    assert trials_in_parallel(4, cfg, {"CPU": 16, "GPU": 8, "train_slot": 4}) == 2
    with pytest.raises(ConfigError, match="one trial needs 2 GPU"):
        trials_in_parallel(4, cfg, {"CPU": 16, "GPU": 1, "train_slot": 8})


def test_all_reduced_sums_give_the_actor_the_same_round():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(300, 8)).astype(np.float32)
    centroids = features[:5].copy()
    shards = [shard_sums(features[r::3], centroids)[0] for r in range(3)]
    total = shards[0] + shards[1] + shards[2]
    key = ("iter", 0, 0, 0, 0)
    funnel = reduce_round(key, [(s, centroids if r == 0 else None) for r, s in enumerate(shards)],
                          [5], 0.2, 0, 5, 1)
    reduced = reduce_round(key, [(total, centroids), (None, None), (None, None)], [5], 0.2, 0, 5, 1)
    np.testing.assert_allclose(funnel[0], reduced[0], rtol=1e-6)
    assert funnel[1] == pytest.approx(reduced[1])
    # what the actor receives: one K x D payload, not one per rank
    assert payload_bytes([(total, centroids), (None, None), (None, None)]) < \
        payload_bytes([(s, None) for s in shards])


LIVE = """
import json, ray
from orchestration.config import load_config
from orchestration.sweep import trials_in_parallel
ray.init(num_cpus=16, num_gpus=2, include_dashboard=False, log_to_driver=False)
cfg = load_config("configs/tiny_digits.yaml", ["scaling.use_gpu=true"])
print(json.dumps({"trials": trials_in_parallel(4, cfg, ray.cluster_resources()),
                  "gpus": ray.cluster_resources()["GPU"]}))
ray.shutdown()
"""


@pytest.mark.slow
def test_sweep_placement_on_a_live_cluster_with_logical_gpus():
    # a cluster of its own in a child process: 16 CPUs hold 4 trials, 2 GPUs one
    out = subprocess.run([sys.executable, "-c", LIVE], capture_output=True, text=True, cwd=ROOT,
                         check=True, timeout=300).stdout
    assert json.loads(out.strip().splitlines()[-1]) == {"trials": 1, "gpus": 2.0}


def test_a_gpu_actor_gathers_imagenet_in_seconds_and_is_counted():
    """clustering.gpus: 1 puts the gathered k-means on the actor's GPU: the plan's gather
    estimate drops from hours to the GPU's rate plus moving the features; a sweep counts that GPU
    per trial; this GPU-less machine refuses it before Ray, naming the field."""
    from orchestration.resources import check_gpus, run_resources

    cpu = config_estep_cost(load_config(ROOT / "configs" / "pcl_fashion_mnist.yaml", IMAGENET),
                            1_281_167, 128, multi_node=True)
    cfg = load_config(ROOT / "configs" / "pcl_fashion_mnist.yaml", [*IMAGENET, "clustering.gpus=1"])
    gpu = config_estep_cost(cfg, 1_281_167, 128, multi_node=True)
    assert gpu.gather_s * 100 < cpu.gather_s and gpu.sharded_s == cpu.sharded_s
    assert run_resources(cfg)["GPU"] == cfg.scaling.num_workers + 1
    tiny = load_config(ROOT / "configs" / "tiny_digits.yaml", ["clustering.gpus=1"])
    assert run_resources(tiny)["GPU"] == 1
    with pytest.raises(ConfigError, match="clustering.gpus"):
        check_gpus(tiny, joining=False)
    with pytest.raises(ConfigError, match="clustering.gpus"):
        load_config(ROOT / "configs" / "tiny_digits.yaml",
                    ["clustering.gpus=1", "clustering.strategy=sharded"])
