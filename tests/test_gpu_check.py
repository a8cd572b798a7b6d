"""``benchmarks/gpu_check.py`` runs only when a session is lent a GPU, which is rare; its method
sweep also runs here on CPU with gloo, so the script does not rot between loans and a method that
breaks under a DDP wrapper fails in CI rather than on borrowed GPU time."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import torch
import torch.distributed as dist

from methods.data.datasets import ImageDataset
from methods.registry import available

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_sweep_runs_every_method_under_ddp_on_cpu():
    gpu_check = _load_script()
    g = torch.Generator().manual_seed(0)
    data = ImageDataset(torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=g),
                        torch.randint(0, 10, (256,), generator=g))
    gpu_check.init_process_group("cpu")
    try:
        losses = gpu_check.check_methods(data, steps=1, backbone="convnet", device="cpu")
    finally:
        dist.destroy_process_group()
    assert set(losses) == set(available()) | {"simclr+icl_msr"}
    assert all(math.isfinite(v) for v in losses.values())


def test_gpu_check_times_the_gpu_actor_gather_and_a_resnet50_step_on_cpu():
    """The two timings the scale model and the GPU actor wait for, as a CPU dry run: they run and
    count a ResNet-50 PCL step's FLOP in the range its architecture gives (about 4 forward passes
    of 4.1 GMAC per image: query forward and backward, key forward)."""
    gpu_check = _load_script()
    assert gpu_check.gather_seconds(2000, 16, "cpu") > 0
    step = gpu_check.pcl_resnet50_step(2, "cpu", steps=1)
    per_image = step["flop"] / 2
    assert 25e9 < per_image < 45e9 and step["seconds"] > 0
