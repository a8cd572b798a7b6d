"""The CPU convnets pool any small input to ``[B, feature_dim]``; an unknown name is refused."""

import pytest
import torch

from methods.encoders.backbones import build_backbone
from methods.encoders.momentum import momentum_copy


@pytest.mark.parametrize("name, dim", [("convnet", 256), ("convnet_wide", 512), ("convnet_1024", 1024),
                                       ("convnet_wide_1024", 1024), ("convnet_wide_signed", 512)])
@pytest.mark.parametrize("size", [8, 28])
def test_convnets_pool_to_their_feature_dim(name: str, dim: int, size: int) -> None:
    net = build_backbone(name, 1, size)
    assert net.feature_dim == dim
    assert net(torch.randn(3, 1, size, size)).shape == (3, dim)


def test_signed_convnet_drops_only_the_last_relu() -> None:
    """Its pooled feature takes negative values; the wide net's, after ReLU, never does."""
    x = torch.randn(8, 1, 28, 28)
    assert (build_backbone("convnet_wide", 1, 28)(x) >= 0).all()
    signed = build_backbone("convnet_wide_signed", 1, 28)
    assert (signed(x) < 0).any()
    relus = [m for m in signed.modules() if isinstance(m, torch.nn.ReLU)]
    assert len(relus) == 3


def test_unknown_backbone_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="convnet_1024"):
        build_backbone("convnet_2048", 1, 28)


def _conv_weights(net: torch.nn.Module) -> list[torch.Tensor]:
    return [m.weight for m in net.modules() if isinstance(m, torch.nn.Conv2d)]


def test_convnet_runs_channels_last_through_copies_and_checkpoints() -> None:
    """The speed-up needs NHWC weights (a 1-channel input is NHWC already); a momentum encoder
    and a reloaded checkpoint must keep them, and the result must equal the NCHW computation."""
    net = build_backbone("convnet", 1, 28)
    copy = momentum_copy(net)
    reloaded = build_backbone("convnet", 1, 28)
    reloaded.load_state_dict(net.state_dict())
    for model in (net, copy, reloaded):
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in _conv_weights(model))
    nchw = build_backbone("convnet", 1, 28)
    nchw.load_state_dict(net.state_dict())
    for w in _conv_weights(nchw):
        w.data = w.data.contiguous()
    x = torch.randn(4, 1, 28, 28)
    out = net(x)
    assert out.shape == (4, 256)
    torch.testing.assert_close(out, _nchw_forward(nchw, x), rtol=1e-4, atol=1e-5)


def _nchw_forward(net: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    for stage in net.stages:
        x = stage(x.contiguous())
    return x.mean(dim=(2, 3))
