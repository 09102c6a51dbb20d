"""Every speed estimate of the session's nodes, and the one average of each. Pure.

A node's pace is the samples/s it trains. Three kinds, one home (the averaging constants are
``coordinator/config.py``'s table):

- the **measured pace**: what the coordinator measured from the node's uploads that counted
  and showed training (``evidence.py``): its samples, at most one round's work of its
  assignment, over the time it trained for them (:func:`trained_for`: what it says, never
  less than the round's start to the upload's arrival nor more than its previous counted
  upload to this one), averaged with ``MEASURED_SMOOTHING``. Deadlines, re-plans, epoch shares and the bounds on what nodes
  report go by it, and by nothing else: it is the one pace that rests on evidence;
- the **reported pace**: what the node says (``TrainProgress.samples_per_s``, and its
  upload's samples over its training time), never beyond ``PACE_FACTOR`` of its measured pace
  (of the session's median measured pace before it has one); the status shows the latest.
  A claim: it moves no work and no deadline;
- the **smoothed pace**: reported paces averaged with ``PACE_SMOOTHING``, for the status.

Before any measurement the **calibrated pace** is the scheduler's estimate from calibration
(``Scheduler.pace``), in samples/s once some node of the session is measured.

The boundary: trust in a node's numbers is decided here, once, and every reader of a speed
(round deadlines, re-plans, epoch plans, the status) reads it from here.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import msgspec

from lightning_drift.coordinator.boundary import PACE_FACTOR, bound_pace
from lightning_drift.coordinator.config import ELAPSED_MIN, MEASURED_SMOOTHING, PACE_SMOOTHING
from lightning_drift.robust import lower_median
from lightning_drift.scheduler import Scheduler


def ema(average: float, value: float, weight: float) -> float:
    """``value`` folded into ``average`` with ``weight`` (the first value when none yet)."""
    return value if average <= 0 else weight * value + (1 - weight) * average


def trained_for(train_s: float, least: float, most: float) -> float:
    """How long a node trained for an upload: what it says (``train_s``, its training time
    since its last upload, waits left out) within what the coordinator saw: at ``least`` the
    time since its round (or the node) started, at ``most`` the time since its previous
    counted upload (or its join). With overlapped rounds a node trains a round's work while
    the previous round is still open, so its upload can arrive just after its round started:
    the least alone would make its pace many times what it is. A claim can only lower the
    pace below the least's, never raise it: a node's own share is all it moves."""
    return min(max(train_s, least), max(least, most))


class NodePace(msgspec.Struct):
    """One node's paces, samples/s (0: none yet)."""

    reported: float = 0.0
    smoothed: float = 0.0
    measured: float = 0.0


class DeadlinePace(msgspec.Struct, frozen=True):
    """The pace a round's deadline assumes for a missing node, and whether it is only the
    calibrated estimate (no measured or reported pace yet)."""

    pace: float
    estimated: bool = False


class PaceBook(msgspec.Struct):
    """The paces of every node that has one."""

    nodes: dict[str, NodePace] = {}

    def of(self, node: str) -> NodePace:
        """``node``'s paces (all 0 when it has none; not recorded)."""
        return self.nodes.get(node) or NodePace()

    def measured(self) -> dict[str, float]:
        """Measured paces of the nodes that have one (what the scheduler plans with)."""
        return {n: p.measured for n, p in self.nodes.items() if p.measured > 0}

    def reference(self) -> float | None:
        """The session's median measured pace, over nodes measured so far."""
        return lower_median(p.measured for p in self.nodes.values() if p.measured > 0)

    def report(self, node: str, samples_per_s: float) -> None:
        """``node`` says it trains ``samples_per_s``: believed within bounds, then smoothed."""
        p = self.nodes.setdefault(node, NodePace())
        p.reported = bound_pace(samples_per_s, p.measured or self.reference())
        p.smoothed = ema(p.smoothed, p.reported, PACE_SMOOTHING)

    def measure(self, node: str, samples: int, work: float, elapsed: float) -> None:
        """``node``'s upload of ``samples`` arrived ``elapsed`` s into its round, whose work is
        ``work`` samples (its assignment's :attr:`~ShardAssignment.work_per_round`)."""
        if samples <= 0 or elapsed <= 0 or work <= 0:
            return
        p = self.nodes.setdefault(node, NodePace())
        p.measured = ema(
            p.measured, min(samples, work) / max(elapsed, ELAPSED_MIN), MEASURED_SMOOTHING
        )

    def for_replan(self, node: str) -> float | None:
        """The pace re-plans go by: the measured one (None: not measured yet). What a node
        reports about its speed moves no work: only what it delivered does."""
        return self.of(node).measured or None

    def forget(self, node: str) -> None:
        self.nodes.pop(node, None)

    def for_deadline(
        self, nodes: Iterable[str], scheduler: Scheduler | None
    ) -> dict[str, DeadlinePace]:
        """The pace a round deadline assumes for each of ``nodes`` (absent: unknown).

        Its measured pace; else the scheduler's calibrated estimate, once some node is
        measured (so that it is in samples/s) and if it is > 0; never below ``1 / PACE_FACTOR``
        of the session's median measured pace (which is the estimate of last resort). What a
        node reports about its speed is never read here: a node that says it is slow cannot
        hold a round open by saying so."""
        ref = self.reference()
        floor = ref / PACE_FACTOR if ref is not None else 0.0
        measured = self.measured()
        factor = scheduler.measured_factor(measured) if scheduler is not None else None
        out: dict[str, DeadlinePace] = {}
        for node in nodes:
            p = self.of(node)
            if p.measured > 0:
                out[node] = DeadlinePace(max(p.measured, floor))
            else:
                est = 0.0
                if scheduler is not None and factor is not None and node in scheduler:
                    est = scheduler.pace(node, measured, factor)
                if not (math.isfinite(est) and est > 0):
                    est = floor
                if est > 0:
                    out[node] = DeadlinePace(max(est, floor), estimated=True)
        return out


__all__ = ["DeadlinePace", "NodePace", "PaceBook", "ema"]
