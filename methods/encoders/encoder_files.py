"""An exported encoder: the backbone's weights as ``encoder.safetensors`` and ``encoder.json``
saying how to build the module they load into (``strict=True``) and what input it expects.

``encoder.json``: ``format``, ``weights`` (the file name), ``backbone`` (the config's name),
``embedding_dim``, ``output``, ``input`` (``channels``, ``size``, ``layout``, ``value_range``,
per-channel ``mean`` / ``std``, ``preprocess``, ``trained_view_size``), ``source`` (checkpoint
path or run, method, dataset, epoch), ``build`` (a ``methods.recipes.Recipe``: ``function``,
``kwargs``, ``replace``) and ``snippet`` (``recipe_code``'s lines).

Written by ``protoray export``; read back with ``load_encoder`` or, without protoray, with the
lines in the JSON's ``snippet`` (torchvision and timm backbones need only torch, safetensors and
that library).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from methods.encoders.recipes import Recipe, build

FORMAT = "protoray-encoder/1"
WEIGHTS_FILE = "encoder.safetensors"
JSON_FILE = "encoder.json"


def _call(function: str, kwargs: dict[str, Any]) -> str:
    return f"{function}({', '.join(f'{k}={v!r}' for k, v in kwargs.items())})"


def recipe_code(recipe: Recipe, weights: str = WEIGHTS_FILE) -> str:
    """Python lines that build ``recipe`` and load ``weights`` into it, e.g. for ResNet-18 on
    28 px images::

        import torch, torchvision.models
        from safetensors.torch import load_file
        net = torchvision.models.resnet18(weights=None)
        net.conv1 = torch.nn.Conv2d(in_channels=1, out_channels=64, kernel_size=3, ...)
        net.maxpool = torch.nn.Identity()
        net.fc = torch.nn.Identity()
        net.load_state_dict(load_file('encoder.safetensors')); net.eval()
    """
    module = recipe.function.rpartition(".")[0]
    lines = [f"import torch, {module}", "from safetensors.torch import load_file",
             f"net = {_call(recipe.function, recipe.kwargs)}"]
    for r in recipe.replace:
        parent, _, name = r.attribute.rpartition(".")
        new = _call(r.module, r.kwargs)
        lines.append(f"setattr(net.get_submodule({parent!r}), {name!r}, {new})" if parent
                     else f"net.{name} = {new}")
    lines.append(f"net.load_state_dict(load_file({weights!r})); net.eval()")
    return "\n".join(lines)


def backbone_weights(backbone: nn.Module) -> dict[str, torch.Tensor]:
    """The backbone's state dict as contiguous CPU tensors (safetensors stores no strides, and
    protoray's convnets keep channels-last weights)."""
    return {k: v.detach().cpu().contiguous() for k, v in backbone.state_dict().items()}


def save_encoder(backbone: nn.Module, recipe: Recipe, out_dir: Path, description: dict[str, Any]
                 ) -> tuple[Path, Path]:
    """Write ``encoder.safetensors`` and ``encoder.json`` (``description`` plus the format, the
    build recipe and the snippet) into ``out_dir``; their paths."""
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    weights, meta = out_dir / WEIGHTS_FILE, out_dir / JSON_FILE
    save_file(backbone_weights(backbone), str(weights), metadata={"format": "pt",
                                                                  "protoray": FORMAT})
    info = {"format": FORMAT, "weights": WEIGHTS_FILE, **description, "build": recipe.to_dict(),
            "snippet": recipe_code(recipe).splitlines()}
    meta.write_text(json.dumps(info, indent=2) + "\n")
    return weights, meta


def load_encoder(directory: Path) -> tuple[nn.Module, dict[str, Any]]:
    """The exported backbone in eval mode (``[B, C, H, W]`` normalised floats -> ``[B, D]``) and
    its JSON. ``FileNotFoundError`` for a missing file; ``RuntimeError`` (torch's) when the weights
    do not fit the module the JSON builds."""
    from safetensors.torch import load_file

    info = json.loads((Path(directory) / JSON_FILE).read_text())
    net = build(Recipe.from_dict(info["build"]))
    net.load_state_dict(load_file(str(Path(directory) / info["weights"])), strict=True)
    return net.eval(), info
