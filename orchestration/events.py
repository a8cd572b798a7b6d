"""Events of a run, for behaviour that is not training: plug-ins.

The worker loop and the prototype actor announce what they are doing at a few points; a plug-in
is an object with any of the methods below, called at that event on every rank (or in the
actor). The loop never asks what a plug-in does, the way Lightning's ``Callback`` or Ray Train's
callbacks hang on a trainer. Plug-ins travel to the workers and the actor pickled, so they hold
plain data; ``train(cfg, plugins=[...])`` passes them. The fault injections of the reliability
tests (``tests/faults.py``) are plug-ins; ``protoray train`` passes none.

Events, in the order one epoch raises them:
- ``on_epoch_start(epoch, rank, method)``: before the epoch's E-step and steps.
- ``on_estep_round(key, rank)``: before this rank contributes to E-step round ``key``
  (``("gather", epoch)``, ``("init" | "iter" | "final", epoch, ...)``).
- ``on_actor_estep(epoch)``: in the actor, when the epoch's first round is reduced.
- ``on_step(epoch, step, rank)``: before training step ``step`` of the epoch.
- ``on_epoch_end(epoch, rank, method, probe)``: after the epoch's report (and checkpoint).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, TypeVar

EVENTS = ("on_epoch_start", "on_estep_round", "on_actor_estep", "on_step", "on_epoch_end")

T = TypeVar("T")


def emit(plugins: Sequence[object], event: str, **kwargs: Any) -> None:
    """Call ``event`` on every plug-in that has it. ``ValueError`` for an event not in
    ``EVENTS`` (a misspelt name would otherwise never fire)."""
    if event not in EVENTS:
        raise ValueError(f"unknown event {event!r}; events are {', '.join(EVENTS)}")
    for plugin in plugins:
        handler = getattr(plugin, event, None)
        if handler is not None:
            handler(**kwargs)


def announce_steps(items: Iterable[T], plugins: Sequence[object], epoch: int, rank: int
                   ) -> Iterator[T]:
    """``items`` unchanged, raising ``on_step`` before each one is handed out."""
    for step, item in enumerate(items):
        emit(plugins, "on_step", epoch=epoch, step=step, rank=rank)
        yield item


def announce_rounds(exchange: Callable[[tuple, object], object], plugins: Sequence[object],
                    rank: int) -> Callable[[tuple, object], object]:
    """``exchange`` raising ``on_estep_round`` before each contribution."""

    def announced(key: tuple, payload: object) -> object:
        emit(plugins, "on_estep_round", key=key, rank=rank)
        return exchange(key, payload)

    return announced
