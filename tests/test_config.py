"""Every bad configuration gives a one-line message naming the field; the CLI exits with 2."""

from __future__ import annotations

from pathlib import Path

import pytest

from methods import registry
from orchestration.cli import main
from orchestration.config import ConfigError, build_config, load_config, to_yaml

ROOT = Path(__file__).resolve().parents[1]

INVALID = [
    # (overrides, a fragment the message must contain)
    (["method.temperature=0"], "temperature"),
    (["optim.precision=fp16"], "precision"),
    (["method.temperature=-0.1"], "temperature"),
    (["method.temperature=abc"], "temperature"),
    (["method.momentum=1.0"], "momentum"),
    (["method.momentum=-0.5"], "momentum"),
    (["method.proto_weight=-1"], "proto_weight"),
    (["method.queue_size=0"], "queue_size"),
    (["method.queue_size=12.5"], "queue_size"),
    (["method.num_negative_prototypes=0"], "num_negative_prototypes"),
    (["method.bn_splits=0"], "bn_splits"),
    (["method.bn_splits=65", "optim.batch_size=256", "scaling.num_workers=2"], "bn_splits"),
    (["method.name=nosuch"], "unknown method"),
    (["method.nosuch=1"], "nosuch"),
    (["method.name=simclr", "method.queue_size=10"], "queue_size"),
    (["method.gather_distributed=3", "method.name=simclr"], "gather_distributed"),
    (["method.regularizer=nosuch"], "unknown regularizer"),
    (["method.lambda_=0.5"], "lambda_"),
    (["method.regularizer=icl_msr", "method.lambda_=-0.5"], "lambda_"),
    (["method.regularizer=icl_msr", "method.gamma=-1"], "gamma"),
    (["method.regularizer=icl_msr", "method.num_semantics=2.5"], "num_semantics"),
    (["method={name: selfcon, regularizer: icl_msr}"], "two-view"),
    (["method={name: supcon, contrast_mode: 3}"], "contrast_mode"),
    (["clustering.num_clusters=[1, 10]"], "num_clusters"),
    (["clustering.num_clusters=[]"], "num_clusters"),
    (["clustering.num_clusters=[10, 60000]"], "num_clusters"),
    (["clustering.num_clusters=[10, 2000]", "data.name=digits"], "num_clusters"),
    (["clustering.num_clusters=ten"], "num_clusters"),
    (["clustering.nredo=0"], "nredo"),
    (["clustering.cpus=0"], "cpus"),
    (["optim.batch_size=255", "scaling.num_workers=2"], "batch_size"),
    (["optim.batch_size=1"], "batch_size"),
    (["optim.batch_size=4096", "data.name=digits"], "batch_size"),
    (["optim.lr=0"], "lr"),
    (["optim.lr=-1"], "lr"),
    (["optim.momentum=1"], "momentum"),
    (["optim.weight_decay=-1e-4"], "weight_decay"),
    (["optim.epochs=0"], "epochs"),
    (["optim.nosuch=1"], "nosuch"),
    (["scaling.num_workers=0"], "num_workers"),
    (["scaling.cpus_per_worker=0"], "cpus_per_worker"),
    (["scaling.use_gpu=maybe"], "use_gpu"),
    (["data.name=imagenet"], "data.name"),
    (["data.views=nosuch"], "views"),
    (["data.crop_min_scale=0"], "crop_min_scale"),
    (["data.crop_min_scale=1.5"], "crop_min_scale"),
    (["data.limit=1"], "limit"),
    (["data.view_size=4"], "view_size"),
    (["data.view_size=20", "model.backbone=vit_tiny"], "view_size"),
    (["model.backbone=vgg"], "backbone"),
    (["nosection.x=1"], "nosection"),
    (["seed=abc"], "seed"),
    (["optim.lr=inf"], "optim.lr"),
    (["optim.weight_decay=.nan"], "optim.weight_decay"),
    (["method.temperature=inf"], "method.temperature"),
    (["method.proto_weight=.nan"], "method.proto_weight"),
    (["clustering.cpus=inf"], "clustering.cpus"),
    (["data.crop_min_scale=nan"], "crop_min_scale"),
]


