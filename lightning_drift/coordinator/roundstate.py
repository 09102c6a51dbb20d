"""The open round's state, and whether it can complete now: a pure function of both.

Rounds. ``completed`` is the last completed round; the open round is ``completed + 1``.
Round 0 is the start-up sync: the first upload becomes the global weights. The *expected*
contributors of a round are the live nodes of the epoch plan plus late joiners (and
rejoiners) from their second round on (the epoch book says who).

A round completes when every expected node has arrived, or when the straggler deadline has
passed and a quorum has arrived. The deadline adapts to the missing nodes' paces (the pace
book's, :meth:`PaceBook.for_deadline`)::

    deadline = round start + max(floor, margin × max over missing nodes of (work / pace))

where work is a round of the node's assignment (``ShardAssignment.work_per_round``). Only
when some missing node's pace is unknown (nothing at all is measured) is there no deadline.

Past the deadline a round without its quorum waits on, but not forever: once an expected
node has arrived (someone is held at the barrier), at the **hard deadline** every node still missing
is dropped from the session (``RoundDecision.drop``; it may rejoin, and gets new work then),
so the nodes that did arrive are never held by nodes that stopped uploading, whatever those
still send::

    hard deadline = base + max(heartbeat_timeout, 2 × (base - round start))
    base = the deadline, or round start + max(floor, heartbeat_timeout) without one

A node that keeps its connection alive but never uploads (hung, or hostile) therefore holds
the others at most three times the deadline. While a missing pace is unknown the hard
deadline, ``3 × max(floor, heartbeat_timeout)`` past the start, is the deadline too: a
quorum then completes the round and leaves the rest behind; only without one are they
dropped. While nobody has arrived nobody is held, and nobody is dropped: every node may be
slower than its estimate (a first round, a long validation). After a coordinator restart the round's
clock starts a reconnect grace after the restore: nodes first have to notice the restart,
reconnect and re-send their uploads, and the deadline must not leave them behind meanwhile.

The boundary, in the manner of torchft's quorum computation: :class:`RoundState` is what the
open round has gathered (uploads, nodes left out, its clock), :func:`round_decision` reads it
with the paces and the config and returns a :class:`RoundDecision` with a readable reason; it
changes nothing and reads no clock, so every case is a one-line test.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import msgspec

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.pacebook import DeadlinePace
from lightning_drift.coordinator.stoppolicy import quorum_need
from lightning_drift.coordinator.verdicts import RoundDecision, UploadVerdict, Verdict
from lightning_drift.text import short_id


class RoundState(msgspec.Struct):
    """The open round: its uploads (node -> samples, in arrival order), the nodes left out of
    it (node -> why), whether it is aggregating, and its clock. Not kept across a restart:
    the open round starts afresh then."""

    started: float = 0.0
    grace: float = 0.0  # seconds of ``started`` that are a restart's reconnect grace
    aggregating: int | None = None  # the round being aggregated (no uploads count)
    arrivals: dict[str, int] = {}
    took: dict[str, float] = {}  # node -> seconds from the round's start to its upload
    left_out: dict[str, str] = {}

    def arrived(self, node: str, samples: int, now: float) -> None:
        """``node``'s upload of ``samples`` counts, arriving at ``now``."""
        self.arrivals[node] = samples
        self.took[node] = max(0.0, now - self.started)

    def restart_clock(self, now: float, grace: float = 0.0) -> None:
        """The one place the round's clock starts: at ``now + grace`` (a restart's grace)."""
        self.started, self.grace = now + grace, grace

    def verdict(
        self,
        r: int,
        node: str,
        work: Callable[[], bool | None],
        *,
        completed: int,
        finished: bool,
        has_weights: bool,
        planned: bool,
        delta: bool,
        base_round: int,
    ) -> UploadVerdict:
        """``node``'s upload for round ``r``, taken against the global weights of
        ``base_round`` (-1: none): what the round says (:func:`upload_by_round`), then the
        node's work, then its base (:func:`upload_by_base`); a node left out is recorded so
        that the round no longer waits for it. ``work()``: whether the node has work in the
        epoch (None: none can be given; True: it was just given, the node is back)."""
        said = upload_by_round(
            r, node, self, completed=completed, finished=finished, has_weights=has_weights
        )
        if said is not None:
            return said
        if not planned:
            return UploadVerdict(
                Verdict.REFUSE, "no epoch is planned yet; send ShardRequest first", "no_shard"
            )
        returning = work()
        if returning is None:
            return UploadVerdict(Verdict.REFUSE, "no rounds left in this epoch", "no_shard")
        v = upload_by_base(r, completed, delta=delta, base_round=base_round)
        if v.kind is Verdict.LEFT_OUT:
            self.left_out[node] = v.reason
        if v.kind is Verdict.OPEN and returning:
            v = UploadVerdict(Verdict.OPEN, v.reason + " from a returning node")
        return v

    def next_round(self, now: float) -> None:
        """The aggregating round completed: the next one opens, empty, its clock at ``now``."""
        self.aggregating = None
        self.arrivals, self.took, self.left_out = {}, {}, {}
        self.restart_clock(now)


