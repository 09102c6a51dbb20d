"""Re-plans: the rest of an epoch re-split by measured paces, at most once per open round. Pure.

An epoch is planned once, from the paces the scheduler has when it starts: calibration for a
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

- a **donor** (its remaining work takes longer than its fair share would, and it has fallen
  behind its plan: measured below :data:`BEHIND` of the pace its work was sized by, or its
  work was sized by calibration alone) gives away the tail of its list, keeping ``horizon_s`` seconds of work at its measured pace beyond where it is
  thought to be (its position is an estimate from a report seconds old, and the re-plan
  takes a moment to reach it) plus two batches its data loader may have read ahead;
- a **receiver** appends the donors' tails to its list, in node order, so that every position
  of the epoch stays with exactly one node. A node that may be at the end of its epoch takes
  nothing: the caller says so (``NodeWork.can_receive``: rounds are global, so a node held at
  a barrier that is not its epoch's last will train its tail), or, when it cannot, a node
  whose remaining work is within that same margin is taken to be at its end.

Paces are the measured ones only (``pacebook.py``): what a node says about its speed moves no
work, and a node that keeps to its plan keeps its work however fast another node looks.
Nothing moves when a node has no measured pace, or when the predicted finishing times are
within ``tolerance`` of each other. Moves are whole batches (multiples of ``batch_size``), so
batch-aligned lists stay aligned.

The session side (:class:`Replans`): as paces come in (progress reports, barrier uploads),
the unconsumed rest of the epoch is re-planned among the plan's live nodes, at most once per
open round; each changed node gets its new assignment with a higher ``revision``. Positions a
node reports having trained, moved on by its pace for the time since the report, tell where it
is; work near that position never moves. Late joiners and returning nodes keep their work.

The boundary: :func:`rebalance` is the arithmetic on segment lists (nodes, paces, positions
in; new lists out); :class:`Replans` turns the session's books into its input and its output
into assignments. Every decision carries a readable reason; tests assert on them.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

import msgspec

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.epochbook import EpochBook
from lightning_drift.coordinator.pacebook import PaceBook
from lightning_drift.coordinator.segments import Segment, Segments, normalize, split, total
from lightning_drift.protocol import ShardAssignment
from lightning_drift.scheduler import largest_remainder
from lightning_drift.text import short_id

TOLERANCE = 0.05  # predicted finishing times may differ by this fraction before work moves
MIN_ROUNDS_LEFT = 1  # the epoch's rounds not yet completed, at least
HORIZON_S = 7.0  # seconds a node may have trained since its last report (reports every 5 s)
# A node measured below this fraction of the pace its work was sized by has fallen behind
# its plan: only such a node gives work away.
BEHIND = 0.8


@dataclass(frozen=True)
class NodeWork:
    """One node's part of the epoch as the coordinator knows it.

    ``consumed``: positions of ``segments`` the node has trained by now, as far as the
    coordinator can tell (its last report moved on by its pace; 0 if it has not said);
    ``pace``: its measured samples per second (None: not measured yet)."""

    node: str
    segments: Segments
    consumed: int
    pace: float | None
    # Whether work appended to the node's tail will be trained: known when the node still has
    # a barrier ahead of anything it can have reached; None: judged by the margin (see above).
    can_receive: bool | None = None
    # Measured at the pace its work was sized by (or better): it keeps to its plan, and no
    # re-plan takes its work, however fast others look.
    keeps_plan: bool = False

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
    """Seconds each node needs for its remaining work at its measured pace."""
    return {w.node: w.remaining / w.pace for w in work if w.pace}


def rebalance(
    work: Sequence[NodeWork],
    rounds_left: int,
    *,
    batch_size: int,
    tolerance: float = TOLERANCE,
    min_rounds_left: int = MIN_ROUNDS_LEFT,
    horizon_s: float = HORIZON_S,
) -> Plan:
    """Re-split the unconsumed rest of an epoch in proportion to measured paces.

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
    unmeasured = [short_id(w.node) for w in work if not (w.pace and math.isfinite(w.pace))]
    if unmeasured:
        return Plan({}, 0, f"no measured rate yet for {', '.join(unmeasured)}")
    if sum(w.remaining for w in work) <= 0:
        return Plan({}, 0, "no work left in the epoch")
    times = finishing_times(work)
    spread = _spread(max(times.values()), min(times.values()))
    if spread <= tolerance:
        return Plan({}, 0, f"balanced: finishing times within {spread:.0%} of each other")
    batch = max(1, batch_size)
    give, take = _moves(work, batch, horizon_s)
    if not give:
        return Plan(
            {},
            0,
            f"finishing times {spread:.0%} apart, but nothing can move: the slower nodes keep "
            "to their plans or their remaining work is within their protected margin, or the "
            "faster ones are at the end of theirs",
        )
    new = _hand_over(work, give, take)
    after = [
        NodeWork(
            w.node, new.get(w.node, w.segments), w.consumed, w.pace, w.can_receive, w.keeps_plan
        )
        for w in work
    ]
    times_after = finishing_times(after)
    spread_after = _spread(max(times_after.values()), min(times_after.values()))
    if spread_after >= spread:
        return Plan({}, 0, f"moving work would not narrow the {spread:.0%} spread")
    offered = sum(give.values())
    moves = ", ".join(
        [f"{short_id(n)} -{k}" for n, k in give.items()]
        + [f"{short_id(n)} +{k}" for n, k in take.items()]
    )
    return Plan(
        new,
        offered,
        f"finishing times {spread:.0%} apart at measured rates; moved {offered} samples "
        f"({moves}); now {spread_after:.0%} apart",
    )


