"""The experiment configuration: one pydantic model per section, loaded from YAML plus
``--set section.field=value`` overrides.

Why pydantic: every value a user can get wrong is checked before Ray starts, and the message
names the field (``method.temperature: must be > 0 (got -0.1)``) instead of surfacing as a
traceback from inside a worker ten minutes later.
"""

from __future__ import annotations

import math
import os
import typing
from pathlib import Path
from typing import Any, Literal

import torch
import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from methods.base import Method, PrototypeSchedule
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone, check_backbone_name
from methods.encoders.batchnorm import SplitBatchNorm
from methods.registry import (
    available,
    build_method,
    hyperparameters,
    method_class,
    prototype_schedule,
    regularizer_class,
)
from methods.training import OptimConfig

# PCL's paper warm-up is 20 of 200 epochs; the CPU-sized default (20 epochs) keeps that ratio.
DEFAULT_METHOD = {"name": "pcl", "warmup_epochs": 2}

# Training-set sizes and image shapes (channels, side) of the built-in datasets, so cluster
# counts and the method can be checked before any data is loaded.
KNOWN_TRAIN_SIZES = {"fashion_mnist": 60_000, "digits": 1_347}
KNOWN_SHAPES = {"fashion_mnist": (1, 28), "digits": (1, 8), "torchvision": (3, 32)}
STREAMED = ("image_folder", "parquet")  # the sources Ray Data can stream
# ``data.loader: auto`` streams a source whose decoded training set is larger than this per worker
MEMORY_LOADER_BYTES = 2**30


class ConfigError(ValueError):
    """A configuration value is wrong; ``str()`` is one line per problem, naming the field."""


class Section(BaseModel):
    # inf and nan are refused wherever a number goes (an lr of inf trains until the NaN stop)
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class DataSection(Section):
    name: Literal["fashion_mnist", "digits", "image_folder", "parquet", "torchvision"] = \
        "fashion_mnist"
    root: str | None = None  # None: the dataset's default location
    torchvision_name: str = "CIFAR10"
    image_size: int = Field(32, ge=8, description="side image folders and parquet images are "
                            "resized to")
    channels: Literal[1, 3] | None = Field(None, description="convert every image folder / "
                                           "parquet image to grayscale (1) or RGB (3); None: the "
                                           "files' own, which must agree")
    image_column: str = "image"  # parquet: encoded image bytes (or a {bytes, path} struct)
    label_column: str | None = "label"  # parquet: integer labels (nulls: unlabelled); None: none
    labels: Literal["auto", "folders", "none"] = Field(
        "auto", description="image_folder: folders: the first sub-folder is the class; none: "
        "train without labels; auto: folders when every image sits in a sub-folder")
    loader: Literal["auto", "memory", "stream"] = Field(
        "auto", description="memory: decode the training set into every worker; stream: Ray "
        "Data decodes it in CPU tasks while the workers train (image_folder and parquet only); "
        "auto: stream when the decoded set exceeds MEMORY_LOADER_BYTES per worker")
    decode_cpus: float = Field(1, gt=0, description="logical CPUs per worker for Ray Data's "
                               "decoding tasks (streaming)")
    prefetch_batches: int = Field(2, ge=0, description="batches a worker decodes ahead (streaming)")
    object_store_mb: int = Field(1024, ge=64, description="object-store memory one worker's "
                                 "stream may hold (streaming)")
    eval_limit: int = Field(50_000, ge=100, description="streamed sources: training and test "
                            "images the final evaluation decodes (a seeded sample)")
    limit: int | None = Field(None, ge=2, description="use only the first N training images")
    views: str = "small"  # a preset of methods.data.views.PRESETS
    crop_min_scale: float | None = Field(None, gt=0, le=1)
    view_size: int | None = Field(None, ge=8, description="side the views and the E-step "
                                  "resize images to (evaluation keeps the images' own); None: "
                                  "the images' own")
    knn_holdout: int = Field(1000, ge=0, description="training images kept out for online kNN")

    @model_validator(mode="after")
    def _stream_sources(self) -> DataSection:
        if self.loader == "stream" and self.name not in STREAMED:
            raise ValueError(f"data.loader: stream reads {' and '.join(STREAMED)} sources, not "
                             f"{self.name}; write it out with `protoray export-dataset` first")
        return self

    def streams(self, num_images: int, channels: int) -> bool:
        """Whether training streams: the rule ``loader: auto`` applies, given the training set's
        size. Built-in sets always load into memory."""
        if self.name not in STREAMED or self.loader == "memory":
            return False
        return self.loader == "stream" or num_images * channels * self.image_size**2 > \
            MEMORY_LOADER_BYTES

    @field_validator("views")
    @classmethod
    def _known_views(cls, value: str) -> str:
        from methods.data.views import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown view preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value


