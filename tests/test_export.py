"""``protoray export``: the backbone alone as safetensors + JSON, reloaded with strict=True by
the constructor the JSON names (torchvision, timm, protoray), giving the encoder's embeddings.
Also ``timm/<name>`` backbones in the config and through Ray."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from methods.base import Batch
from methods.data.views import to_input
from methods.encoders.encoder_files import JSON_FILE, WEIGHTS_FILE, load_encoder
from methods.training import make_optimizer
from orchestration.builders import load_splits, make_method
from orchestration.checkpoints import CHECKPOINT_FILE, load_state, save_state
from orchestration.cli import main
from orchestration.config import ConfigError, build_config, load_config

ROOT = Path(__file__).resolve().parents[1]


def _trained_checkpoint(tmp_path: Path, *overrides: str) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """One optimiser step of the tiny digits config, saved as the worker saves it (state.pt in a
    checkpoint directory); the directory, a batch of network inputs and the method's embeddings
    of it. The step moves the weights and BatchNorm statistics off their initial values."""
    cfg = load_config(ROOT / "configs" / "tiny_digits.yaml",
                      [f"tracking.tracking_uri=sqlite:///{tmp_path}/mlruns.db", *overrides])
    splits = load_splits(cfg)
    method = make_method(cfg, splits.train.in_channels, splits.train.image_size)
    optimizer, scheduler = make_optimizer(method, cfg.optim.training(), 10, cfg.optim.epochs)
    images = splits.train.images[:64]
    loss, _ = method.training_step(Batch(torch.arange(64), images, splits.train.labels[:64]))
    loss.backward()
    optimizer.step()
    method.on_step_end()
    directory = tmp_path / "checkpoint_000000"
    directory.mkdir()
    save_state(directory / CHECKPOINT_FILE, method, optimizer, scheduler, 0, None,
               cfg.model_dump(mode="json"))
    x = to_input(splits.holdout.images[:32], method.views)
    method.eval()
    return directory, x, method.embed(x)


def _run_snippet(out: Path, monkeypatch) -> torch.nn.Module:
    """The JSON's snippet, run as a user would, in the export directory."""
    monkeypatch.chdir(out)
    scope: dict = {}
    exec("\n".join(json.loads((out / JSON_FILE).read_text())["snippet"]), scope)
    return scope["net"]


@pytest.mark.parametrize(("backbone", "function"), [
    ("convnet", "methods.encoders.backbones.build_backbone"),
    ("resnet18", "torchvision.models.resnet18"),
    ("timm/resnet18", "timm.create_model"),
])
def test_export_reloads_into_the_named_constructor_with_the_same_embeddings(
        tmp_path, monkeypatch, backbone, function):
    directory, x, expected = _trained_checkpoint(tmp_path, f"model.backbone={backbone}")
    out = tmp_path / "encoder"
    assert main(["export", str(directory / CHECKPOINT_FILE), "--to", str(out)]) == 0

    info = json.loads((out / JSON_FILE).read_text())
    assert info["build"]["function"] == function and info["backbone"] == backbone
    assert info["embedding_dim"] == expected.shape[1]
    assert info["input"] | {"channels": 1, "size": 8, "mean": [0.5], "std": [0.25]} == info["input"]
    assert info["source"]["checkpoint"] == str((directory / CHECKPOINT_FILE).resolve())
    net = _run_snippet(out, monkeypatch)  # load_state_dict's default: strict=True
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(load_encoder(out)[0](x), expected, atol=1e-5, rtol=0)


