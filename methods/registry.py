"""Methods by name, so configs and the trainer never branch on a method's name."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import TypeVar

import torch.nn as nn

from methods.base import Method
from methods.views import ViewSpec

M = TypeVar("M", bound=type[Method])
_METHODS: dict[str, type[Method]] = {}


def register(name: str) -> Callable[[M], M]:
    def add(cls: M) -> M:
        if name in _METHODS:
            raise ValueError(f"method {name!r} is registered twice")
        _METHODS[name] = cls
        cls.name = name
        return cls

    return add


def available() -> list[str]:
    import methods.zoo  # noqa: F401  (registers every method)

    return sorted(_METHODS)


def method_class(name: str) -> type[Method]:
    names = available()
    if name not in _METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(names)}")
    return _METHODS[name]


def hyperparameters(name: str) -> dict[str, object]:
    """The method's own keyword arguments with their (paper) defaults."""
    params = inspect.signature(method_class(name).__init__).parameters
    return {p.name: p.default for p in params.values()
            if p.name not in ("self", "backbone", "views", "seed")}


def build_method(name: str, backbone: nn.Module, views: ViewSpec, seed: int = 0, **hparams) -> Method:
    """Instantiate a registered method; an unknown hyperparameter names the method's real ones."""
    cls = method_class(name)
    allowed = hyperparameters(name)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} has no hyperparameter {', '.join(unknown)}; "
                         f"it takes {', '.join(sorted(allowed))}")
    return cls(backbone, views, seed=seed, **hparams)