class ModelSection(Section):
    # methods.encoders.backbones.BACKBONES, or timm/<any name timm.list_models() gives>
    backbone: str = "convnet"

    @field_validator("backbone")
    @classmethod
    def _known_backbone(cls, value: str) -> str:
        return check_backbone_name(value)  # build_backbone's names, kept in one place


class MethodSection(BaseModel):
    """``name`` plus that method's own hyperparameters (its constructor's keyword arguments).

    The constructors are the one source of truth: a value's type comes from the constructor's
    annotation (so ``1e-1`` is a float wherever the constructor takes one), its range from the
    constructor's own checks, run on a throw-away model in ``ExperimentConfig``'s validation.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "pcl"
    regularizer: str | None = None  # "icl_msr" wraps the method (its hyperparameters join these)

    @model_validator(mode="after")
    def _check_hyperparameters(self) -> MethodSection:
        cls = method_class(self.name)
        allowed = hyperparameters(self.name, self.regularizer)
        if self.regularizer and not cls.is_two_view():
            two_view = ", ".join(n for n in available() if method_class(n).is_two_view())
            raise ValueError(f"method.regularizer: {self.regularizer} wraps two-view methods "
                             f"({two_view}), not {self.name}")
        types = _annotations(self.name, self.regularizer)
        for key, value in (self.model_extra or {}).items():
            if key not in allowed:
                raise ValueError(f"method.{key}: {self.name} has no such hyperparameter; it takes "
                                 f"{', '.join(sorted(allowed))}")
            self.__pydantic_extra__[key] = _coerce(key, value, types.get(key))
        return self

    @property
    def hparams(self) -> dict[str, Any]:
        """The hyperparameters given in the config (the rest take the method's defaults)."""
        return dict(self.model_extra or {})

    def resolved(self) -> dict[str, Any]:
        """Every hyperparameter, defaults filled in (what MLflow records)."""
        return {**hyperparameters(self.name, self.regularizer), **self.hparams}

    def schedule(self) -> PrototypeSchedule | None:
        """What the method asks of the clustering E-step; None when it never clusters."""
        return prototype_schedule(self.name, self.hparams)


def _annotations(name: str, regularizer: str | None) -> dict[str, Any]:
    hints = dict(typing.get_type_hints(method_class(name).__init__))
    if regularizer:
        hints.update(typing.get_type_hints(regularizer_class(regularizer).__init__))
    return hints


_TYPE_WORDS = {bool: "true or false", int: "an integer", float: "a number", str: "a word"}


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """``value`` as the constructor's annotation types it; one line naming ``method.key`` if not."""
    if annotation is None:
        return value
    try:
        value = TypeAdapter(annotation).validate_python(value, strict=annotation is bool)
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"method.{key} must be a finite number (got {value!r})")
        return value
    except ValidationError:
        if typing.get_origin(annotation) is Literal:
            what = "one of " + ", ".join(map(str, typing.get_args(annotation)))
        else:
            what = _TYPE_WORDS.get(annotation, str(annotation))
        raise ValueError(f"method.{key} must be {what} (got {value!r})") from None