def test_torchvision_export_is_a_plain_resnet18_with_the_small_image_stem(tmp_path):
    """The README's lines, written out: torchvision's constructor and three replacements."""
    import torchvision
    from safetensors.torch import load_file

    directory, x, expected = _trained_checkpoint(tmp_path, "model.backbone=resnet18",
                                                 "method={name: simclr, proj_hidden_dim: 64}")
    out = tmp_path / "encoder"
    assert main(["export", str(directory), "--to", str(out)]) == 0  # the directory form
    net = torchvision.models.resnet18(num_classes=10)
    net.conv1 = torch.nn.Conv2d(1, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool, net.fc = torch.nn.Identity(), torch.nn.Identity()
    net.load_state_dict(load_file(out / WEIGHTS_FILE), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(net.eval()(x), expected, atol=1e-5, rtol=0)


def test_export_from_an_mlflow_run_id(tmp_path, capsys):
    """A run in a real sqlite store holding checkpoint/final_checkpoint.pt, as every evaluated
    protoray run logs it; an unknown run id is one line, exit 2."""
    directory, x, expected = _trained_checkpoint(tmp_path)
    uri = f"sqlite:///{tmp_path}/mlruns.db"
    client = MlflowClient(uri)
    experiment = client.create_experiment("export", artifact_location=str(tmp_path / "artifacts"))
    run_id = client.create_run(experiment).info.run_id
    final = tmp_path / "final_checkpoint.pt"
    final.write_bytes((directory / CHECKPOINT_FILE).read_bytes())
    client.log_artifact(run_id, str(final), "checkpoint")

    out = tmp_path / "encoder"
    assert main(["export", run_id, "--to", str(out), "--tracking-uri", uri]) == 0
    net, info = load_encoder(out)
    assert info["source"]["run_id"] == run_id and info["source"]["tracking_uri"] == uri
    with torch.no_grad():
        torch.testing.assert_close(net(x), expected, atol=1e-5, rtol=0)

    capsys.readouterr()
    assert main(["export", "0" * 32, "--to", str(out), "--tracking-uri", uri]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "0" * 32 in err and "--tracking-uri" in err


def test_corrupt_and_foreign_files_are_one_line_exit_2(tmp_path, capsys):
    truncated = tmp_path / "truncated.pt"
    directory, _, _ = _trained_checkpoint(tmp_path)
    truncated.write_bytes((directory / CHECKPOINT_FILE).read_bytes()[:4000])
    foreign = tmp_path / "foreign.pt"
    torch.save(torch.nn.Linear(3, 2).state_dict(), foreign)
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not a checkpoint at all")
    for path in (truncated, foreign, garbage, tmp_path / "missing.pt"):
        assert main(["export", str(path), "--to", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and str(path) in err, err
        assert "Traceback" not in err and "weights_only" not in err
    assert not (tmp_path / "out" / WEIGHTS_FILE).exists()


def test_methods_without_a_single_backbone_are_refused(tmp_path, capsys):
    """CMC embeds with two encoders (L and ab): no one constructor rebuilds it."""
    directory, _, _ = _trained_checkpoint(tmp_path, "method={name: cmc}")
    assert main(["export", str(directory), "--to", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "cmc" in err


def test_timm_backbones_validate_and_unknown_names_are_one_line():
    for name in ("timm/resnet18", "timm/vit_tiny_patch16_224"):
        assert build_config({}, ["data.name=digits", f"model.backbone={name}"]).model.backbone == name
    with pytest.raises(ConfigError) as info:
        build_config({}, ["model.backbone=timm/nonexistent"])
    message = str(info.value)
    assert "\n" not in message and "model.backbone" in message and "timm.list_models" in message


def test_timm_vit_small_images_take_smaller_views():
    """img_size and 4 px patches below 64 px; dynamic sizes, so multi-crop's smaller views and
    evaluation at a larger side than data.view_size run."""
    from methods.encoders.backbones import build_backbone

    net = build_backbone("timm/vit_tiny_patch16_224", 3, 32)
    assert net.recipe.kwargs | {"img_size": 32, "patch_size": 4} == net.recipe.kwargs
    assert net.feature_dim == 192
    for side in (32, 20, 14):
        assert net(torch.randn(2, 3, side, side)).shape == (2, 192)


@pytest.mark.slow
def test_timm_backbone_trains_simclr_through_ray_and_exports(ray_cluster, tiny_config, tmp_path):
    """timm's ResNet-18 under SimCLR, two Ray Train workers (DDP), one epoch on 400 digits; its
    Ray Train checkpoint exports and reloads into timm's constructor."""
    from orchestration.run import train

    cfg = tiny_config("method={name: simclr, proj_hidden_dim: 64}", "model.backbone=timm/resnet18",
                      "optim.epochs=1", "data.limit=400")
    summary = train(cfg, evaluate=False)
    history = MlflowClient(summary.tracking_uri).get_metric_history(summary.run_id, "loss")
    assert [m.step for m in history] == [0] and torch.isfinite(torch.tensor(history[0].value))

    out = tmp_path / "encoder"
    assert main(["export", summary.checkpoint, "--to", str(out)]) == 0
    net, info = load_encoder(out)
    assert info["build"]["kwargs"]["model_name"] == "resnet18" and info["source"]["epoch"] == 0
    state = load_state(Path(summary.checkpoint) / CHECKPOINT_FILE)
    trained = {k.removeprefix("backbone."): v for k, v in state["model"].items()
               if k.startswith("backbone.")}
    assert all(torch.equal(net.state_dict()[k], v) for k, v in trained.items())
