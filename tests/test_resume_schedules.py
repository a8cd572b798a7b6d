"""Step schedules continue where they stopped after a resume: the learning-rate warm-up and
cosine (the scheduler's state), EMA momentum (BYOL, DINO) and DINO's teacher temperature (both
functions of ``method.progress``), checked at every step of the epoch after the checkpoint,
the first resumed step included, against a run that never stopped."""

from __future__ import annotations

import pytest
import torch

from methods.data.datasets import load_digits
from methods.data.views import view_spec
from methods.encoders.backbones import build_backbone
from methods.registry import build_method
from methods.training import (
    OptimConfig,
    epoch_batches,
    load_optimizer_state,
    make_optimizer,
    memory_batches,
    train_epoch,
)

EPOCHS, BATCH, IMAGES = 3, 32, 192  # 6 steps an epoch
OPTIM = OptimConfig(lr=0.05, warmup_epochs=2)  # the warm-up spans the resume


def _method(name: str):
    torch.manual_seed(0)
    backbone = build_backbone("convnet", 1, 8)
    return build_method(name, backbone, view_spec("digits", size=8), seed=0)


def _schedules(method, optimizer) -> tuple[float, ...]:
    """What the next step's forward reads: lr, training progress (DINO's EMA momentum is a
    function of it), BYOL's EMA momentum, DINO's teacher temperature."""
    values = [optimizer.param_groups[0]["lr"], method.progress]
    if hasattr(method, "current_momentum"):
        values.append(method.current_momentum())
    if hasattr(method, "teacher_temperature"):
        values.append(method.teacher_temperature())
    return tuple(values)


class Recorder(torch.nn.Module):
    """Calls the method and records its schedules as each step's forward sees them."""

    def __init__(self, method, optimizer, seen: list):
        super().__init__()
        self.method, self.optimizer, self.seen = method, optimizer, seen

    def forward(self, batch, prototypes=None):
        self.seen.append(_schedules(self.method, self.optimizer))
        return self.method(batch, prototypes)


def _run(name: str, epochs: range, state: dict | None = None, optim: OptimConfig = OPTIM
         ) -> tuple[list, dict]:
    data = load_digits("train").subset(torch.arange(IMAGES))
    method = _method(name)
    steps = len(epoch_batches(len(data), BATCH, 0, 0))
    optimizer, scheduler = make_optimizer(method, optim, steps, EPOCHS)
    if state:  # what orchestration.worker restores from a checkpoint
        method.load_state_dict(state["model"])
        load_optimizer_state(optimizer, scheduler, state["optimizer"], state["scheduler"])
    seen: list = []
    for epoch in epochs:
        batches = memory_batches(data, epoch_batches(len(data), BATCH, epoch, 0))
        train_epoch(method, batches, steps, optimizer, scheduler, epoch, total_epochs=EPOCHS,
                    model=Recorder(method, optimizer, seen))
    return seen, {"model": method.state_dict(), "optimizer": optimizer.state_dict(),
                  "scheduler": scheduler.state_dict()}


@pytest.mark.parametrize("name", ["simclr", "byol", "dino"])
def test_schedules_continue_from_the_first_resumed_step(name):
    continuous, _ = _run(name, range(EPOCHS))
    _, checkpoint = _run(name, range(1))
    resumed, _ = _run(name, range(1, EPOCHS), checkpoint)
    after = continuous[len(continuous) - len(resumed):]
    assert len(resumed) == len(after) > 0
    for step, (got, expected) in enumerate(zip(resumed, after, strict=True)):
        assert got == pytest.approx(expected, rel=1e-6), f"resumed step {step}"


def test_a_restart_with_new_optimiser_values_keeps_the_schedule_position():
    """A PBT exploit: the donor's checkpoint, restarted with lr x 4 and another momentum, runs
    the donor's schedule from the same step at four times the lr, with the new momentum."""
    continuous, _ = _run("simclr", range(EPOCHS))
    _, checkpoint = _run("simclr", range(1))
    perturbed = OptimConfig(lr=OPTIM.lr * 4, warmup_epochs=OPTIM.warmup_epochs, momentum=0.5)
    resumed, _ = _run("simclr", range(1, EPOCHS), checkpoint, perturbed)
    after = continuous[len(continuous) - len(resumed):]
    assert [lr for lr, *_ in resumed] == pytest.approx([4 * lr for lr, *_ in after], rel=1e-6)
