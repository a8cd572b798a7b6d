"""The experiment configuration: one pydantic model per section, loaded from YAML plus
``--set section.field=value`` overrides.

Why pydantic: every value a user can get wrong is checked before Ray starts, and the message
names the field (``method.temperature: must be > 0 (got -0.1)``) instead of surfacing as a
traceback from inside a worker ten minutes later.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from methods.backbones import BACKBONES
from methods.momentum import check_bn_splits
from methods.registry import available, hyperparameters, is_two_view

# PCL's paper warm-up is 20 of 200 epochs; the CPU-sized default (20 epochs) keeps that ratio.
DEFAULT_METHOD = {"name": "pcl", "warmup_epochs": 2}

# Training-set sizes of the built-in datasets, so cluster counts can be checked before loading.
KNOWN_TRAIN_SIZES = {"fashion_mnist": 60_000, "digits": 1_347}


class ConfigError(ValueError):
    """A configuration value is wrong; ``str()`` is one line per problem, naming the field."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(Section):
    name: Literal["fashion_mnist", "digits", "image_folder", "torchvision"] = "fashion_mnist"
    root: str | None = None  # None: the dataset's default location
    torchvision_name: str = "CIFAR10"
    image_size: int = Field(32, ge=8, description="resize image folders to this side")
    limit: int | None = Field(None, ge=2, description="use only the first N training images")
    views: str = "small"  # a preset of methods.views.PRESETS
    crop_min_scale: float | None = Field(None, gt=0, le=1)
    view_size: int | None = Field(None, ge=8, description="side the views and the E-step "
                                  "resize images to (evaluation keeps the images' own); None: "
                                  "the images' own")
    knn_holdout: int = Field(1000, ge=0, description="training images kept out for online kNN")

    @field_validator("views")
    @classmethod
    def _known_views(cls, value: str) -> str:
        from methods.views import PRESETS

        if value not in PRESETS:
            raise ValueError(f"unknown view preset {value!r}; choose one of {', '.join(PRESETS)}")
        return value


class ModelConfig(Section):
    backbone: Literal[BACKBONES] = "convnet"  # the names build_backbone knows, kept in one place


CHOICES = {"contrast_mode": ("all", "one"), "sub_network": ("fc", "same")}
"""Method hyperparameters that take one of a few words."""


class MethodConfig(BaseModel):
    """``name`` plus that method's own hyperparameters (its constructor's keyword arguments)."""

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "pcl"
    regularizer: str | None = None  # "icl_msr" wraps the method (its hyperparameters join these)

    @model_validator(mode="after")
    def _check_hyperparameters(self) -> MethodConfig:
        if self.name not in available():
            raise ValueError(f"method.name: unknown method {self.name!r}; "
                             f"choose one of {', '.join(available())}")
        try:
            allowed = hyperparameters(self.name, self.regularizer)
        except ValueError as exc:
            raise ValueError(str(exc)) from None
        if self.regularizer and not is_two_view(self.name):
            raise ValueError(f"method.regularizer: {self.regularizer} wraps two-view methods "
                             f"(simclr, moco, pcl, supcon), not {self.name}")
        for key, value in (self.model_extra or {}).items():
            if key not in allowed:
                raise ValueError(f"method.{key}: {self.name} has no such hyperparameter; it takes "
                                 f"{', '.join(sorted(allowed))}")
            default = allowed[key]
            if isinstance(default, bool) and not isinstance(value, bool):
                raise ValueError(f"method.{key} must be true or false (got {value!r})")
            if key in CHOICES and value not in CHOICES[key]:
                raise ValueError(f"method.{key} must be one of {', '.join(CHOICES[key])} "
                                 f"(got {value!r})")
            if isinstance(default, (int, float)) and not isinstance(default, bool) and (
                    isinstance(value, bool) or not isinstance(value, (int, float))):
                raise ValueError(f"method.{key} must be a number (got {value!r})")
            if isinstance(default, int) and not isinstance(default, bool) and isinstance(value, float):
                raise ValueError(f"method.{key} must be an integer (got {value!r})")
        for key, low, strict in (("temperature", 0, True), ("momentum", 0, False),
                                 ("proto_weight", 0, False), ("lambda_", 0, False),
                                 ("gamma", 0, False)):
            value = self.hparams.get(key)
            if value is not None and (value <= low if strict else value < low):
                raise ValueError(f"method.{key} must be {'>' if strict else '>='} {low} (got {value})")
        if self.hparams.get("momentum", 0) >= 1:
            raise ValueError(f"method.momentum must be < 1 (got {self.hparams['momentum']})")
        for key in ("queue_size", "num_negative_prototypes", "proj_dim", "proj_hidden_dim",
                    "bn_splits"):
            if key in self.hparams and self.hparams[key] < 1:
                raise ValueError(f"method.{key} must be >= 1 (got {self.hparams[key]})")
        return self

    @property
    def hparams(self) -> dict[str, Any]:
        """The hyperparameters given in the config (the rest take the method's defaults)."""
        return dict(self.model_extra or {})

    def resolved(self) -> dict[str, Any]:
        """Every hyperparameter, defaults filled in (what MLflow records)."""
        return {**hyperparameters(self.name, self.regularizer), **self.hparams}