def _moves(
    work: Sequence[NodeWork], batch: int, horizon_s: float
) -> tuple[dict[str, int], dict[str, int]]:
    """Samples each donor gives and each receiver takes (whole ``batch``-es, the same total
    on both sides; both empty when nothing can move), toward every node's share of the rest
    in proportion to its pace."""
    rest = sum(w.remaining for w in work)
    target = largest_remainder(rest, [w.pace or 0.0 for w in work])
    # What each node keeps whatever the plan: the work it may have trained or loaded since it
    # last reported (a node near the end of its list takes no more: its epoch may be over).
    keep = {
        w.node: min(w.remaining, math.ceil((w.pace or 0.0) * horizon_s) + 2 * batch) for w in work
    }
    give_units: dict[str, int] = {}
    need_units: dict[str, int] = {}
    for w, t in zip(work, target, strict=True):
        if w.remaining > t and not w.keeps_plan:
            movable = min(w.remaining - t, w.remaining - keep[w.node])
            if movable >= batch:
                give_units[w.node] = movable // batch
        elif t > w.remaining and (
            w.remaining > keep[w.node] if w.can_receive is None else w.can_receive and w.remaining
        ):
            need_units[w.node] = math.ceil((t - w.remaining) / batch)
    units = min(sum(give_units.values()), sum(need_units.values()))
    if units <= 0:
        return {}, {}
    return _spread_units(give_units, units, batch), _spread_units(need_units, units, batch)


def _spread_units(wanted: dict[str, int], units: int, batch: int) -> dict[str, int]:
    """``units`` batches split among ``wanted``'s nodes in proportion to what each wants."""
    nodes = list(wanted)
    parts = largest_remainder(units, [wanted[n] for n in nodes])
    return {n: k * batch for n, k in zip(nodes, parts, strict=True) if k > 0}


def _hand_over(
    work: Sequence[NodeWork], give: dict[str, int], take: dict[str, int]
) -> dict[str, Segments]:
    """The donors' tails, in node order, handed to the receivers, in node order."""
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
    return new


def _spread(slowest: float, fastest: float) -> float:
    """How much longer the slowest node needs than the fastest, as a fraction of the latter."""
    if slowest <= 0:
        return 0.0
    if fastest <= 0:
        return math.inf
    return slowest / fastest - 1.0


