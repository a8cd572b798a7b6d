"""Configs are the only recipe source: every shipped config loads, the best-recipe PCL configs
build the method they describe, and ``benchmarks/fashion_mnist.py`` trains a config through the
same loader and builder as ``protoray train`` (no per-method branches in the script)."""

from __future__ import annotations

import ast
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from methods.registry import available
from orchestration.builders import make_method
from orchestration.checkpoints import load_state
from orchestration.config import ExperimentConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "fashion_mnist.py"
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))  # configs/spaces/ holds sweep spaces
TINY = str(ROOT / "configs" / "tiny_digits.yaml")
# (config, backbone, epochs) of the best measured PCL recipes (benchmarks/RESULTS.md, A and B)
BEST_PCL = [("pcl_fashion_mnist_wide1024.yaml", "convnet_wide_1024", 42),
            ("pcl_fashion_mnist_wide.yaml", "convnet_wide", 45)]


def _load_script():
    spec = importlib.util.spec_from_file_location("fashion_mnist_benchmark", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def benchmark():
    return _load_script()


@pytest.fixture
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads spin on each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_every_config_loads(path):
    cfg = load_config(path)
    assert cfg.method.name in available()


@pytest.mark.parametrize(("name", "backbone", "epochs"), BEST_PCL)
def test_best_pcl_config_builds_its_recipe(name, backbone, epochs):
    cfg = load_config(ROOT / "configs" / name)
    assert (cfg.model.backbone, cfg.optim.epochs) == (backbone, epochs)
    o, d, c = cfg.optim, cfg.data, cfg.clustering
    assert (o.batch_size, o.lr, o.weight_decay, o.warmup_epochs, o.precision) == (
        256, 0.3, 1e-4, 2, "bf16")
    assert (d.views, d.crop_min_scale, d.view_size) == ("small", 0.5, 20)
    assert (c.num_clusters, c.nredo) == ([50, 100, 200], 2)
    # one worker holding the whole batch: protoray train slices BatchNorm as the benchmark did
    assert cfg.scaling.num_workers == 1

    method = make_method(cfg, in_channels=1, image_size=28)
    assert type(method).__name__ == "PCL"
    assert method.queue.keys.shape == (4096, 128)
    assert method.momentum == 0.996
    assert method.temperature == 0.2
    assert method.bn_splits == 8
    assert method.num_negative_prototypes == 1000
    assert method.schedule.warmup_epochs == 4 and method.schedule.temperature == 0.2
    assert method.views.size == 20 and method.views.crop_scale == (0.5, 1.0)
    from methods.encoders.backbones import build_backbone

    reference = build_backbone(backbone, 1, 20)
    query_backbone = method.encoder_q[0]
    assert type(query_backbone) is type(reference)
    assert query_backbone.feature_dim == reference.feature_dim
    assert ([p.shape for p in query_backbone.parameters()]
            == [p.shape for p in reference.parameters()])


def test_script_has_no_recipe_table_or_method_branches(benchmark):
    """The script knows no method by name: no ROWS table, no comparison with a method's name."""
    assert not hasattr(benchmark, "ROWS")
    names = set(available())
    for node in ast.walk(ast.parse(SCRIPT.read_text())):
        if isinstance(node, ast.Compare):
            for operand in (node.left, *node.comparators):
                assert not (isinstance(operand, ast.Constant) and operand.value in names), (
                    f"line {node.lineno} compares with the method name {operand.value!r}")


def test_benchmark_runs_a_config_and_prints_its_headline(benchmark, one_thread, tmp_path, capsys):
    """One epoch of the tiny PCL config (warm-up 0, so the E-step and ProtoNCE run too)."""
    overrides = ["optim.epochs=1", "method.warmup_epochs=0"]
    assert benchmark.main([TINY, "--set", *overrides, "--save", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "tiny_digits done: kNN" in out
    headline = json.loads(out.strip().splitlines()[-1])
    for key in ("tiny_digits_knn", "tiny_digits_linear", "tiny_digits_ami", "tiny_digits_epoch_s",
                "raw_pixels_knn", "raw_pixels_linear", "raw_pixels_ami"):
        assert key in headline, key
    assert headline["epochs"] == 1
    assert 0.0 <= headline["tiny_digits_knn"] <= 1.0

    # the saved row is a protoray checkpoint: the config it trained, weights make_method accepts
    state = load_state(tmp_path / "tiny_digits.pt")
    cfg = ExperimentConfig.model_validate(state["config"])
    assert cfg == load_config(TINY, overrides)
    make_method(cfg, 1, 8).load_state_dict(state["model"])


def test_benchmark_refuses_a_bad_override_before_training(benchmark, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main([TINY, "--set", "method.nosuch=1"])
    assert exc.value.code == 2
    assert "method.nosuch" in capsys.readouterr().err


def test_row_names_are_the_stems_made_distinct(benchmark):
    paths = ["configs/a.yaml", "other/a.yaml", "configs/b.yaml"]
    assert benchmark.row_names(paths, None) == ["a", "a_2", "b"]
    assert benchmark.row_names(paths, ["x", "y", "z"]) == ["x", "y", "z"]
