"""``protoray export``: a run's backbone as files other code loads without protoray.

    protoray export CHECKPOINT_OR_RUN --to DIR [--tracking-uri URI]

The source is a checkpoint file (``state.pt``, ``final_checkpoint.pt``), a Ray Train checkpoint
directory holding ``state.pt``, or an MLflow run id (its ``checkpoint/final_checkpoint.pt``
artifact, logged by every run trained with the final evaluation). DIR receives
``encoder.safetensors`` and ``encoder.json`` (``methods.encoders.encoder_files``). Every export is
reloaded from DIR and checked against the method's own ``embed`` before this returns.
"""

from __future__ import annotations

import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from methods.base import Method
from methods.encoders.encoder_files import JSON_FILE, WEIGHTS_FILE, load_encoder, save_encoder
from orchestration.builders import make_method
from orchestration.checkpoints import checkpoint_file, load_state
from orchestration.config import (
    STREAMED,
    ConfigError,
    ExperimentConfig,
    TrackingSection,
    build_config,
    input_shape,
)

RUN_ID = re.compile(r"(?:runs:/)?([0-9a-f]{32})/?")
SOURCE_HINT = ("give a state.pt / final_checkpoint.pt written by protoray train, its checkpoint "
               "directory or its MLflow run id")


@dataclass
class Exported:
    weights: Path
    description: dict[str, Any]  # what encoder.json holds


@dataclass
class Loaded:
    method: Method  # in eval mode, the checkpoint's weights loaded
    cfg: ExperimentConfig
    channels: int  # the images it was evaluated on: channels x side x side
    side: int


def load_checkpoint(path: Path) -> tuple[Loaded, dict[str, Any]]:
    """The method of checkpoint file ``path`` with its weights, and the raw state. ``ValueError``
    naming ``path`` for anything that is not a protoray checkpoint."""
    state = load_state(path)
    return _method_from_state(state, path), state


def _method_from_state(state: Any, path: Path) -> Loaded:
    """The checkpoint's method with its weights loaded. ``ValueError`` naming ``path`` for
    anything that is not a protoray checkpoint."""
    if not (isinstance(state, dict) and isinstance(state.get("model"), dict)
            and isinstance(state.get("config"), dict)):
        raise ValueError(f"{path} is not a protoray checkpoint (no model and config entries); "
                         f"{SOURCE_HINT}")
    try:
        cfg = build_config(state["config"])
    except ConfigError as exc:
        raise ValueError(f"{path}: its config does not validate with this protoray ({exc})") from None
    channels, side = input_shape(cfg.data)
    # an image folder / parquet source without data.channels trained on the files' own channels
    tries = [channels] if cfg.data.channels or cfg.data.name not in STREAMED else [3, 1]
    for c in tries:
        method = make_method(cfg, c, side)
        try:
            method.load_state_dict(state["model"])
        except RuntimeError as exc:
            error = str(exc).splitlines()[0]
            continue
        return Loaded(method.eval(), cfg, c, side)
    raise ValueError(f"{path}: its weights do not fit the {cfg.method.name} / {cfg.model.backbone} "
                     f"its config describes ({error})")


def _describe(loaded: Loaded, source: dict[str, Any]) -> dict[str, Any]:
    """encoder.json's fields apart from the format, the recipe and the snippet."""
    method, cfg, channels, side = loaded.method, loaded.cfg, loaded.channels, loaded.side
    views = method.views
    dim = int(method.backbone.feature_dim)
    return {
        "backbone": cfg.model.backbone,
        "embedding_dim": dim,
        "output": f"[B, {dim}] pooled backbone feature, the representation protoray's kNN, "
                  "linear probe and clustering scores read (no projection head)",
        "input": {
            "channels": channels, "size": side, "layout": "[B, C, H, W] float32",
            "value_range": [0.0, 1.0], "mean": [views.mean] * channels, "std": [views.std] * channels,
            "preprocess": "scale uint8 pixels to value_range (/ 255), resize to size x size "
                          "(bilinear, antialiased), then x = (x - mean) / std per channel",
            "trained_view_size": views.size or side,
        },
        "source": {**source, "method": cfg.method.name, "regularizer": cfg.method.regularizer,
                   "dataset": cfg.data.name, "seed": cfg.seed},
    }


def _check_backbone_is_the_embedding(loaded: Loaded, x: torch.Tensor) -> torch.Tensor:
    """``method.embed(x)``, when it is the backbone's output alone (not CMC's two encoders or
    CPC's patch grid, which no single constructor rebuilds); else ``ValueError``."""
    method = loaded.method
    with torch.no_grad():
        try:
            expected, alone = method.embed(x), method.backbone(x)
        except Exception:  # a method whose embed takes other inputs (CPC)
            expected, alone = None, None
    if expected is None or expected.shape != alone.shape or not torch.allclose(expected, alone):
        raise ValueError(f"{loaded.cfg.method.name}'s representation is not its backbone's "
                         "output alone, so there is no single backbone to export")
    return expected


def export(source: str, out_dir: Path, tracking_uri: str | None = None) -> Exported:
    """Write the backbone of ``source`` (checkpoint file, checkpoint directory, MLflow run id, or
    a registered model ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``) to ``out_dir``.
    ``FileNotFoundError`` for a missing path; ``ValueError`` (one line naming the file or run)
    for a damaged or foreign file, an unknown run or model, a method without a single backbone,
    or an export that does not reload to the same embeddings."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"--to {out_dir} is a file; give a directory (created if missing)")
    if source.startswith("models:/"):  # a registered model version, e.g. models:/NAME@best
        from orchestration.tracking import registered_run_id

        source = registered_run_id(source, tracking_uri or TrackingSection().tracking_uri)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(source)
        match = RUN_ID.fullmatch(source)
        if path.exists() or not match:
            path = checkpoint_file(path)
            origin: dict[str, Any] = {"checkpoint": str(path.resolve())}
        else:
            # MLflow and Ray load only for a run id: exporting a file starts fast
            from orchestration.tracking import RUN_CHECKPOINT, download_run_checkpoint

            run_id = match.group(1)
            uri = tracking_uri or TrackingSection().tracking_uri
            path = download_run_checkpoint(run_id, uri, Path(tmp))
            origin = {"checkpoint": f"runs:/{run_id}/{RUN_CHECKPOINT}", "run_id": run_id,
                      "tracking_uri": uri}
        loaded, state = load_checkpoint(path)
        origin["epoch"] = state.get("epoch")
    x = torch.randn(2, loaded.channels, loaded.side, loaded.side,
                    generator=torch.Generator().manual_seed(0))
    expected = _check_backbone_is_the_embedding(loaded, x)
    backbone = loaded.method.backbone
    description = _describe(loaded, origin)
    weights, _ = save_encoder(backbone, backbone.recipe, out_dir, description)
    try:  # the export is only useful if the JSON's constructor takes these weights
        reloaded, _ = load_encoder(out_dir)
        with torch.no_grad():
            got = reloaded(x)
        same = got.shape == expected.shape and torch.allclose(got, expected, atol=1e-5, rtol=1e-4)
    except Exception as exc:  # reported as the one-line failure below
        same, why = False, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    else:
        why = "different embeddings"
    if not same:
        for name in (WEIGHTS_FILE, JSON_FILE):
            (out_dir / name).unlink(missing_ok=True)
        raise ValueError(f"export of {path} does not reload to the same encoder ({why}); please "
                         "report it with the checkpoint's config")
    return Exported(weights, description)
