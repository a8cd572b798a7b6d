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
