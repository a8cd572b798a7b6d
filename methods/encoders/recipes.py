"""How to build a backbone without protoray: a constructor call plus the submodules to replace.

A ``Recipe`` is plain data (it goes into an exported ``encoder.json``), and ``build`` is the one
function that turns it into a module, for protoray's own backbones and for a reloaded export
alike, so what the JSON says is what training built.

    recipe = Recipe("torchvision.models.resnet18", {}, [
        Replace("conv1", "torch.nn.Conv2d", {"in_channels": 1, "out_channels": 64, ...}),
        Replace("maxpool", "torch.nn.Identity", {}), Replace("fc", "torch.nn.Identity", {})])
    net = build(recipe)   # torchvision's ResNet-18 with protoray's small-image stem
"""

from __future__ import annotations

import importlib
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.nn as nn

# Constructors a recipe may name: a JSON file read from disk must not call arbitrary functions.
ALLOWED_FUNCTIONS = ("torchvision.models.", "timm.create_model",
                     "methods.encoders.backbones.build_backbone")
# encoder.json files written before methods/ had rooms name the old module
MOVED = {"methods.backbones.build_backbone": "methods.encoders.backbones.build_backbone"}
ALLOWED_MODULES = ("torch.nn.",)


@dataclass(frozen=True)
class Replace:
    """Set submodule ``attribute`` (a dotted path such as ``conv1`` or ``conv1.0``) to a new
    ``module(**kwargs)``, in the order listed (the order decides the random initialisation)."""

    attribute: str
    module: str
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Recipe:
    """``function(**kwargs)``, then every ``Replace`` in order."""

    function: str
    kwargs: dict[str, Any] = field(default_factory=dict)
    replace: list[Replace] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        """The inverse of ``to_dict``; ``KeyError`` / ``TypeError`` for a malformed mapping."""
        return cls(data["function"], dict(data.get("kwargs", {})),
                   [Replace(**r) for r in data.get("replace", [])])


def _resolve(path: str, allowed: tuple[str, ...]):
    """The object at dotted ``path``; ``ValueError`` unless it starts with an allowed prefix."""
    path = MOVED.get(path, path)
    if not path.startswith(allowed):
        raise ValueError(f"recipe names {path!r}; only {', '.join(allowed)} are allowed")
    module, _, name = path.rpartition(".")
    return getattr(importlib.import_module(module), name)


def apply_replacements(net: nn.Module, replacements: list[Replace]) -> nn.Module:
    """``net`` with each listed submodule swapped for a fresh one (in place); ``AttributeError``
    for a path the module does not have."""
    for r in replacements:
        parent_path, _, name = r.attribute.rpartition(".")
        parent = net.get_submodule(parent_path) if parent_path else net
        if not hasattr(parent, name):
            raise AttributeError(f"{type(net).__name__} has no submodule {r.attribute!r}")
        setattr(parent, name, _resolve(r.module, ALLOWED_MODULES)(**r.kwargs))
    return net


def build(recipe: Recipe) -> nn.Module:
    """The module ``recipe`` describes, randomly initialised (load weights into it after)."""
    net = _resolve(recipe.function, ALLOWED_FUNCTIONS)(**recipe.kwargs)
    return apply_replacements(net, recipe.replace)


def small_stem(in_channels: int, out_channels: int, path: str = "conv1") -> Replace:
    """A 3x3 stride-1 first convolution (SimCLR's CIFAR stem), so a 28-32 px image is not
    shrunk 4x by the stem and max-pool before the first residual stage."""
    return Replace(path, "torch.nn.Conv2d", {"in_channels": in_channels, "out_channels": out_channels,
                                             "kernel_size": 3, "stride": 1, "padding": 1,
                                             "bias": False})


def resnet_recipe(name: str, in_channels: int, small_images: bool) -> Recipe:
    """torchvision's ``resnet18`` / ``resnet50`` without the classifier (``fc`` is Identity, the
    pooled ``[B, 512 | 2048]`` feature is the output). Small images: ``small_stem`` and no
    max-pool; other channel counts than 3: a 7x7 stride-2 stem reading them."""
    replace = []
    if small_images:
        replace += [small_stem(in_channels, 64), Replace("maxpool", "torch.nn.Identity")]
    elif in_channels != 3:
        replace.append(Replace("conv1", "torch.nn.Conv2d", {
            "in_channels": in_channels, "out_channels": 64, "kernel_size": 7, "stride": 2,
            "padding": 3, "bias": False}))
    replace.append(Replace("fc", "torch.nn.Identity"))
    return Recipe(f"torchvision.models.{name}", {"weights": None}, replace)


def protoray_recipe(name: str, in_channels: int, image_size: int) -> Recipe:
    """One of protoray's own backbones (the convnets, ``vit_tiny``): needs this package."""
    return Recipe("methods.encoders.backbones.build_backbone",
                  {"name": name, "in_channels": in_channels, "image_size": image_size})
