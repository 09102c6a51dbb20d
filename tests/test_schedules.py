"""Schedulers with a fixed horizon against the steps a node can take in its session."""

from __future__ import annotations

import math

import torch
from lightning.pytorch.utilities.types import LRSchedulerConfig

from lightning_drift.node.schedules import most_steps, short_horizons


def _configs(total_steps: int, interval: str = "step", frequency: int = 1, taken: int = 0):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.1, total_steps=total_steps)
    for _ in range(taken):
        opt.step()
        sched.step()
    cosine = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=1)  # no horizon to run out
    return [
        LRSchedulerConfig(sched, interval=interval, frequency=frequency),
        LRSchedulerConfig(cosine, interval="step"),
    ]


def test_most_steps_counts_whole_epochs_of_optimizer_steps_capped_by_max_steps():
    assert most_steps(10, epochs=3) == 30
    assert most_steps(10, epochs=3, accumulate_grad_batches=4) == 9  # ceil(10 / 4) × 3
    assert most_steps(10, epochs=3, max_steps=7) == 7
    assert most_steps(math.inf, epochs=3) == math.inf
    assert most_steps(math.inf, epochs=3, max_steps=5) == 5


def test_a_horizon_sized_for_the_sessions_steps_passes_and_one_short_of_them_is_named():
    assert short_horizons(_configs(30), steps=30, epochs=3) == []
    (line,) = short_horizons(_configs(29), steps=30, epochs=3)
    assert "OneCycleLR(total_steps=29)" in line and "up to 30 optimizer steps" in line


def test_steps_already_taken_count_and_epoch_schedulers_count_epochs():
    assert short_horizons(_configs(30, taken=5), steps=26, epochs=3)  # 5 taken + 26 > 30
    assert short_horizons(_configs(30, taken=4), steps=26, epochs=3) == []
    assert short_horizons(_configs(3, interval="epoch"), steps=10**6, epochs=3) == []
    (line,) = short_horizons(_configs(2, interval="epoch"), steps=0, epochs=3)
    assert "up to 3 epochs" in line
    assert short_horizons(_configs(2, interval="epoch", frequency=2), steps=0, epochs=3) == []
