"""Methods and regularisers by config name, so configs and the trainer never branch on a name.

The names come from the classes ``methods.zoo`` lists (each class's ``name``); this module only
looks them up, so nothing in ``methods/zoo`` imports it.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch.nn as nn

from methods.base import Method, PrototypeSchedule
from methods.data.views import ViewSpec
from methods.zoo import METHODS, REGULARIZERS

_METHODS: dict[str, type[Method]] = {cls.name: cls for cls in METHODS}
_REGULARIZERS: dict[str, type[Method]] = {cls.name: cls for cls in REGULARIZERS}


def available() -> list[str]:
    return sorted(_METHODS)


def available_regularizers() -> list[str]:
    return sorted(_REGULARIZERS)


def method_class(name: str) -> type[Method]:
    if name not in _METHODS:
        raise ValueError(f"method.name: unknown method {name!r}; choose one of {', '.join(available())}")
    return _METHODS[name]


def regularizer_class(name: str) -> type[Method]:
    """Wrappers that add a term to any two-view method (``method.regularizer`` in a config)."""
    if name not in _REGULARIZERS:
        raise ValueError(f"method.regularizer: unknown regularizer {name!r}; choose one of "
                         f"{', '.join(available_regularizers())}")
    return _REGULARIZERS[name]


def constructor_parameters(cls: type, skip: tuple[str, ...]) -> dict[str, inspect.Parameter]:
    """``cls.__init__``'s keyword parameters by name, without ``skip``."""
    params = inspect.signature(cls.__init__).parameters
    return {p.name: p for p in params.values() if p.name not in ("self", *skip)}


METHOD_ARGS = ("backbone", "views", "seed")  # what the builder passes, not a hyperparameter
REGULARIZER_ARGS = ("base",)


def hyperparameters(name: str, regularizer: str | None = None) -> dict[str, object]:
    """The method's own keyword arguments with their (paper) defaults, plus the regularizer's
    when one is named."""
    params = constructor_parameters(method_class(name), METHOD_ARGS)
    if regularizer is not None:
        params.update(constructor_parameters(regularizer_class(regularizer), REGULARIZER_ARGS))
    return {key: p.default for key, p in params.items()}


def prototype_schedule(name: str, hparams: Mapping[str, Any] = ()) -> PrototypeSchedule | None:
    """What method ``name`` with ``hparams`` (the given ones; defaults fill the rest) asks of the
    E-step; None when it never uses prototypes. A regulariser keeps its base's schedule."""
    own = hyperparameters(name)
    return method_class(name).prototype_schedule({**own, **{k: v for k, v in dict(hparams).items()
                                                            if k in own}})


def build_method(name: str, backbone: nn.Module, views: ViewSpec, seed: int = 0,
                 regularizer: str | None = None, **hparams) -> Method:
    """Instantiate a registered method, wrapped in ``regularizer`` when one is named; an unknown
    hyperparameter names the real ones; a constructor's ``ValueError`` names ``method.<field>``."""
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

