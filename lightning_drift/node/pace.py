"""The node's own clock: how fast it trains, and the time it spends not training.

:class:`PaceMeter` counts samples and optimizer steps, keeps the time the strategy kept
training from running (start-up, waiting for rounds, hand-offs, applying weights, following
re-plans) out of the node's pace, and says when a progress report is due and what it holds
(:class:`~lightning_drift.protocol.TrainProgress`, the node's reported pace) and how long the
node trained since its last upload (``BarrierSync.train_seconds``, from which the coordinator
measures its pace). The boundary: counting and timing are arithmetic over a clock, so the
clock is injected (tests pass a fake one) and nothing here knows Lightning or the network.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

from lightning_drift import protocol as p

# The first progress report (the coordinator's first measured pace for this node) comes after
# this many optimizer steps, or after this many seconds of training once a step is measured,
# not counting the fit's first (warm-up) step: a re-plan of the first epoch can then follow
# real step times instead of the start-up calibration.
EARLY_REPORT_STEPS = 8
EARLY_REPORT_S = 2.0
TIMING_CAUSES = ("startup_s", "wait_s", "handoff_s", "apply_s", "replan_s")


class PaceMeter:
    """Samples, steps and seconds of one node's fit, read by ``clock`` (monotonic seconds).

    ``progress_every``: seconds between progress reports (the session's setting once known).
    """

    def __init__(
        self, clock: Callable[[], float] = time.monotonic, progress_every: float = 5.0
    ) -> None:
        self.clock = clock
        self.progress_every = progress_every
        # Seconds spent not training, by cause; busy_s is their running sum (start-up aside).
        self.timing: dict[str, float] = dict.fromkeys(TIMING_CAUSES, 0.0)
        self.busy_s = 0.0
        self.starting = False  # inside the join: its time is start-up, whatever it waits for
        self.samples = 0  # samples trained since the last upload
        self.epoch_samples = 0  # samples trained this epoch
        self.steps = 0  # optimizer steps in this fit
        self._last_loss: torch.Tensor | float | None = None
        now = clock()
        self._upload_t0, self._upload_busy0 = now, 0.0  # when the last upload was taken
        self._last_report = now
        self._window_t0, self._window_busy0 = now, 0.0  # the progress report's window
        self._window_samples = self._window_steps = 0
        self._reported = False  # the first (early) progress report has gone out

    # -- counting ---------------------------------------------------------------------------

    def batch(self, samples: int) -> None:
        """A training batch of ``samples`` started."""
        self.samples += samples
        self.epoch_samples += samples
        self._window_samples += samples

    def step(self) -> None:
        """An optimizer step ended. The fit's first carries one-time costs (allocation, lazy
        init, the first batch): the coordinator's first pace must not include it."""
        self.steps += 1
        self._window_steps += 1
        if self.steps == 1:
            self._window_t0, self._window_busy0 = self.clock(), self.busy_s
            self._window_samples = self._window_steps = 0

    def loss(self, value: torch.Tensor | float) -> None:
        self._last_loss = value.detach() if isinstance(value, torch.Tensor) else value

    @property
    def last_loss(self) -> float | None:
        return None if self._last_loss is None else float(self._last_loss)

    def restart(self) -> None:
        """The session's training starts (after the join): what a Tuner's local fit counted
        is not the session's, and reports measure training from here on."""
        self.samples = self._window_samples = self.steps = 0
        self._last_report = self._window_t0 = self.clock()
        self._window_busy0 = self.busy_s

    def new_epoch(self) -> None:
        self.epoch_samples = 0

    # -- time not training ------------------------------------------------------------------

    @contextmanager
    def busy(self, what: str) -> Iterator[Callable[[], float]]:
        """Count the time of the ``with`` body as ``timing[what]`` (not training); yields a
        function giving that time once the body has ended."""
        t0 = self.clock()
        spent = [0.0]
        try:
            yield lambda: spent[0]
        finally:
            spent[0] = self.clock() - t0
            if not self.starting:
                self.timing[what] += spent[0]
                self.busy_s += spent[0]

    @contextmanager
    def start_up(self) -> Iterator[None]:
        """The join: all of its time is start-up, whatever it waits for."""
        t0 = self.clock()
        self.starting = True
        try:
            yield
        finally:
            self.starting = False
            self.timing["startup_s"] += self.clock() - t0

    # -- uploads and reports ----------------------------------------------------------------

    def train_seconds(self) -> float:
        """Training time since the last upload (``BarrierSync.train_seconds``)."""
        return max(0.0, self.clock() - self._upload_t0 - (self.busy_s - self._upload_busy0))

    def uploaded(self) -> None:
        """An upload was handed off: the next one counts from here."""
        self.samples = 0
        self._upload_t0, self._upload_busy0 = self.clock(), self.busy_s

    def _trained_s(self, now: float) -> float:
        """Training time in the report's window (waits, hand-offs, applies left out)."""
        return now - self._window_t0 - (self.busy_s - self._window_busy0)

    def report_due(self) -> bool:
        """Whether a progress report is due: every ``progress_every`` seconds, and early for
        the first one (:data:`EARLY_REPORT_STEPS`, :data:`EARLY_REPORT_S`)."""
        now = self.clock()
        if not self._window_steps:
            return False
        return (
            now - self._last_report >= self.progress_every
            or (not self._reported and self._window_steps >= EARLY_REPORT_STEPS)
            or (not self._reported and self._trained_s(now) >= EARLY_REPORT_S)
        )

    def report(
        self, training_round: int, epoch: int, vram_used: int, vram_peak: int
    ) -> p.TrainProgress:
        """The progress report now (the node's reported pace over training time only); the
        next report's window starts here."""
        now = self.clock()
        elapsed = max(1e-6, self._trained_s(now))
        progress = p.TrainProgress(
            round=training_round,
            epoch=epoch,
            step=self.steps,
            samples=self.samples,
            loss=self.last_loss,
            samples_per_s=self._window_samples / elapsed,
            vram_used=vram_used,
            vram_peak=vram_peak,
            epoch_samples=self.epoch_samples,
        )
        self._reported = True
        self._last_report = self._window_t0 = now
        self._window_busy0 = self.busy_s
        self._window_samples = self._window_steps = 0
        return progress


__all__ = ["EARLY_REPORT_S", "EARLY_REPORT_STEPS", "TIMING_CAUSES", "PaceMeter"]