@dataclass(frozen=True)
class RoundFacts:
    """What a round decision reads besides the round's state and the paces."""

    open_round: int
    finished: bool
    planned: bool  # the open round is a barrier of the planned epoch
    expected: tuple[str, ...]  # its expected contributors
    work: Mapping[str, float]  # samples per round of each expected node


def deadline(
    state: RoundState, facts: RoundFacts, paces: Mapping[str, DeadlinePace], config: SessionConfig
) -> tuple[float | None, list[str], list[str]]:
    """(deadline, missing nodes whose pace is only estimated, missing nodes of unknown pace).
    No deadline when nobody is missing, or when some missing node's pace is unknown and no
    quorum has arrived. Bounded by :func:`quorum_bound` and ``deadline_max``."""
    missing = [n for n in facts.expected if n not in state.arrivals]
    if not missing:
        return None, [], []
    unknown = [n for n in missing if n not in paces]
    estimated = [n for n in missing if n in paces and paces[n].estimated]
    bound = quorum_bound(state, facts, config)
    if unknown:
        return bound, estimated, unknown
    longest = max(facts.work[n] / paces[n].pace for n in missing)
    by_pace = state.started + min(
        config.deadline_max, max(config.deadline_floor, config.deadline_margin * longest)
    )
    return (by_pace if bound is None else min(by_pace, bound)), estimated, unknown


def quorum_bound(state: RoundState, facts: RoundFacts, config: SessionConfig) -> float | None:
    """Once a quorum of the expected nodes has arrived, the latest the round's deadline may
    be: a margin over the time they took (``deadline_margin`` × the slowest of them, at
    least ``deadline_floor``, at most ``deadline_max``), whatever the missing nodes' paces
    say; None before a quorum. What the arrived nodes took is the coordinator's own clock:
    no number a straggler reports (nor a pace measured from its own slow uploads) holds the
    nodes that delivered."""
    took = [state.took.get(n, 0.0) for n in facts.expected if n in state.arrivals]
    if not took or len(took) < quorum_need(config.quorum, len(facts.expected)):
        return None
    span = max(config.deadline_floor, config.deadline_margin * max(took))
    return state.started + min(config.deadline_max, span)


def hard_deadline(soft: float | None, state: RoundState, config: SessionConfig) -> float:
    """When the nodes still missing from the open round are dropped (see the module's
    docstring): the deadline ``soft`` (None: none can be computed) and twice as long again,
    at least a heartbeat timeout."""
    base = soft
    if base is None:
        base = state.started + max(config.deadline_floor, config.heartbeat_timeout)
    return base + max(config.heartbeat_timeout, 2 * (base - state.started))


def round_decision(
    now: float,
    state: RoundState,
    facts: RoundFacts,
    paces: Mapping[str, DeadlinePace],
    config: SessionConfig,
) -> RoundDecision:
    """Can the open round complete now, and why. Pure."""
    r = facts.open_round
    if state.aggregating is not None:
        return RoundDecision(r, False, f"round {r} is being aggregated")
    if facts.finished:
        return RoundDecision(r, False, "the session has finished")
    if not facts.planned:
        return RoundDecision(r, False, f"round {r}: waiting for the epoch plan (start gate)")
    expected = facts.expected
    arrived = tuple(state.arrivals.items())
    missing = tuple(n for n in expected if n not in state.arrivals)
    if not arrived:  # nobody is held: nobody is dropped (and an empty round never completes)
        return RoundDecision(
            r, False, f"round {r}: waiting, 0/{len(expected)} arrived", missing=missing
        )
    if not missing:
        got = ", ".join(short_id(n) for n, _ in arrived)
        return RoundDecision(
            r,
            True,
            f"round {r} complete: all {len(expected)} live node(s) arrived ({got})",
            arrived,
        )
    need = quorum_need(config.quorum, len(expected))
    have = len(expected) - len(missing)
    dl, estimated, unknown = deadline(state, facts, paces, config)
    names = ", ".join(short_id(n) for n in missing)
    count = f"{have}/{len(expected)} arrived"
    hard = hard_deadline(dl, state, config)
    if dl is None:
        if now < hard:
            return _no_deadline(r, count, unknown, names, missing)
        dl = hard  # no pace to wait by: the hard deadline is the deadline too
    basis = _basis(estimated, state.grace)
    if now < dl:
        why = f"round {r}: waiting, {count}, deadline in {dl - now:.1f}s{basis}; missing {names}"
        return RoundDecision(r, False, why, missing=missing)
    if have >= need:
        return RoundDecision(
            r,
            True,
            f"round {r} complete: deadline passed {now - dl:.1f}s ago{basis} with "
            f"quorum {have}/{len(expected)} (needed {need}); left behind {names}",
            arrived,
            missing,
        )
    quorum = f"only {count}, quorum needs {need}"
    if not have:  # only nodes it does not count arrived (a late joiner's first round)
        return RoundDecision(r, False, f"round {r}: deadline passed but {quorum}; waiting")
    return _without_quorum(r, now, hard - state.started, hard, quorum + basis, missing)