class OptimConfig(Section):
    epochs: int = Field(20, ge=1)
    batch_size: int = Field(256, ge=2, description="global batch, split across workers")
    lr: float = Field(0.06, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(0, ge=0, description="linear learning-rate warm-up")
    precision: Literal["fp32", "bf16"] = Field(
        "fp32", description="bf16: forward under bfloat16 autocast (CPUs with AMX, CUDA)")


class ClusteringConfig(Section):
    num_clusters: list[int] = Field(default_factory=lambda: [50, 100, 200], min_length=1)
    niter: int = Field(20, ge=1)
    nredo: int = Field(5, ge=1, description="k-means restarts (PCL's official value is 5)")
    cpus: float = Field(1, gt=0, description="CPUs reserved for the prototype actor")

    @field_validator("num_clusters")
    @classmethod
    def _at_least_two(cls, value: list[int]) -> list[int]:
        for k in value:
            if k < 2:
                raise ValueError(f"every cluster count must be >= 2 (got {k})")
        return value


class ScalingConfig(Section):
    num_workers: int = Field(2, ge=1)
    use_gpu: bool = False
    cpus_per_worker: float = Field(1, gt=0)
    max_failures: int = Field(2, ge=-1)


class TrackingConfig(Section):
    tracking_uri: str = "sqlite:///mlruns.db"
    experiment_name: str = "protoray"
    run_name: str | None = None
    storage_path: str = "outputs/ray"  # Ray Train checkpoints; s3://... or NFS across nodes


class ExperimentConfig(Section):
    seed: int = 0
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    method: MethodConfig = Field(default_factory=lambda: MethodConfig(**DEFAULT_METHOD))
    optim: OptimConfig = Field(default_factory=OptimConfig)
    clustering: ClusteringConfig = Field(default_factory=ClusteringConfig)
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="after")
    def _cross_section(self) -> ExperimentConfig:
        warmup = self.method.hparams.get("warmup_epochs", hyperparameters(self.method.name)
                                         .get("warmup_epochs", 0))
        if isinstance(warmup, int) and warmup >= self.optim.epochs and self._needs_prototypes():
            raise ValueError(f"method.warmup_epochs ({warmup}) must be < optim.epochs "
                             f"({self.optim.epochs}), or the prototypes are never used")
        if self.optim.batch_size % self.scaling.num_workers:
            raise ValueError(f"optim.batch_size ({self.optim.batch_size}) must be divisible by "
                             f"scaling.num_workers ({self.scaling.num_workers})")
        check_bn_splits(self.method.hparams.get("bn_splits", 1),
                        self.optim.batch_size // self.scaling.num_workers)
        if self.data.view_size is not None and self.model.backbone == "vit_tiny":
            raise ValueError("data.view_size: vit_tiny takes one input side, and evaluation feeds "
                             "the images at their own; leave data.view_size unset for it")
        size = self.train_size()
        if size is not None:
            for k in self.clustering.num_clusters:
                if self._needs_prototypes() and k >= size:
                    raise ValueError(f"clustering.num_clusters: {k} must be below the number of "
                                     f"training samples ({size})")
            if self.optim.batch_size > size:
                raise ValueError(f"optim.batch_size ({self.optim.batch_size}) exceeds the "
                                 f"{size} training samples")
        return self

    def _needs_prototypes(self) -> bool:
        from methods.registry import method_class

        return method_class(self.method.name).needs_prototypes

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
        for section in ("data", "model", "optim", "clustering", "scaling", "tracking"):
            for key, value in getattr(self, section).model_dump().items():
                out[f"{section}.{key}"] = value
        out["method.name"] = self.method.name
        out["method.regularizer"] = self.method.regularizer
        for key, value in self.method.resolved().items():
            out[f"method.{key}"] = value
        return out


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