@pytest.mark.parametrize(("overrides", "fragment"), INVALID, ids=[" ".join(o) for o, _ in INVALID])
def test_invalid_config_is_one_clear_line(overrides, fragment):
    with pytest.raises(ConfigError) as info:
        build_config({}, overrides)
    message = str(info.value)
    assert "\n" not in message and "Traceback" not in message
    assert fragment in message


def test_there_are_at_least_30_invalid_configs():
    assert len(INVALID) >= 30


def test_malformed_override_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected section.field=value"):
        build_config({}, ["method.temperature"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(scalar)


def test_defaults_are_pcl_on_fashion_mnist_and_round_trip(monkeypatch):
    # a run earlier in this process set it (mlflow.set_tracking_uri exports the variable)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = build_config()
    assert (cfg.method.name, cfg.data.name) == ("pcl", "fashion_mnist")
    assert cfg.tracking.tracking_uri == "sqlite:///mlruns.db"
    again = build_config(__import__("yaml").safe_load(to_yaml(cfg)))
    assert again == cfg
    flat = cfg.flat()
    assert flat["method.temperature"] == 0.2 and flat["clustering.num_clusters"] == [50, 100, 200]


def test_regularizer_hyperparameters_join_the_method_and_round_trip():
    cfg = build_config({}, ["method.regularizer=icl_msr", "method.lambda_=0.3"])
    flat = cfg.flat()
    assert flat["method.regularizer"] == "icl_msr" and flat["method.lambda_"] == 0.3
    assert flat["method.gamma"] == 0.1 and "method.warmup_epochs" in flat  # regularizer + base
    assert build_config(__import__("yaml").safe_load(to_yaml(cfg))) == cfg


def test_bn_splits_bounds_only_a_split_batch():
    """Two images per worker are fine without slices (one would leave BatchNorm a single value
    per channel: test_unlabelled); 64 slices of 128 images per worker are too."""
    build_config({}, ["method.name=simclr", "optim.batch_size=4", "scaling.num_workers=2"])
    build_config({}, ["method.bn_splits=64", "optim.batch_size=256", "scaling.num_workers=2"])
    with pytest.raises(ConfigError, match="method.bn_splits"):
        build_config({}, ["method.bn_splits=65", "optim.batch_size=256", "scaling.num_workers=2"])


def test_overrides_are_typed_yaml_values():
    cfg = build_config({}, ["method.temperature=0.1", "clustering.num_clusters=[10, 20]",
                            "scaling.use_gpu=true"])
    assert cfg.method.hparams["temperature"] == 0.1
    assert cfg.clustering.num_clusters == [10, 20] and cfg.scaling.use_gpu is True


def test_every_shipped_config_is_valid():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(path)


def test_cli_bad_config_exits_2_with_one_line(capsys):
    assert main(["train", "--set", "method.temperature=-1"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "method.temperature" in err


def test_cli_missing_checkpoint_exits_2(capsys, tmp_path):
    assert main(["eval", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_corrupt_checkpoint_exits_2(capsys, tmp_path):
    path = tmp_path / "state.pt"
    path.write_bytes(b"not a checkpoint")
    assert main(["eval", str(path)]) == 2
    assert str(path) in capsys.readouterr().err


def test_cli_help_lists_subcommands(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "train" in out and "eval" in out


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_validates(path):
    """A config whose hyperparameters drifted from its method's signature fails here, not in a
    user's ``ray job submit``."""
    cfg = load_config(path)
    assert cfg.method.name in registry.available()


def test_view_size_resizes_training_views_and_evaluation_keeps_the_images_side():
    import torch

    from methods.data.views import to_input
    from methods.training import encode
    from orchestration.builders import make_method

    method = make_method(build_config(overrides=["data.view_size=20"]), 1, 28)
    images = torch.randint(0, 256, (3, 1, 28, 28), dtype=torch.uint8)
    assert method.view(images).shape[-2:] == (20, 20)
    assert to_input(images, method.views).shape[-2:] == (20, 20)  # what the E-step encodes
    side = encode(lambda x: x.new_full((len(x), 1), x.shape[-1]), images, method, native_size=True)
    assert (side == 28).all()  # evaluation: the images' own side
    assert make_method(build_config(), 1, 28).views.size == 28  # unset: the images' own side


def test_yaml_numbers_without_a_dot_are_floats_wherever_the_constructor_takes_one():
    """YAML reads ``1e-1`` as a string; a method hyperparameter typed float takes it as 0.1, as
    ``optim.lr`` always did."""
    cfg = build_config({}, ["method.temperature=1e-1", "optim.lr=1e-1"])
    assert cfg.method.hparams["temperature"] == 0.1 and isinstance(cfg.method.hparams["temperature"], float)
    assert cfg.optim.lr == 0.1
    assert cfg.method.schedule().temperature == 0.1
    with pytest.raises(ConfigError, match="method.queue_size must be an integer"):
        build_config({}, ["method.queue_size=1e3"])


def test_the_method_owns_its_prototype_schedule():
    """Warm-up and temperature of the E-step come from the method's schedule, defaults included;
    methods that never cluster have none."""
    cfg = build_config({}, ["method={name: pcl, temperature: 0.3}", "optim.epochs=30"])
    assert cfg.method.schedule().temperature == 0.3
    assert cfg.method.schedule().warmup_epochs == registry.hyperparameters("pcl")["warmup_epochs"]
    assert build_config({}, ["method.name=simclr"]).method.schedule() is None
    wrapped = build_config({}, ["method={name: pcl, regularizer: icl_msr, warmup_epochs: 3}"])
    assert wrapped.method.schedule().warmup_epochs == 3
    schedule = cfg.method.schedule()
    assert not schedule.active(schedule.warmup_epochs - 1) and schedule.active(schedule.warmup_epochs)


def test_no_prototype_actor_cpu_for_methods_that_never_cluster():
    from orchestration.resources import cpus_per_run

    pcl, simclr = build_config(), build_config({}, ["method.name=simclr"])
    assert cpus_per_run(pcl) == cpus_per_run(simclr) + pcl.clustering.cpus


@pytest.mark.parametrize("override, field", [
    ("clustering.actor_resources={CPU: 1}", "clustering.actor_resources"),
    ("scaling.worker_resources={train_slot: 0}", "scaling.worker_resources"),
    ("scaling.worker_resources={GPU: 1}", "scaling.worker_resources")])
def test_placement_resources_are_custom_and_positive(override, field):
    with pytest.raises(ConfigError, match=field):
        build_config({}, [override])


def test_an_embedded_cluster_offers_the_custom_resources_a_config_asks_for():
    from orchestration.resources import custom_resources

    cfg = build_config({}, ["clustering.actor_resources={prototype_actor: 1}",
                            "scaling.worker_resources={train_slot: 1}", "scaling.num_workers=2"])
    assert custom_resources(cfg) == {"prototype_actor": 1, "train_slot": 2}
    assert custom_resources(cfg, runs=2) == {"prototype_actor": 2, "train_slot": 4}
    simclr = build_config({}, ["method.name=simclr", "clustering.actor_resources={prototype_actor: 1}"])
    assert custom_resources(simclr) == {}  # no prototype actor, nothing to place


def test_a_cluster_without_the_asked_resource_is_one_line(ray_cluster):
    from orchestration.resources import check_cluster

    with pytest.raises(ConfigError, match=r"clustering.actor_resources: .*ray start --resources"):
        check_cluster(build_config({}, ["clustering.actor_resources={prototype_actor: 1}"]))
    check_cluster(build_config())  # nothing custom asked: nothing to say


@pytest.mark.parametrize("overrides", [["method.warmup_epochs=20", "optim.epochs=20"],
                                       ["method.warmup_epochs=30", "optim.epochs=20"],
                                       ["optim.epochs=1"]])
def test_a_warmup_as_long_as_the_run_is_a_one_line_notice(overrides, capsys):
    """A smoke run shorter than PCL's warm-up trains (without prototypes); the CLI says so in one
    line naming both fields before Ray starts."""
    [notice] = build_config({}, overrides).notices()
    assert "method.warmup_epochs" in notice and "optim.epochs" in notice and "\n" not in notice
    assert build_config({}, ["optim.epochs=3"]).notices() == []
    assert build_config({}, ["method.name=simclr", "optim.epochs=1"]).notices() == []


def test_bn_splits_must_divide_each_workers_batch():
    """tiny_digits with a global batch of 20 on 2 workers: 10 images per worker do not split in
    4 equal slices (torch.chunk gave 3, 3, 3, 1 and BatchNorm failed on the 1-image slice)."""
    with pytest.raises(ConfigError, match="method.bn_splits") as info:
        load_config(ROOT / "configs" / "tiny_digits.yaml", ["optim.batch_size=20", "method.bn_splits=4"])
    assert "10 images" in str(info.value)
    load_config(ROOT / "configs" / "tiny_digits.yaml", ["optim.batch_size=20", "method.bn_splits=5"])


def test_mlflow_tracking_uri_is_honoured_where_the_config_names_none(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.example:5000")
    assert load_config(ROOT / "configs" / "demo.yaml").tracking.tracking_uri == "http://mlflow.example:5000"
    named = load_config(ROOT / "configs" / "demo.yaml", ["tracking.tracking_uri=sqlite:///x.db"])
    assert named.tracking.tracking_uri == "sqlite:///x.db"
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert build_config().tracking.tracking_uri == "sqlite:///mlruns.db"


def test_cli_corrupt_checkpoint_is_one_line_and_a_directory_is_accepted(capsys, tmp_path):
    """torch's own error for a foreign file is a page of advice (weights_only=False ...); the CLI
    gives one line naming the file. A Ray Train checkpoint directory is read through its state.pt."""
    path = tmp_path / "state.pt"
    path.write_bytes(b"PK\x03\x04 not really a zip")
    assert main(["eval", str(tmp_path)]) == 2  # the directory form, its state.pt corrupt
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(path) in err and "unreadable" in err
    assert "weights_only" not in err
    assert main(["eval", str(tmp_path / "empty")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_missing_dataset_files_are_one_line_before_ray_starts(capsys, tmp_path):
    """data.root pointing at a folder without Fashion-MNIST's files: exit 2 and one line naming
    the file, from the driver (before, a traceback from inside Ray Train minutes in, exit 1)."""
    import ray

    was = ray.is_initialized()
    assert main(["train", "--set", f"data.root={tmp_path}"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and str(tmp_path) in err and "train-images-idx3-ubyte" in err
    assert ray.is_initialized() == was  # no Ray started for it
    (tmp_path / "train-images-idx3-ubyte").write_bytes(b"garbage!")
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01")
    assert main(["train", "--set", f"data.root={tmp_path}"]) == 2
    assert "not an unsigned-byte IDX file" in capsys.readouterr().err
    assert main(["train", "--set", "data.name=image_folder", "--set", f"data.root={tmp_path}/no"]) == 2
    assert "is not a folder" in capsys.readouterr().err


def test_use_gpu_without_a_gpu_fails_before_ray_starts(capsys):
    """Before: the worker group waited for GPUs that never come, the controller retrying without
    limit. Now one line naming scaling.use_gpu and what the machine has, exit 2."""
    import ray
    import torch

    if torch.cuda.device_count() >= 2:
        pytest.skip("this machine has the GPUs")
    was = ray.is_initialized()
    assert main(["train", str(ROOT / "configs" / "tiny_digits.yaml"), "--set", "scaling.use_gpu=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "scaling.use_gpu" in err and "this machine has" in err
    assert ray.is_initialized() == was
