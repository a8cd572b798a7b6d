"""Population-based training (Jaderberg et al. 2017) on Tune's ``PopulationBasedTraining``.

Every ``perturbation_interval`` epochs, once every trial has reached that point, each trial in
the bottom quarter of the population takes the checkpoint of one in the top quarter (exploit)
and continues with perturbed values (explore):
a category moves to a neighbour in its list, a range is scaled by 0.8 or 1.2 or resampled.

Train V2's ``TuneReportCallback`` forwards metrics only, and PBT can exploit only a checkpoint
Tune holds. So a PBT trial runs its Train run in a thread and reports each epoch to Tune from the
trial's own thread, with the epoch's Train checkpoint at every perturbation point (Tune copies
it into the trial's directory); an exploited trial starts a new Train run from the donor's copy
(``initial_checkpoint``) and records the exploit in its MLflow run. No exploit at the last
epoch: nothing would be left to train.

Disk: each trial keeps its latest ``TUNE_CHECKPOINTS`` copies (pruned here: Tune's own limit
counts PBT's saves of one directory as two checkpoints and deletes directories still in use),
so a sweep holds about population x (2 + Train's 2) checkpoints.
"""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ray import tune
from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler
from ray.tune.search.sample import Categorical, Domain, Float, Function

from orchestration.config import ConfigError

# values that change a running trial without changing any tensor's shape or the steps per epoch
PBT_KEYS = ("optim.lr", "optim.momentum", "optim.weight_decay", "clustering.num_clusters",
            "clustering.niter", "clustering.nredo")
# copies of its checkpoints a PBT trial keeps in its Tune directory: a donor is always cloned
# from its latest perturbation point's, or the one before while a save is in flight
TUNE_CHECKPOINTS = 2


def check_pbt_space(space: dict[str, Any], interval: int, epochs: int, search: str) -> None:
    """``ConfigError`` naming the flag or key PBT cannot take: a search other than random (PBT
    samples its own population), an interval that leaves no exploit, a key whose change would not
    fit the restored checkpoint (``PBT_KEYS`` and float hyperparameters of ``method.*`` can), a
    ``sample_from`` or grid."""
    if search != "random":
        raise ConfigError(f"--search {search}: PBT samples its population at random and then "
                          "exploits; use --search random with --scheduler pbt")
    if not 1 <= interval < epochs:
        raise ConfigError(f"--perturbation-interval {interval}: must be between 1 and "
                          f"optim.epochs - 1 = {epochs - 1}, or no trial is ever exploited")
    for key, domain in space.items():
        if not isinstance(domain, (dict, Domain)):
            continue  # a constant: never perturbed
        if isinstance(domain, Function):
            raise ConfigError(f"space {key!r}: PBT perturbs choice, grid_search, uniform and "
                              "loguniform values; give it as one of those")
        values = _categories(domain)
        floats = isinstance(domain, Float) or (values is not None and all(
            isinstance(v, float) for v in values))
        if key not in PBT_KEYS and not (key.startswith("method.") and floats):
            raise ConfigError(f"space {key!r}: PBT changes values on a restored checkpoint, so it "
                              f"takes {', '.join(PBT_KEYS)} and float method.* values (no shapes, "
                              "no step counts)")


def _categories(domain: Any) -> list | None:
    """A choice's categories or a grid's values, in their order; None for a range."""
    if isinstance(domain, dict):
        return list(domain["grid_search"])
    return list(domain.categories) if isinstance(domain, Categorical) else None


class _PBTBeforeTheEnd(PopulationBasedTraining):
    """Tune's PBT, without exploiting at the last epoch (the trial would restart to train
    nothing)."""

    def __init__(self, max_t: int, **kwargs):
        super().__init__(**kwargs)
        self._max_t = max_t

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        if result.get(self._time_attr, 0) >= self._max_t:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def pbt_scheduler(space: dict[str, Any], interval: int, time_attr: str, max_epochs: int):
    """Tune's PBT over every swept key: a choice's or grid's values in their order (a
    perturbation moves to a neighbour), a range as given. A grid sets the first population."""
    mutations = {key: _categories(d) or d for key, d in space.items()
                 if isinstance(d, (dict, Domain))}
    # synchronous: every trial reaches the perturbation point (the others wait, paused) before
    # the bottom quarter is replaced, so each donor has its checkpoint of that point. The
    # asynchronous default skipped most exploits of small populations: a donor that was not in
    # the top quarter at its own last report has no checkpoint to give.
    return _PBTBeforeTheEnd(max_epochs, time_attr=time_attr, perturbation_interval=interval,
                            hyperparam_mutations=mutations, synch=True)


def donor_checkpoint() -> tuple[str | None, dict]:
    """(the checkpoint directory this trial starts from, its metadata): after an exploit the
    donor's, after a pause or restart the trial's own; (None, {}) at the first start."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return None, {}
    return checkpoint.path, checkpoint.get_metadata()


def _checkpoint_callback(queue, done):
    """A Train callback (it runs in the Train controller) handing each report and its
    checkpoint's path to the trial's thread through ``queue``, then waiting on ``done`` until
    Tune has its copy: Train deletes all but its latest two checkpoints."""
    from ray.train.v2.api.callback import UserCallback

    class CheckpointReport(UserCallback):
        def after_report(self, run_context, metrics, checkpoint):
            queue.put((metrics[0], checkpoint.path if checkpoint else None))
            done.get()

    return CheckpointReport()


def _prune(trial_dir: str, keep: int) -> None:
    """Delete all but this trial's latest ``keep`` Tune checkpoint copies."""
    copies = sorted(Path(trial_dir).glob("checkpoint_*"))
    for old in copies[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def fit_reporting_checkpoints(fit: Callable[[tuple], None], metadata: dict, epochs_key: str,
                              interval: int) -> None:
    """Run ``fit(callbacks)`` (one Train run) in a thread and report each of its epochs to Tune;
    every ``interval`` epochs trained (``epochs_key``) with the epoch's checkpoint, tagged with
    ``metadata`` and the epoch. Re-raises what ``fit`` raised."""
    from ray.train import Checkpoint
    from ray.util.queue import Queue

    queue = Queue(maxsize=1, actor_options={"num_cpus": 0})
    done = Queue(maxsize=1, actor_options={"num_cpus": 0})
    failure: list[BaseException] = []
    trial_dir = tune.get_context().get_trial_dir()

    def run() -> None:
        try:
            fit((_checkpoint_callback(queue, done),))
        except BaseException as exc:  # handed to the trial's thread, which raises it
            failure.append(exc)
        finally:
            queue.put(None)

    thread = threading.Thread(target=run, name="train-run", daemon=True)
    thread.start()
    while (item := queue.get()) is not None:
        metrics, path = item
        trained = int(metrics.get("epoch", -1)) + 1
        if "stopped" not in metrics:  # a NaN stop: fit raises TrainingStopped next
            checkpoint = None
            if path and trained % interval == 0:  # PBT clones only at perturbation points
                checkpoint = Checkpoint(path)
                checkpoint.set_metadata({**metadata, "epoch": trained - 1})
            tune.report({**metrics, epochs_key: trained}, checkpoint=checkpoint)
            if checkpoint is not None:
                _prune(trial_dir, TUNE_CHECKPOINTS)
        done.put(True)
    thread.join()
    if failure:
        raise failure[0]
