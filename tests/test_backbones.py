"""The CPU convnets pool any small input to ``[B, feature_dim]``; an unknown name is refused."""

import pytest
import torch

from methods.backbones import build_backbone


@pytest.mark.parametrize("name, dim", [("convnet", 256), ("convnet_wide", 512), ("convnet_1024", 1024)])
@pytest.mark.parametrize("size", [8, 28])
def test_convnets_pool_to_their_feature_dim(name: str, dim: int, size: int) -> None:
    net = build_backbone(name, 1, size)
    assert net.feature_dim == dim
    assert net(torch.randn(3, 1, size, size)).shape == (3, dim)


def test_unknown_backbone_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="convnet_1024"):
        build_backbone("convnet_2048", 1, 28)
