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


def is_two_view(name: str) -> bool:
    """Whether the method scores a positive pair through ``pair_features`` / ``pair_loss``."""
    return method_class(name).pair_loss is not Method.pair_loss


def regularizer_class(name: str) -> type[Method]:
    """Wrappers that add a term to any two-view method (``method.regularizer`` in a config)."""
    from methods.zoo.icl_msr import ICLMSR, REGULARIZER

    known = {REGULARIZER: ICLMSR}
    if name not in known:
        raise ValueError(f"method.regularizer: unknown regularizer {name!r}; choose one of "
                         f"{', '.join(known)}")
    return known[name]


def _own_parameters(fn: Callable, skip: tuple[str, ...]) -> dict[str, object]:
    params = inspect.signature(fn).parameters
    return {p.name: p.default for p in params.values() if p.name not in skip}


def hyperparameters(name: str, regularizer: str | None = None) -> dict[str, object]:
    """The method's own keyword arguments with their (paper) defaults, plus the regularizer's
    when one is named."""
    out = _own_parameters(method_class(name).__init__, ("self", "backbone", "views", "seed"))
    if regularizer is not None:
        out.update(_own_parameters(regularizer_class(regularizer).__init__, ("self", "base")))
    return out


def build_method(name: str, backbone: nn.Module, views: ViewSpec, seed: int = 0,
                 regularizer: str | None = None, **hparams) -> Method:
    """Instantiate a registered method, wrapped in ``regularizer`` when one is named; an unknown
    hyperparameter names the real ones."""
    own = hyperparameters(name)
    allowed = hyperparameters(name, regularizer)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise ValueError(f"method {name!r} has no hyperparameter {', '.join(unknown)}; "
                         f"it takes {', '.join(sorted(allowed))}")
    method = method_class(name)(backbone, views, seed=seed,
                                **{k: v for k, v in hparams.items() if k in own})
    if regularizer is None:
        return method
    return regularizer_class(regularizer)(method, **{k: v for k, v in hparams.items() if k not in own})