class OptimSection(Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=2, description="global batch, split across workers")
    lr: float = Field(0.06, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(0, ge=0, description="linear learning-rate warm-up")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward under bfloat16 autocast (CPUs with AMX, CUDA)")
    online_probe: bool = Field(True, description="train a linear classifier on the detached "
                               "backbone feature with the labels, where the data has them; "
                               "report its hold-out accuracy (probe_holdout) every epoch")

    def training(self) -> OptimConfig:
        """The optimiser settings ``methods.training`` takes."""
        return OptimConfig(self.lr, self.momentum, self.weight_decay, self.warmup_epochs,
                           self.precision)


def _custom_resources(value: dict[str, float], instead: str) -> dict[str, float]:
    """Custom Ray resource amounts: positive, and not the CPUs or GPUs set by ``instead``."""
    for name, amount in value.items():
        if name in ("CPU", "GPU", "memory", "object_store_memory"):
            raise ValueError(f"{name} is set by {instead}; list only custom resources here")
        if amount <= 0:
            raise ValueError(f"{name}: amounts must be > 0 (got {amount})")
    return value


class ClusteringSection(Section):
    num_clusters: list[int] = Field(default_factory=lambda: [50, 100, 200], min_length=1)
    niter: int = Field(20, ge=1)
    nredo: int = Field(5, ge=1, description="k-means restarts (PCL's official value is 5)")
    cpus: float = Field(1, gt=0, description="CPUs reserved for the prototype actor")
    gpus: int = Field(0, ge=0, le=1, description="1: the prototype actor holds a GPU and runs the "
                      "gathered k-means there in torch; 0: faiss on its clustering.cpus threads")
    strategy: Literal["auto", "gather", "sharded"] = Field(
        "auto", description="gather: the actor runs faiss on every worker's features; sharded: "
        "Lloyd rounds with the features staying on their workers; auto: the cheaper by the cost "
        "model of orchestration.cost_model (protoray plan prints both estimates)")
    # custom Ray resources the prototype actor asks for, which place it on the nodes started with
    # them (`ray start --resources '{"prototype_actor": 1}'`); empty: any node with a free CPU
    actor_resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("actor_resources")
    @classmethod
    def _custom_actor(cls, value: dict[str, float]) -> dict[str, float]:
        return _custom_resources(value, "clustering.cpus")

    @field_validator("num_clusters")
    @classmethod
    def _at_least_two(cls, value: list[int]) -> list[int]:
        for k in value:
            if k < 2:
                raise ValueError(f"every cluster count must be >= 2 (got {k})")
        return value


class ScalingSection(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(2, ge=-1)
    # BatchNorm statistics over every worker's batch (torch's SyncBatchNorm, GPUs only); None:
    # what the method's reference does, when more than one GPU worker trains
    sync_batchnorm: bool | None = None
    # custom Ray resources each Train worker asks for besides its CPUs and GPU: which nodes may
    # host a worker (a node started with `--resources '{"train_slot": 1}'` hosts at most one)
    worker_resources: dict[str, float] = Field(default_factory=dict)

    @field_validator("worker_resources")
    @classmethod
    def _custom_worker(cls, value: dict[str, float]) -> dict[str, float]:
        return _custom_resources(value, "scaling.cpus_per_worker and scaling.use_gpu")


class TrackingSection(Section):
    # MLFLOW_TRACKING_URI where the config names none (what MLflow's own clients do)
    tracking_uri: str = Field(default_factory=lambda: os.environ.get("MLFLOW_TRACKING_URI",
                                                                     "sqlite:///mlruns.db"))
    experiment_name: str = "protoray"
    run_name: str | None = None
    storage_path: str = "outputs/ray"  # Ray Train checkpoints; s3://... or NFS across nodes


def input_shape(data: DataSection) -> tuple[int, int]:
    """(channels, side) the training images will have: the built-in sets' own, else RGB at
    ``data.image_size``."""
    return KNOWN_SHAPES.get(data.name, (data.channels or 3, data.image_size))


class ExperimentConfig(Section):
    seed: int = 0
    data: DataSection = Field(default_factory=DataSection)
    model: ModelSection = Field(default_factory=ModelSection)
    method: MethodSection = Field(default_factory=lambda: MethodSection(**DEFAULT_METHOD))
    optim: OptimSection = Field(default_factory=OptimSection)
    clustering: ClusteringSection = Field(default_factory=ClusteringSection)
    scaling: ScalingSection = Field(default_factory=ScalingSection)
    tracking: TrackingSection = Field(default_factory=TrackingSection)
    # a labelled set to score the online kNN and the final kNN, linear and AMI/NMI/ARI on, as
    # ImageNet pre-training is scored; None: the training source's own labels, where it has any
    eval_data: DataSection | None = None

    @model_validator(mode="after")
    def _cross_section(self) -> ExperimentConfig:
        if self.optim.batch_size % self.scaling.num_workers:
            raise ValueError(f"optim.batch_size ({self.optim.batch_size}) must be divisible by "
                             f"scaling.num_workers ({self.scaling.num_workers})")
        if self.data.view_size is not None and self.model.backbone == "vit_tiny":
            raise ValueError("data.view_size: vit_tiny takes one input side, and evaluation feeds "
                             "the images at their own; leave data.view_size unset for it")
        self._check_method_builds()
        schedule = self.method.schedule()
        size = self.train_size()
        if size is not None:
            for k in self.clustering.num_clusters:
                if schedule is not None and k >= size:
                    raise ValueError(f"clustering.num_clusters: {k} must be below the number of "
                                     f"training samples ({size})")
            if self.optim.batch_size > size:
                raise ValueError(f"optim.batch_size ({self.optim.batch_size}) exceeds the "
                                 f"{size} training samples")
        return self

    def notices(self) -> list[str]:
        """Settings that are valid but probably not what a full run wants, one line each (the
        CLI and the benchmarks print them before anything starts). A warm-up as long as the run
        is one: fine for a smoke run, a mistake in a recipe."""
        schedule = self.method.schedule()
        if schedule is not None and schedule.warmup_epochs >= self.optim.epochs:
            return [f"method.warmup_epochs ({schedule.warmup_epochs}) >= optim.epochs "
                    f"({self.optim.epochs}): no E-step runs and the prototypes are never used; "
                    f"lower method.warmup_epochs for a real run"]
        return []

    def sync_batchnorm(self) -> bool:
        """Whether the workers convert the method's BatchNorm to SyncBatchNorm."""
        s = self.scaling
        if s.sync_batchnorm is not None:
            return s.sync_batchnorm
        return (method_class(self.method.name).reference_sync_batchnorm and s.use_gpu
                and s.num_workers > 1)

    def build_method(self, in_channels: int, image_size: int, seed: int = 0) -> Method:
        """The configured method for images of ``in_channels`` x ``image_size`` px: views at
        ``data.view_size`` (else the images' side), the backbone, the method's hyperparameters.
        Raises ``ValueError`` naming the field a constructor refuses."""
        d = self.data
        crops = {} if d.crop_min_scale is None else {"crop_scale": (d.crop_min_scale, 1.0)}
        size = d.view_size or image_size  # below the images' side: more epochs per hour
        views = view_spec(d.views, size=size, **crops)
        backbone = build_backbone(self.model.backbone, in_channels, size)
        return build_method(self.method.name, backbone, views, seed=seed,
                            regularizer=self.method.regularizer, **self.method.hparams)

    def _check_method_builds(self) -> None:
        """Build the method once on the configured backbone: its constructor's range checks are
        the hyperparameters' only validation, and a per-worker batch it cannot split (MoCo's
        shuffling BN) fails here rather than in a worker."""
        method = self.build_method(*input_shape(self.data))
        per_worker = self.optim.batch_size // self.scaling.num_workers
        method.check_batch_size(per_worker)
        check_batchnorm_batch(method, per_worker)
        if self.clustering.gpus and self.clustering.strategy == "sharded":
            raise ValueError("clustering.gpus: the actor's GPU runs the gathered k-means, and "
                             "clustering.strategy: sharded assigns on the workers; set "
                             "clustering.gpus: 0 or clustering.strategy: auto or gather")
        if self.scaling.sync_batchnorm and not self.scaling.use_gpu:
            raise ValueError("scaling.sync_batchnorm: torch's SyncBatchNorm runs on GPUs only; set "
                             "scaling.use_gpu: true or scaling.sync_batchnorm: false")
        if self.sync_batchnorm() and any(isinstance(m, SplitBatchNorm) for m in method.modules()):
            raise ValueError("scaling.sync_batchnorm: this method shuffles BatchNorm in slices "
                             "(method.bn_splits > 1) instead; set one of them off")
        d = self.data
        if (method.rank_state() is not None and d.name == "parquet" and d.loader != "memory"
                and self.scaling.num_workers > 1):
            # rank r owns bank rows r, r + W, ...; a streamed parquet shard is whole row groups
            raise ValueError(f"data.loader: {self.method.name}'s memory bank is split by image "
                             "index across workers, and streamed parquet row groups are not; "
                             "set data.loader: memory, use one worker, or an image folder")

    def train_size(self) -> int | None:
        """Training samples after the kNN hold-out and ``limit``, when knowable without loading."""
        size = KNOWN_TRAIN_SIZES.get(self.data.name)
        if size is None:
            return None
        if self.data.limit:
            size = min(size, self.data.limit)
        return size - min(self.data.knn_holdout, size // 5)

    def flat(self) -> dict[str, Any]:
        """``section.field`` -> value, for MLflow params and sweep keys."""
        out: dict[str, Any] = {"seed": self.seed}
        for section in ("data", "model", "optim", "clustering", "scaling", "tracking", "eval_data"):
            if getattr(self, section) is None:
                continue
            for key, value in getattr(self, section).model_dump().items():
                out[f"{section}.{key}"] = value
        out["method.name"] = self.method.name
        out["method.regularizer"] = self.method.regularizer
        for key, value in self.method.resolved().items():
            out[f"method.{key}"] = value
        return out


def check_batchnorm_batch(method: Method, per_worker: int) -> None:
    """Refuse a per-worker batch at which a training-mode BatchNorm after global pooling (the
    projection heads' ``BatchNorm1d``) would see one value per channel: torch raises there, and
    a 1-image slice has no batch statistics to normalise by. Split BatchNorm counts per slice.
    Raises ``ValueError`` naming ``optim.batch_size`` and the smallest value that trains."""
    norms = [m for m in method.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return
    splits = max([getattr(m, "splits", 1) for m in norms])
    if per_worker // splits < 2:
        raise ValueError(f"optim.batch_size: {per_worker} image(s) per worker in {splits} "
                         f"BatchNorm slice(s) leaves BatchNorm one value per channel; set "
                         f"optim.batch_size to at least 2 x {splits} x scaling.num_workers")


def _format(error: ValidationError) -> str:
    lines = []
    for item in error.errors():
        loc = ".".join(str(p) for p in item["loc"])
        msg = item["msg"].removeprefix("Value error, ")
        if item["type"] == "extra_forbidden":
            msg = "unknown key (check its spelling and section)"
        shown = "" if item["type"] in ("extra_forbidden", "value_error") else f" (got {item['input']!r})"
        # cross-field checks already start with the full field name (method.temperature ...)
        named = not loc or msg.startswith(loc + ".")
        lines.append(f"{msg}{shown}" if named else f"{loc}: {msg}{shown}")
    return "; ".join(lines)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"method.temperature=0.1"`` -> (["method", "temperature"], 0.1); values are YAML."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected section.field=value")
    key, raw = text.split("=", 1)
    path = key.strip().split(".")
    if not all(path):
        raise ConfigError(f"--set {text!r}: empty name in {key!r}")
    return path, yaml.safe_load(raw)


def set_path(tree: dict[str, Any], path: list[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(path)}: {part} is a value, not a section")
        node = child
    node[path[-1]] = value


def build_config(tree: dict[str, Any] | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Validate a config tree with overrides; raise ``ConfigError`` with a one-line message."""
    tree = dict(tree or {})
    tree = yaml.safe_load(yaml.safe_dump(tree))  # deep copy, plain types
    for text in overrides:
        set_path(tree, *parse_override(text))
    method = tree.get("method")
    if isinstance(method, dict) and "name" not in method:
        tree["method"] = {**DEFAULT_METHOD, **method}  # a method section without a name is PCL's
    try:
        return ExperimentConfig.model_validate(tree)
    except ValidationError as exc:
        raise ConfigError(_format(exc)) from None


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    tree: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist (see configs/ for examples)")
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(tree, dict):
            raise ConfigError(f"{path} must hold a mapping of sections, got {type(tree).__name__}")
    return build_config(tree, overrides)


def to_yaml(cfg: ExperimentConfig) -> str:
    tree = cfg.model_dump()
    tree["method"] = {"name": cfg.method.name, **cfg.method.hparams}
    if cfg.method.regularizer:
        tree["method"]["regularizer"] = cfg.method.regularizer
    return yaml.safe_dump(tree, sort_keys=False)
