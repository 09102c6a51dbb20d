"""Re-planning the rest of an epoch from measured speeds. Pure: no I/O, no clock, no torch.

An epoch is planned once, from the scores the scheduler has when it starts: calibration for a
node that has not trained yet. A matmul benchmark cannot see a node's data loading, its
model's own kernels or a GPU that is throttled or shared, so the first plan of a session can
be far off; speeds also change (another job starts on a machine). Rounds are global: every
node's round ends when the slowest node's does, so a node whose share is too large holds every
other node back, round after round, for the rest of the epoch.

:func:`rebalance` moves unconsumed work from the nodes that would finish the epoch late to the
ones that would finish early, so that every node's remaining work takes the same time at its
measured speed (a node three times as fast ends up with three times the samples). A node's
work is a list of ranges of the epoch's permutation (:data:`Segments`), consumed front to
back; work moves only at the *tail* of a list, and never closer to a node's current position
than a margin it may already have trained or loaded meanwhile:

- a **donor** (its remaining work takes longer than its fair share would) gives away the tail
  of its list, keeping ``horizon_s`` seconds of work at its measured rate beyond where it is
  thought to be (its position is an estimate from a report seconds old, and the re-plan
  takes a moment to reach it) plus two batches its data loader may have read ahead;
- a **receiver** appends the donors' tails to its list, in node order, so that every position
  of the epoch stays with exactly one node. A node that may be at the end of its epoch takes
  nothing: the caller says so (``NodeWork.can_receive``: rounds are global, so a node held at
  a barrier that is not its epoch's last will train its tail), or, when it cannot, a node
  whose remaining work is within that same margin is taken to be at its end.

Nothing moves when a node has no measured rate, or when the predicted finishing times are
within ``tolerance`` of each other. Moves are whole batches (multiples of ``batch_size``), so
batch-aligned lists stay aligned.

Every decision carries a readable reason; tests assert on them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from lightning_drift.scheduler import Segment, Segments, largest_remainder, normalize, split, total

TOLERANCE = 0.05  # predicted finishing times may differ by this fraction before work moves
MIN_ROUNDS_LEFT = 1  # the epoch's rounds not yet completed, at least
HORIZON_S = 7.0  # seconds a node may have trained since its last report (reports every 5 s)


@dataclass(frozen=True)
class NodeWork:
    """One node's part of the epoch as the coordinator knows it.

    ``consumed``: positions of ``segments`` the node has trained by now, as far as the
    coordinator can tell (its last report moved on by its rate; 0 if it has not said);
    ``rate``: its measured samples per second (None: not measured yet)."""

    node: str
    segments: Segments
    consumed: int
    rate: float | None
    # Whether work appended to the node's tail will be trained: known when the node still has
    # a barrier ahead of anything it can have reached; None: judged by the margin (see above).
    can_receive: bool | None = None

    @property
    def remaining(self) -> int:
        return max(0, total(self.segments) - max(0, self.consumed))


@dataclass(frozen=True)
class Plan:
    """The outcome: new work lists for the nodes whose work changed (empty: nothing moves)."""

    segments: dict[str, Segments]
    moved: int  # positions that changed hands
    reason: str

    def __bool__(self) -> bool:
        return bool(self.segments)


def finishing_times(work: Sequence[NodeWork]) -> dict[str, float]:
    """Seconds each node needs for its remaining work at its measured rate."""
    return {w.node: w.remaining / w.rate for w in work if w.rate}


def rebalance(
    work: Sequence[NodeWork],
    rounds_left: int,
    *,
    batch_size: int,
    tolerance: float = TOLERANCE,
    min_rounds_left: int = MIN_ROUNDS_LEFT,
    horizon_s: float = HORIZON_S,
) -> Plan:
    """Re-split the unconsumed rest of an epoch in proportion to measured rates.

    ``work``: every node that trains the rest of the epoch; ``rounds_left``: rounds of the
    epoch not yet completed. Returns the new segment lists of the nodes whose work changed
    (each one its whole list for the epoch, trained prefix included), or an empty plan with
    the reason nothing moved.
    """
    if len(work) < 2:
        return Plan({}, 0, "fewer than two nodes: nothing to balance")
    if rounds_left < min_rounds_left:
        return Plan(
            {}, 0, f"{rounds_left} round(s) of the epoch left, fewer than {min_rounds_left}"
        )
    unmeasured = [w.node[:8] for w in work if not (w.rate and math.isfinite(w.rate))]
    if unmeasured:
        return Plan({}, 0, f"no measured rate yet for {', '.join(unmeasured)}")
    rest = sum(w.remaining for w in work)
    if rest <= 0:
        return Plan({}, 0, "no work left in the epoch")
    times = finishing_times(work)
    slowest, fastest = max(times.values()), min(times.values())
    spread = _spread(slowest, fastest)
    if spread <= tolerance:
        return Plan({}, 0, f"balanced: finishing times within {spread:.0%} of each other")

    rates = [w.rate or 0.0 for w in work]
    target = largest_remainder(rest, rates)
    batch = max(1, batch_size)
    # What each node keeps whatever the plan: the work it may have trained or loaded since it
    # last reported (a node near the end of its list takes no more: its epoch may be over).
    keep = {
        w.node: min(w.remaining, math.ceil((w.rate or 0.0) * horizon_s) + 2 * batch) for w in work
    }
    give_units: dict[str, int] = {}
    need_units: dict[str, int] = {}
    for w, t in zip(work, target, strict=True):
        if w.remaining > t:
            movable = min(w.remaining - t, w.remaining - keep[w.node])
            if movable >= batch:
                give_units[w.node] = movable // batch
        elif t > w.remaining and (
            w.remaining > keep[w.node] if w.can_receive is None else w.can_receive and w.remaining
        ):
            need_units[w.node] = math.ceil((t - w.remaining) / batch)
    units = min(sum(give_units.values()), sum(need_units.values()))
    if units <= 0:
        return Plan(
            {},
            0,
            f"finishing times {spread:.0%} apart, but nothing can move: the slower nodes' "
            "remaining work is within their protected margin, or the faster ones are at the "
            "end of theirs",
        )
    givers = list(give_units)
    takers = list(need_units)
    give = {
        n: k * batch
        for n, k in zip(
            givers, largest_remainder(units, [give_units[n] for n in givers]), strict=True
        )
        if k > 0
    }
    take = {
        n: k * batch
        for n, k in zip(
            takers, largest_remainder(units, [need_units[n] for n in takers]), strict=True
        )
        if k > 0
    }
    offered = units * batch

    # The donors' tails, in node order, are handed to the receivers, in node order.
    new: dict[str, Segments] = {}
    pool: list[Segment] = []
    for w in work:
        n = give.get(w.node, 0)
        if n:
            kept, tail = split(w.segments, total(w.segments) - n)
            new[w.node] = normalize(kept)
            pool.extend(tail)
    for w in work:
        n = take.get(w.node, 0)
        if n:
            got, rest_pool = split(pool, n)
            pool = list(rest_pool)
            new[w.node] = normalize((*w.segments, *got))
    assert not pool, "every moved position has a receiver"

    after = [
        NodeWork(w.node, new.get(w.node, w.segments), w.consumed, w.rate, w.can_receive)
        for w in work
    ]
    times_after = finishing_times(after)
    spread_after = _spread(max(times_after.values()), min(times_after.values()))
    if spread_after >= spread:
        return Plan({}, 0, f"moving work would not narrow the {spread:.0%} spread")
    moves = ", ".join(
        [f"{n[:8]} -{k}" for n, k in give.items()] + [f"{n[:8]} +{k}" for n, k in take.items()]
    )
    return Plan(
        new,
        offered,
        f"finishing times {spread:.0%} apart at measured rates; moved {offered} samples "
        f"({moves}); now {spread_after:.0%} apart",
    )


def _spread(slowest: float, fastest: float) -> float:
    """How much longer the slowest node needs than the fastest, as a fraction of the latter."""
    if slowest <= 0:
        return 0.0
    if fastest <= 0:
        return math.inf
    return slowest / fastest - 1.0


__all__ = [
    "MIN_ROUNDS_LEFT",
    "HORIZON_S",
    "TOLERANCE",
    "NodeWork",
    "Plan",
    "finishing_times",
    "rebalance",
]
