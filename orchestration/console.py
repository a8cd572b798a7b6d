"""What ``protoray train`` prints: one line per epoch from the driver, and nothing else unless
``--verbose`` asks for Ray's and the libraries' own output.

The epoch lines are read back from the MLflow run the Train controller logs to, so the driver
never talks to the workers (data flows one way) and an epoch is printed once, as it is logged.
"""

from __future__ import annotations

import logging
import os
import threading
import warnings

from mlflow.tracking import MlflowClient

from orchestration.tracking import epoch_history

EPOCH_KEYS = ("loss", "knn_holdout", "probe_holdout", "rankme", "alignment", "uniformity",
              "cluster_entropy", "estep_s", "epoch_s")
# console name and format of each score, in the order printed
SCORES = (("knn_holdout", "knn", ".3f"), ("probe_holdout", "probe", ".3f"),
          ("rankme", "rankme", ".1f"), ("alignment", "align", ".3f"),
          ("uniformity", "unif", ".2f"), ("cluster_entropy", "clusters-H", ".2f"))


def quiet_libraries(verbose: bool) -> None:
    """Unless ``verbose``: no deprecation or future warnings, no INFO lines from MLflow or Ray in
    this process (the workers' output is not forwarded at all: ``ray.init(log_to_driver=...)``)."""
    if verbose:
        return
    for category in (DeprecationWarning, FutureWarning, PendingDeprecationWarning):
        warnings.filterwarnings("ignore", category=category)
    for name in ("mlflow", "ray", "alembic"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # protoray chose pickle for the encoder model (see tracking.log_encoder): no warning about it
    logging.getLogger("mlflow.pytorch").setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    # Ray says on every start that token authentication is on (its default); the warning that it
    # is off stays
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(
        lambda record: not record.getMessage().startswith("Token authentication is enabled"))


def format_epoch(epoch: int, epochs: int, values: dict[str, float], seconds: list[float]) -> str:
    """``epoch 3/6  loss 6.21  knn 0.803  probe 0.842  rankme 41.2  align 0.412  unif -2.31
    e-step 14 s  epoch 118 s  eta 6 min`` (``knn`` and ``probe`` where there are labels; the
    label-free scores of ``methods.evaluation.label_free`` always); ``seconds`` are the
    durations of every epoch so far (this one included), for the time left."""
    parts = [f"epoch {epoch + 1}/{epochs}"]
    if "loss" in values:
        parts.append(f"loss {values['loss']:.3f}")
    parts += [f"{name} {values[key]:{spec}}" for key, name, spec in SCORES if key in values]
    if "estep_s" in values:
        parts.append(f"e-step {values['estep_s']:.0f} s")
    if "epoch_s" in values:
        parts.append(f"epoch {values['epoch_s']:.0f} s")
    left = epochs - epoch - 1
    if left > 0 and seconds:
        eta = left * sum(seconds) / len(seconds)
        parts.append(f"eta {eta / 60:.0f} min" if eta >= 90 else f"eta {eta:.0f} s")
    return "  ".join(parts)


class EpochPrinter:
    """Polls the run's per-epoch metrics in a background thread and prints each new epoch once.

    Use as a context manager around ``TorchTrainer.fit()``; on exit it prints what is left.
    """

    def __init__(self, tracking_uri: str, run_id: str, epochs: int, interval_s: float = 2.0):
        self.client = MlflowClient(tracking_uri)
        self.run_id, self.epochs, self.interval_s = run_id, epochs, interval_s
        self.printed: set[int] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True, name="epoch-printer")

    def __enter__(self) -> EpochPrinter:
        # a resumed run's earlier epochs were printed by the process that trained them
        self.printed = set(epoch_history(self.client, self.run_id, EPOCH_KEYS))
        if self.printed:
            print(f"resuming after epoch {max(self.printed) + 1}/{self.epochs}", flush=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.poll()
            except Exception:  # a busy sqlite file: the next poll catches up
                continue

    def poll(self) -> None:
        history = epoch_history(self.client, self.run_id, EPOCH_KEYS)
        for epoch in sorted(set(history) - self.printed):
            done = [v["epoch_s"] for e, v in history.items() if e <= epoch and "epoch_s" in v]
            print(format_epoch(epoch, self.epochs, history[epoch], done), flush=True)
            self.printed.add(epoch)