def _without_quorum(
    r: int, now: float, allowed: float, hard: float, why: str, missing: tuple[str, ...]
) -> RoundDecision:
    """Past the deadline without a quorum: wait until the hard deadline (``allowed`` seconds
    after the round's start), then drop the nodes still missing."""
    names = ", ".join(short_id(n) for n in missing)
    if now >= hard:
        return RoundDecision(
            r,
            False,
            f"round {r}: hard deadline passed {now - hard:.1f}s ago with {why}; dropping "
            f"{names}: no upload within {allowed:.0f}s of the round's start",
            missing=missing,
            drop=missing,
        )
    return RoundDecision(
        r,
        False,
        f"round {r}: deadline passed but {why}; waiting until the hard deadline in "
        f"{hard - now:.1f}s; missing {names}",
        missing=missing,
    )


def upload_by_round(
    r: int, node: str, state: RoundState, *, completed: int, finished: bool, has_weights: bool
) -> UploadVerdict | None:
    """What the round alone says of ``node``'s upload for round ``r``: None when it may count
    (the node's work and base decide then). Pure."""
    if r == 0:
        if not has_weights:
            return UploadVerdict(Verdict.INITIAL, "first start-up sync: adopted as round 0")
        return UploadVerdict(Verdict.CURRENT, "start-up sync: here are the global weights")
    if r < 0:
        return UploadVerdict(Verdict.REFUSE, f"round {r} is negative", "bad_round")
    if r <= completed:
        return UploadVerdict(
            Verdict.CURRENT, f"round {r} already completed; discarded (latest {completed})"
        )
    if finished:
        return UploadVerdict(Verdict.CURRENT, "the session has finished")
    if r > completed + 1:
        return UploadVerdict(
            Verdict.REFUSE, f"round {r} is not open; the open round is {completed + 1}", "bad_round"
        )
    if state.aggregating == r:
        return UploadVerdict(Verdict.LATE, f"round {r} is being aggregated; not counted")
    if node in state.left_out:
        return UploadVerdict(Verdict.LATE, f"excluded from round {r}: {state.left_out[node]}")
    if node in state.arrivals:
        return UploadVerdict(Verdict.AGAIN, f"upload for round {r} already counted")
    return None


def upload_by_base(r: int, completed: int, *, delta: bool, base_round: int) -> UploadVerdict:
    """What the weights an upload was taken against say of it (the round has said it may
    count). A ``delta`` (a change from the global weights of ``base_round``; -1: none) must
    name its base, and is left out of round ``r`` when that is not the global weights it
    would be added to (``completed``'s). Whole weights do not depend on it. Pure."""
    if delta and base_round < 0:
        return UploadVerdict(
            Verdict.REFUSE,
            "a delta upload must name the round of the weights it was taken against "
            "(BarrierSync.base_round); upload whole weights when there are none",
            "bad_upload",
        )
    if delta and base_round != completed:
        # (local - global) is only meaningful against the weights it was taken from.
        return UploadVerdict(
            Verdict.LEFT_OUT,
            f"delta against round {base_round}'s weights, but the global weights are round "
            f"{completed}'s: left out of round {r}",
        )
    return UploadVerdict(Verdict.OPEN, f"round {r} upload accepted")


def _no_deadline(
    r: int, count: str, unknown: list[str], names: str, missing: tuple[str, ...]
) -> RoundDecision:
    """Waiting without a deadline: some missing node's pace is unknown."""
    return RoundDecision(
        r,
        False,
        f"round {r}: waiting, {count}, no deadline yet (pace of "
        f"{', '.join(short_id(n) for n in unknown)} unknown: no measured rate and no "
        f"calibration estimate); missing {names}",
        missing=missing,
    )


def _basis(estimated: list[str], grace: float) -> str:
    """What a deadline rests on, when it is not plain measurement."""
    basis = ""
    if estimated:
        basis = (
            f" (pace of {', '.join(short_id(n) for n in estimated)} estimated from "
            "calibration, no measured rate)"
        )
    if grace > 0:
        basis += f" (after a {grace:g}s reconnect grace for the restart)"
    return basis


__all__ = [
    "RoundFacts",
    "RoundState",
    "deadline",
    "hard_deadline",
    "round_decision",
    "upload_by_base",
    "upload_by_round",
]