class Replans(msgspec.Struct):
    """The session's re-plans: the last ``revision`` (grows over the session), the open
    round of the last re-plan (``round``: one per round), and what the last try said."""

    revision: int = 0
    round: int = -1
    last: str = ""

    def replan(
        self,
        now: float,
        book: EpochBook,
        paces: PaceBook,
        live: Collection[str],
        completed: int,
        config: SessionConfig,
    ) -> list[tuple[str, ShardAssignment]]:
        """Re-plan the rest of the epoch if paces have drifted from the shares.

        Returns the new assignments to send, one per node whose work changed (empty when
        nothing moves: :attr:`last` says why). The plan's ``live`` nodes take part."""
        plan, open_round, batch_size = book.plan, completed + 1, config.batch_size
        if plan is None or self.round >= open_round or open_round > plan.last_round:
            return []
        nodes = sorted(
            n
            for n, a in book.assignments.items()
            if a.epoch == plan.epoch and n not in book.late and n in live
        )
        work = [self._work(n, now, book, paces, open_round, batch_size) for n in nodes]
        decision = rebalance(
            work,
            plan.last_round - completed,
            batch_size=move_unit([book.assignments[n] for n in nodes], batch_size),
            # A node reports what it trained every progress_every_s (and at every upload).
            horizon_s=config.progress_every_s + 2.0,
        )
        self.last = f"epoch {plan.epoch} round {open_round}: {decision.reason}"
        if not decision:
            return []
        self.revision += 1
        self.round = open_round
        paces_of = {w.node: w.pace or 0.0 for w in work}
        total_pace = sum(paces_of.values()) or 1.0
        out = []
        for node, segments in decision.segments.items():
            first = segments[0] if segments else (0, 0)
            a = msgspec.structs.replace(
                book.assignments[node],
                start=first[0],
                stop=first[1],
                segments=[(lo, hi) for lo, hi in segments] if len(segments) > 1 else [],
                share=paces_of[node] / total_pace,
                revision=self.revision,
            )
            book.assignments[node] = a
            book.planned[node] = paces_of[node]  # its work is now sized by this pace
            out.append((node, a))
        return out

    @staticmethod
    def _work(
        n: str, now: float, book: EpochBook, paces: PaceBook, open_round: int, batch_size: int
    ) -> NodeWork:
        """Node ``n``'s work as a re-plan sees it: its ranges, where it is, its pace."""
        a = book.assignments[n]
        reach, more = book.reach(n, open_round, batch_size)
        said = book.trained.get(n, 0)
        pace = paces.for_replan(n)
        # Moved on by its pace, but not past where the rounds hold it, nor behind what it
        # said; a node that said more than the rounds allow is judged by the margin alone.
        at = min(a.size, max(said, min(book.position(n, now, pace or 0.0), reach)))
        can_receive = True if more and said < reach else None
        planned = book.planned.get(n, 0.0)
        keeps = bool(pace and planned and pace >= BEHIND * planned)
        return NodeWork(n, tuple(a.ranges), at, pace, can_receive, keeps)


def move_unit(assignments: Sequence[ShardAssignment], batch_size: int) -> int:
    """Samples a re-plan moves at a time: a whole optimizer step of every node taking part
    (the least common multiple of their samples per step), so shards cut in whole steps
    stay whole; the largest step when that multiple would be absurdly large."""
    units = [a.samples_per_step or a.batch_size or batch_size for a in assignments]
    units = [max(1, u) for u in units] or [max(1, batch_size)]
    lcm = math.lcm(*units)
    return lcm if lcm <= 64 * max(units) else max(units)


__all__ = [
    "BEHIND",
    "HORIZON_S",
    "MIN_ROUNDS_LEFT",
    "TOLERANCE",
    "NodeWork",
    "Plan",
    "Replans",
    "finishing_times",
    "move_unit",
    "rebalance",
]
