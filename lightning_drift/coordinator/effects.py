"""What the coordinator's round core tells the server to do, as values: :class:`Effects`.

The upload core (``uploads.py``) and the rounds (``rounds.py``) decide; the server
(``server.py``) owns the connections and only carries decisions out. So the core never calls
back into the server: every step that changes the session returns the events to log, the
nodes banned, a stop to tell every node, the latest round decision (to act on when it says
complete), a completed round, the re-plans to send and a failure that must stop the
coordinator, and the server carries them out in that order
(:meth:`~lightning_drift.coordinator.server.Coordinator.carry_out`).

The boundary is here so that the decisions can be tested without a network (a test reads
the effects a call returns) and so that one upload's path reads one way: server → core →
effects → server.

The helpers below are the session's steps that every part of the core shares: a bad upload
(:func:`reject`), a strike (:func:`strike`), an upload left out of one round
(:func:`left_out`), a re-plan (:func:`replan`) and a stop request's verdict
(:func:`stop_request`). They change the session (not pure) but do no I/O and read no clock:
``now`` is passed in.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from lightning_drift.coordinator.session import RoundDecision, RoundOutcome, Session, StopVerdict
from lightning_drift.protocol import ShardAssignment, StopDecision
from lightning_drift.text import short_id

log = logging.getLogger(__name__)


@dataclass
class Effects:
    """What to carry out, in this order: log ``events``; end the connections of the
    ``banned`` nodes (node, why); tell every node the stop just decided (``told``); act on a
    ``completed`` round or a session ``finished`` outside one (pending shard requests, the
    finish); send the ``replans``; stop the coordinator on ``failed``; act on the latest
    round ``decision`` (complete the round when it says so)."""

    events: list[str] = field(default_factory=list)
    banned: list[tuple[str, str]] = field(default_factory=list)
    told: StopVerdict | None = None  # a stop just decided (durable already): every node hears
    completed: RoundOutcome | None = None
    finished: bool = False  # the session finished outside a round's completion (a stop)
    replans: list[tuple[str, ShardAssignment]] = field(default_factory=list)
    failed: str = ""  # a round could not be completed: the coordinator must stop
    decision: RoundDecision | None = None  # the session's latest round decision

    def add(self, later: Effects) -> Effects:
        """These effects followed by ``later`` (the later decision replaces the earlier:
        it was taken on the newer state). Returns self."""
        self.events += later.events
        self.banned += later.banned
        self.told = later.told or self.told
        self.completed = later.completed or self.completed
        self.finished = self.finished or later.finished
        self.replans += later.replans
        self.failed = self.failed or later.failed
        self.decision = later.decision or self.decision
        return self

    def __bool__(self) -> bool:
        return bool(
            self.events
            or self.banned
            or self.told
            or self.completed
            or self.finished
            or self.replans
            or self.failed
            or self.decision
        )


def strike(session: Session, node: str, reason: str, now: float) -> Effects:
    """One failed upload of ``node``; when that bans it, its connection is to end and the
    open round no longer waits for it."""
    d = session.strike(node, reason, now)
    fx = Effects(events=[d.reason])
    if d.ok:
        fx.banned.append((node, d.reason))
        fx.decision = session.check(now)
    return fx


def reject(
    session: Session, node: str, upload_round: int, reason: str, now: float, *, strikes: bool
) -> Effects:
    """A bad upload for ``upload_round``: the node is left out of it, which may complete.
    With ``strikes`` it counts as one of the node's failed uploads."""
    fx = Effects(
        events=[f"node {short_id(node)} upload for round {upload_round} refused: {reason}"],
        decision=session.reject(node, upload_round, reason, now),
    )
    if strikes:
        fx.add(strike(session, node, reason, now))
    return fx


def left_out(session: Session, node: str, upload_round: int, reason: str, now: float) -> Effects:
    """The session left ``node``'s upload out of the open round: it may now complete."""
    return Effects(
        events=[f"node {short_id(node)} upload for round {upload_round} refused: {reason}"],
        decision=session.check(now),
    )


def replan(session: Session, now: float) -> Effects:
    """Re-plan the rest of the epoch if the session says so: the assignments to send."""
    before = session.last_rebalance
    replans = session.rebalance(now)
    if session.last_rebalance != before:
        log.debug("rebalance %s", session.last_rebalance)
    if not replans:
        return Effects()
    return Effects(events=[session.last_rebalance], replans=replans)


def stop_request(session: Session, verdict: StopVerdict, now: float) -> Effects:
    """A stop request's ``verdict``: its reason logged (it names the node and why it was
    overruled or told to leave); a stop it decided told to every node, and the finish when it
    finished the session at once; the open round's decision (a final round may complete)."""
    fx = Effects(events=[verdict.reason], decision=session.check(now))
    if verdict.newly:
        fx.told, fx.finished = verdict, verdict.finished_now
    return fx


def stop_decision(verdict: StopVerdict) -> StopDecision:
    """The message that tells a node ``verdict``."""
    return StopDecision(
        stop=verdict.stop, round=verdict.final_round, reason=verdict.reason, leave=verdict.leave
    )


__all__ = [
    "Effects",
    "left_out",
    "reject",
    "replan",
    "stop_decision",
    "stop_request",
    "strike",
]
