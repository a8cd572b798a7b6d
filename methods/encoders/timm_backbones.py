"""timm models as backbones: ``model.backbone: timm/<name>`` for any name ``timm.list_models()``
knows, randomly initialised (``pretrained=False``: nothing is downloaded).

Small-image adaptations, below 64 px (the same threshold as protoray's torchvision ResNets):

- timm ResNets (``resnet18``, ``resnet50d``, ``resnet10t``, ...): the first convolution becomes a
  3x3 stride-1 one and the max-pool an Identity, so a 28-32 px image keeps an 8x8 map or larger
  until the last stage instead of 1x1.
- Models that take ``img_size`` (ViTs, DeiT, ...): ``img_size`` is the input side, and below
  64 px ``patch_size=4`` (a 28 px image is 7x7 patches, not one 16 px patch);
  ``dynamic_img_size`` and ``dynamic_img_pad`` where the model takes them, so smaller views
  (``data.view_size``, multi-crop) interpolate the position embedding instead of failing.
- Other families keep timm's own stem; most downsample 32x, so their last map is 1x1 at 32 px.

Every setting is recorded in the backbone's ``recipe`` (``methods.encoders.recipes``), which an export
writes to its JSON.
"""

from __future__ import annotations

import re

import torch.nn as nn

from methods.encoders.recipes import Recipe, Replace, apply_replacements, small_stem

PREFIX = "timm/"
SMALL_IMAGES = 64  # below this side the adaptations above apply
LIST_HINT = "list the names with: python -c \"import timm; print(timm.list_models('*resnet*'))\""


def check_timm_name(name: str) -> None:
    """``ValueError`` naming ``model.backbone`` unless timm knows ``name`` (without the prefix)."""
    import timm

    if not name or not timm.is_model(name):
        raise ValueError(f"unknown timm model {name!r}; {LIST_HINT}")


def _create(name: str, in_channels: int, optional: dict) -> tuple[nn.Module, dict]:
    """``timm.create_model`` with every ``optional`` keyword the model's class accepts (one
    dropped per ``TypeError`` naming it); the model and the keywords used."""
    import timm

    kwargs = {"model_name": name, "pretrained": False, "num_classes": 0, "in_chans": in_channels,
              **optional}
    while True:
        try:
            return timm.create_model(**kwargs), kwargs
        except TypeError as exc:
            unexpected = re.search(r"unexpected keyword argument '(\w+)'", str(exc))
            if not unexpected or unexpected.group(1) not in optional:
                raise
            del kwargs[unexpected.group(1)]


def _resnet_stem(net: nn.Module, in_channels: int) -> list[Replace]:
    """The small-image replacements of a timm ResNet: its first convolution (``conv1`` or, for
    deep stems, ``conv1.0``) and ``maxpool``."""
    from timm.models.resnet import ResNet

    if not isinstance(net, ResNet):
        return []
    path, first = next((n, m) for n, m in net.named_modules() if isinstance(m, nn.Conv2d))
    return [small_stem(in_channels, first.out_channels, path), Replace("maxpool", "torch.nn.Identity")]


def timm_backbone(name: str, in_channels: int, image_size: int) -> nn.Module:
    """timm's ``name`` without its classifier: ``[B, C, H, W]`` -> ``[B, feature_dim]``, with
    ``feature_dim`` and ``recipe`` attributes. ``ValueError`` for a name timm does not know or a
    model timm cannot build for this input."""
    check_timm_name(name)
    optional: dict = {"img_size": image_size, "dynamic_img_size": True, "dynamic_img_pad": True}
    if image_size < SMALL_IMAGES:
        optional["patch_size"] = 4
    try:
        net, kwargs = _create(name, in_channels, optional)
    except (TypeError, AssertionError, RuntimeError) as exc:
        raise ValueError(f"timm could not build {name} for {in_channels}x{image_size} px images "
                         f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
                         ) from None
    replace = _resnet_stem(net, in_channels) if image_size < SMALL_IMAGES else []
    apply_replacements(net, replace)
    # with num_classes=0 the output is the pre-logits feature: head_hidden_size where a model
    # has a hidden head layer (MobileNetV3), else num_features
    net.feature_dim = getattr(net, "head_hidden_size", None) or net.num_features
    net.recipe = Recipe("timm.create_model", kwargs, replace)
    return net
