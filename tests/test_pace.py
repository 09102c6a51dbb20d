"""The pace meter with a fake clock: reports measure training time only."""

from __future__ import annotations

from lightning_drift.node.pace import EARLY_REPORT_STEPS, PaceMeter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_waits_are_left_out_of_the_reported_pace_and_of_the_uploads_training_time():
    clock = Clock()
    meter = PaceMeter(clock, progress_every=10.0)
    meter.restart()
    meter.batch(4)
    meter.step()  # the fit's first step: its cost is left out
    clock.now = 1.0
    for _ in range(3):
        meter.batch(4)
        meter.step()
        clock.now += 1.0
    with meter.busy("wait_s") as waited:
        clock.now += 2.0
    assert waited() == 2.0 and meter.timing["wait_s"] == 2.0 and meter.busy_s == 2.0
    assert meter.train_seconds() == 4.0  # 6 s since the restart, 2 of them waiting
    assert meter.report_due()  # the first comes early: 4 s trained
    progress = meter.report(training_round=3, epoch=0, vram_used=0, vram_peak=0)
    assert progress.samples_per_s == 12 / 4.0  # 12 samples over 4 s of training
    assert (progress.round, progress.step, progress.samples) == (3, 4, 16)
    meter.batch(4)
    meter.step()
    clock.now += 9.0
    assert not meter.report_due()  # then every progress_every seconds
    clock.now += 1.0
    assert meter.report_due()
    meter.uploaded()
    assert meter.samples == 0 and meter.train_seconds() == 0.0


def test_the_first_report_comes_early_and_start_up_time_is_its_own():
    clock = Clock()
    meter = PaceMeter(clock, progress_every=60.0)
    with meter.start_up(), meter.busy("wait_s"):
        clock.now += 5.0
    assert meter.timing["startup_s"] == 5.0 and meter.timing["wait_s"] == 0.0
    assert meter.busy_s == 0.0
    meter.restart()
    for _ in range(EARLY_REPORT_STEPS + 1):
        meter.batch(1)
        meter.step()
    assert meter.report_due()
