"""Fault injection for the reliability tests, as an ``orchestration.events`` plug-in.

Every kill happens once: a marker file in ``marker_dir`` records it, so the restarted worker (or
actor) passes the same point and lives, as in Ray's own fault tests. The class is pickled by
value so Ray's workers, which cannot import ``tests``, receive it.
"""

from __future__ import annotations

import os
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import ray.cloudpickle
import torch

ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def sigkill_once(marker: Path, note: str) -> None:
    """SIGKILL this process unless ``marker`` exists, writing ``note`` to it first."""
    if not marker.exists():
        marker.write_text(note)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class Faults:
    """What to break, and where.

    kill_worker_epoch: SIGKILL rank ``kill_rank`` after that epoch's report, or, with
        ``kill_step``, at that step of the epoch.
    kill_round: SIGKILL ``kill_rank`` just before it contributes to that E-step round (a key such
        as ``("iter", 2, 0, 0, 1)``); the other ranks contribute and wait for it.
    kill_actor_epoch: the prototype actor exits when that epoch's E-step starts.
    nan_epoch: rank 0 poisons one weight before that epoch, so its loss is NaN.
    probe_dir: every rank saves its online probe there (``probe_rank_<r>.pt``) after each report.
    weights_dir: rank 0 saves the method's state there (``epoch_<e>.pt``) as each epoch starts.
    """

    marker_dir: str = ""
    kill_rank: int = 0
    kill_worker_epoch: int | None = None
    kill_step: int | None = None
    kill_round: tuple | None = None
    kill_actor_epoch: int | None = None
    nan_epoch: int | None = None
    probe_dir: str | None = None
    weights_dir: str | None = None

    def on_epoch_start(self, epoch: int, rank: int, method) -> None:
        if self.weights_dir and rank == 0:  # the weights each epoch starts from
            torch.save(method.state_dict(), Path(self.weights_dir) / f"epoch_{epoch}.pt")
        if self.nan_epoch == epoch and rank == 0:
            with torch.no_grad():
                next(method.parameters()).fill_(float("nan"))

    def on_estep_round(self, key: tuple, rank: int) -> None:
        if self.kill_round is not None and rank == self.kill_rank and \
                tuple(key) == tuple(self.kill_round):
            sigkill_once(Path(self.marker_dir) / "worker_killed_in_round", repr(key))

    def on_actor_estep(self, epoch: int) -> None:
        if self.kill_actor_epoch == epoch:
            marker = Path(self.marker_dir) / "actor_killed"
            if not marker.exists():
                marker.write_text(str(epoch))
                os._exit(1)

    def on_step(self, epoch: int, step: int, rank: int) -> None:
        if self.kill_step == step and self._kills(epoch, rank):
            sigkill_once(Path(self.marker_dir) / "worker_killed", str(epoch))

    def on_epoch_end(self, epoch: int, rank: int, method, probe) -> None:
        if self.probe_dir and probe is not None:
            torch.save(probe.state_dict(), Path(self.probe_dir) / f"probe_rank_{rank}.pt")
        if self.kill_step is None and self._kills(epoch, rank):
            sigkill_once(Path(self.marker_dir) / "worker_killed", str(epoch))

    def _kills(self, epoch: int, rank: int) -> bool:
        return self.kill_worker_epoch == epoch and rank == self.kill_rank
