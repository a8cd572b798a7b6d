"""Heads, BatchNorm batches and optimisation details as the reference implementations have them
(SimSiam, MoCo v3, BYOL, SimCLR, DINO)."""

from __future__ import annotations

import torch
import torch.nn as nn

from methods.base import Batch
from methods.data.datasets import load_digits
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone
from methods.registry import build_method
from methods.training import OptimConfig, fit


def _build(name: str, backbone: str = "convnet", size: int = 8, **hparams):
    return build_method(name, build_backbone(backbone, 1, size), view_spec("digits", size=size),
                        **hparams)


def _layers(module: nn.Module) -> list[nn.Module]:
    return [m for m in module.modules() if isinstance(m, (nn.Linear, nn.BatchNorm1d))]


def test_simsiam_projector_ends_in_an_affine_free_batchnorm():
    m = _build("simsiam", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8)
    *_, last_linear, last_bn = _layers(m.projection)
    assert isinstance(last_bn, nn.BatchNorm1d) and not last_bn.affine
    assert last_linear.bias is None
    assert sum(isinstance(x, nn.Linear) for x in _layers(m.projection)) == 3


def test_moco_v3_heads_and_temperature_follow_the_backbone():
    """ResNet recipe (and the convnets): 2-layer bias-free projector with an affine-free final
    BatchNorm, temperature 1.0; ViT: 3 layers, 0.2. The predictor has no biases either."""
    conv = _build("moco_v3", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=32)
    linears = [x for x in _layers(conv.projection) if isinstance(x, nn.Linear)]
    assert len(linears) == 2 and all(x.bias is None for x in linears)
    assert isinstance(conv.projection[-1], nn.BatchNorm1d) and not conv.projection[-1].affine
    assert all(x.bias is None for x in _layers(conv.predictor) if isinstance(x, nn.Linear))
    assert conv.temperature == 1.0
    vit = _build("moco_v3", backbone="vit_tiny", size=16, proj_hidden_dim=32, proj_dim=16,
                 pred_hidden_dim=32)
    assert sum(isinstance(x, nn.Linear) for x in _layers(vit.projection)) == 3
    assert vit.temperature == 0.2
    assert _build("moco_v3", temperature=0.5, proj_hidden_dim=32).temperature == 0.5


def test_simclr_head_is_batchnormed_to_a_scale_only_output():
    m = _build("simclr", proj_hidden_dim=32, proj_dim=16)
    last = m.projection[-1]
    assert isinstance(last, nn.BatchNorm1d) and last.affine and not last.bias.requires_grad
    assert all(x.bias is None for x in _layers(m.projection) if isinstance(x, nn.Linear))


def _batch_sizes_through_backbone(name: str, **hparams) -> list[int]:
    """Batch sizes of every backbone call (online and momentum copies) in one training step."""
    digits = load_digits("train")
    m = _build(name, **hparams)
    seen: list[int] = []
    for module in m.modules():
        if type(module).__name__ == "ConvNet":
            module.stages[0].register_forward_hook(lambda mod, inp, out: seen.append(len(inp[0])))
    idx = torch.arange(32)
    m.training_step(Batch(idx, digits.images[idx], digits.labels[idx]))
    return seen


def test_byol_simsiam_moco_v3_run_each_view_as_its_own_batchnorm_batch():
    """The references call the encoders once per view, so BatchNorm never mixes the two views."""
    heads = {"proj_hidden_dim": 32, "pred_hidden_dim": 32}
    for name in ("byol", "simsiam", "moco_v3"):
        sizes = _batch_sizes_through_backbone(name, **heads)
        assert sizes and set(sizes) == {32}, (name, sizes)


def _dino_after_one_epoch(clip_grad: float):
    torch.manual_seed(0)
    digits = load_digits("train").subset(range(128))
    m = _build("dino", out_dim=64, hidden_dim=32, bottleneck_dim=16, num_local_crops=0,
               freeze_last_layer=1, clip_grad=clip_grad)
    before = {k: v.detach().clone() for k, v in m.head.state_dict().items()}
    # plain SGD (no momentum, no decay): each of the 2 steps moves a weight by lr * its gradient
    fit(m, digits, epochs=1, batch_size=64, optim=OptimConfig(lr=0.1, momentum=0.0, weight_decay=0.0))
    return m, before


def test_dino_freezes_its_last_layer_in_the_first_epoch_and_clips_gradients():
    m, before = _dino_after_one_epoch(clip_grad=0.05)
    torch.testing.assert_close(m.head.last.weight, before["last.weight"], rtol=0, atol=0)
    moved = (m.head.mlp[0].weight - before["mlp.0.weight"]).norm()
    assert 0 < moved <= 2 * 0.1 * 0.05 * 1.001  # two steps of at most lr * clip_grad
    unclipped, start = _dino_after_one_epoch(clip_grad=0.0)
    assert (unclipped.head.mlp[0].weight - start["mlp.0.weight"]).norm() > 2 * 0.1 * 0.05
    m.epoch = 1  # past the freeze: the last layer gets its gradient
    m.head.last.weight.grad = torch.ones_like(m.head.last.weight)
    m.before_optimizer_step()
    assert m.head.last.weight.grad is not None


def test_sync_batchnorm_follows_the_reference_on_gpu_workers_and_is_refused_on_cpu():
    from orchestration.config import ConfigError, build_config

    gpus = ["scaling.use_gpu=true", "scaling.num_workers=2"]
    for name, reference in (("simsiam", True), ("dino", True), ("simclr", True), ("moco_v3", True),
                            ("swav", True), ("byol", True), ("moco", False), ("pcl", False)):
        cfg = build_config({}, [f"method.name={name}", *gpus])
        assert cfg.sync_batchnorm() is reference, name
        assert build_config({}, [f"method.name={name}"]).sync_batchnorm() is False  # CPU workers
    assert build_config({}, ["method.name=simsiam", "scaling.use_gpu=true",
                             "scaling.num_workers=1"]).sync_batchnorm() is False  # one worker
    try:
        build_config({}, ["method.name=simsiam", "scaling.sync_batchnorm=true"])
    except ConfigError as exc:
        assert "scaling.sync_batchnorm" in str(exc) and "GPU" in str(exc)
    else:
        raise AssertionError("sync_batchnorm on CPU workers was accepted")
    try:
        build_config({}, ["method.name=moco", *gpus, "scaling.sync_batchnorm=true"])
    except ConfigError as exc:
        assert "bn_splits" in str(exc)
    else:
        raise AssertionError("sync_batchnorm with shuffling BN was accepted")
    m = _build("simsiam", proj_hidden_dim=32, proj_dim=16, pred_hidden_dim=8)
    converted = torch.nn.SyncBatchNorm.convert_sync_batchnorm(m)  # what the worker does
    norms = [x for x in converted.modules() if isinstance(x, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(isinstance(x, nn.SyncBatchNorm) for x in norms)
