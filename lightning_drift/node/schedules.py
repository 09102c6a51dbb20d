"""Learning-rate schedules with a fixed horizon, checked against the session's length.

A scheduler such as ``OneCycleLR(total_steps=self.trainer.estimated_stepping_batches)``
raises once it is stepped past its horizon. ``configure_optimizers`` runs before the node
joins, so Lightning sizes that estimate by the node's whole dataset and ``Trainer(max_epochs)``;
the session then replaces ``max_epochs`` by its own epochs and gives the node a share of the
data. A share never holds more than the whole dataset, so the estimate is safe exactly when the
session trains no more epochs than ``max_epochs`` said. :func:`short_horizons` finds the
schedulers that could run out within the session, so the node refuses at the join, with the
fix, instead of failing epochs later.

The boundary: :func:`most_steps` and :func:`short_horizons` are plain arithmetic over what
Lightning's ``trainer.lr_scheduler_configs`` hold; :func:`refuse_short` reads the trainer.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from lightning_drift.errors import ConfigError
from lightning_drift.node import loopstate


def most_steps(
    batches: float,
    *,
    epochs: int,
    accumulate_grad_batches: int = 1,
    max_steps: int = -1,
) -> float:
    """The most optimizer steps a node can take in a session of ``epochs`` epochs when every
    epoch gives at most ``batches`` batches (``inf``: a loader without a length)."""
    steps = math.inf
    if math.isfinite(batches):
        steps = float(math.ceil(batches / max(1, accumulate_grad_batches)) * epochs)
    return min(steps, max_steps) if max_steps >= 0 else steps


def short_horizons(configs: Iterable[Any], *, steps: float, epochs: int) -> list[str]:
    """The schedulers among ``configs`` (Lightning's ``LRSchedulerConfig``) whose fixed horizon
    (``total_steps``) ends before the node's training can: ``steps`` optimizer steps for those
    stepped every step, ``epochs`` for those stepped every epoch. One line each."""
    short = []
    for config in configs:
        scheduler = config.scheduler
        horizon = getattr(scheduler, "total_steps", None)
        if not isinstance(horizon, int):
            continue
        per_step = config.interval == "step"
        need = (steps if per_step else epochs) / max(1, int(config.frequency or 1))
        # Steps it has taken already (a resumed fit's scheduler state) count too.
        taken = getattr(scheduler, "last_epoch", 0)
        need += taken if isinstance(taken, int) and taken > 0 else 0
        if need > horizon:
            unit = "optimizer steps" if per_step else "epochs"
            short.append(
                f"{type(scheduler).__name__}(total_steps={horizon}), stepped every "
                f"{config.interval}: this node may take up to {need:g} {unit}"
            )
    return short


def refuse_short(trainer: Any, batches: int, asked_epochs: int | None) -> None:
    """Once the node joined (``trainer.max_epochs`` is the session's epochs), refuse a
    scheduler with a fixed horizon that the session's epochs would step past (``ConfigError``
    naming the fix): it was sized before the join, by ``Trainer(max_epochs=asked_epochs)``,
    over loaders of ``batches`` batches. Manual optimization steps its schedulers itself."""
    if not trainer.lightning_module.automatic_optimization:
        return
    session_epochs = int(trainer.max_epochs)
    epochs = max(0, session_epochs - trainer.current_epoch)
    steps = most_steps(
        loopstate.limited(trainer, batches),
        epochs=epochs,
        accumulate_grad_batches=trainer.accumulate_grad_batches,
        max_steps=trainer.max_steps - trainer.global_step if trainer.max_steps >= 0 else -1,
    )
    short = short_horizons(trainer.lr_scheduler_configs, steps=steps, epochs=epochs)
    if not short:
        return
    if asked_epochs != session_epochs:
        why = (
            "configure_optimizers runs before the node joins, so "
            f"trainer.estimated_stepping_batches counted Trainer(max_epochs={asked_epochs}); "
            f"set Trainer(max_epochs={session_epochs}) (the session's --epochs)"
        )
    else:
        why = "size the schedule for the steps the node can take (estimated_stepping_batches)"
    raise ConfigError(
        f"a learning-rate schedule ends before this node's training in the session "
        f"({session_epochs} epochs) can: {'; '.join(short)}. {why}"
    )


__all__ = ["most_steps", "refuse_short", "short_horizons"]
