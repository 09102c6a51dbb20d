"""The session: events in, decisions out, over small pure parts. No I/O, no clock of its own.

The server (``server.py``) turns frames into calls on :class:`Session` and turns the returned
decisions into frames; every time-dependent call takes ``now`` (float seconds). Tests drive it
with a fake clock. ``Session`` is a facade: each rule lives in one part, which says in its
docstring why its boundary is where it is:

- ``roster.py``: members, caps, names, heartbeats, strikes and bans;
- ``pacebook.py``: every speed estimate (measured, reported, smoothed) and its one average;
- ``epochbook.py``: epoch plans, assignments, late joiners, orphaned work, positions;
- ``replans.py``: re-plans of the rest of an epoch by measured paces;
- ``evidence.py``: whether an upload shows the training it claims;
- ``roundstate.py``: the open round and the pure ``round_decision`` (quorum and deadline);
- ``stoppolicy.py``: stop requests and the pure ``decide_stop``;
- ``views.py``: the training config and the status; ``verdicts.py``: the answer types.

What the facade itself keeps: the session's own facts (its id, the dataset and model it
trains, the completed round and epoch, whether it has weights or has finished), and the
order in which one event touches the parts. Trust: every message reaches the session through
``boundary.py`` (numbers finite and in range, strings clean); what a node says about itself
is then believed only within the bounds the pace book and the scheduler set. An upload's
aggregation weight is its reported ``samples`` bounded by its assignment's work for the
rounds since its last counted upload (:meth:`Session.weight_for`), so one node cannot dominate
the weighted mean with a bogus count; only uploads that show training measure paces, deliver
work and count positions as trained (``evidence.py``).
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Generic, TypeVar

import msgspec

from lightning_drift.coordinator import views
from lightning_drift.coordinator.boundary import PACE_FACTOR
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.epochbook import EpochBook, round_end, shard_reply
from lightning_drift.coordinator.evidence import Evidence
from lightning_drift.coordinator.pacebook import DeadlinePace, PaceBook, trained_for
from lightning_drift.coordinator.replans import Replans
from lightning_drift.coordinator.roster import (
    BANNED_MAX,
    GONE,
    LIVE,
    Member,
    MemberState,
    Roster,
    info_refusal,
)
from lightning_drift.coordinator.roundstate import (
    RoundFacts,
    RoundState,
    deadline,
    round_decision,
)
from lightning_drift.coordinator.state import upgrade_v1
from lightning_drift.coordinator.stoppolicy import StopBook, StopFacts, decide_stop
from lightning_drift.coordinator.verdicts import (
    Decision,
    RoundDecision,
    RoundOutcome,
    ShardReply,
    StopVerdict,
    UploadVerdict,
    Verdict,
)
from lightning_drift.protocol import (
    NodeInfo,
    SessionStatus,
    ShardAssignment,
    StopKind,
    TrainConfig,
    TrainProgress,
)
from lightning_drift.scheduler import EpochPlan, Scheduler
from lightning_drift.text import short_id

T = TypeVar("T")


class _Via(Generic[T]):
    """A facade attribute that is one of a part's (read and written there)."""

    def __init__(self, part: str, name: str = "") -> None:
        self.part, self.name = part, name

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = self.name or name

    def __get__(self, obj: Any, owner: type | None = None) -> T:
        return getattr(getattr(obj, self.part), self.name)  # type: ignore[no-any-return]

    def __set__(self, obj: Any, value: T) -> None:
        setattr(getattr(obj, self.part), self.name, value)


class SessionRecord(msgspec.Struct):
    """What ``state.json`` keeps of a session: its own facts, then each part as itself."""

    config: dict[str, Any]
    session_id: str
    started_at: float
    dataset_size: int
    model_fingerprint: str
    has_weights: bool
    completed: int
    epoch: int
    finished: bool
    roster: Roster
    paces: PaceBook
    epochs: EpochBook
    replans: Replans
    stop: StopBook
    scheduler: Scheduler | None = None
    evidence: Evidence = msgspec.field(default_factory=Evidence)

    @classmethod
    def of(cls, s: Session) -> SessionRecord:
        return cls(
            config=asdict(s.config),
            session_id=s.session_id,
            started_at=s.started_at,
            dataset_size=s.dataset_size,
            model_fingerprint=s.model_fingerprint,
            has_weights=s.has_weights,
            completed=s.completed,
            epoch=s.epoch,
            finished=s.finished,
            roster=s.roster,
            paces=s.paces,
            epochs=s.book,
            replans=s.replans,
            stop=s.stops,
            scheduler=s.scheduler,
            evidence=s.evidence,
        )

    def restore(self, now: float) -> Session:
        """The session after a restart. Members that were live get ``heartbeat_timeout`` more
        (from ``now``) to reconnect before they are lost: they first have to notice the old
        coordinator is gone, then reconnect with backoff. The open round starts afresh, its
        clock after a reconnect grace of ``heartbeat_timeout``: the straggler deadline, floor
        included, counts from when nodes can have re-sent their uploads, so quorum does not
        close the round while honest uploads are still on their way back."""
        config = SessionConfig.from_dict(self.config)
        s = Session(config, session_id=self.session_id, now=now)
        s.started_at, s.dataset_size = self.started_at, self.dataset_size
        s.model_fingerprint, s.has_weights = self.model_fingerprint, self.has_weights
        s.completed, s.epoch, s.finished = self.completed, self.epoch, self.finished
        s.roster, s.paces, s.book = self.roster, self.paces, self.epochs
        s.replans, s.stops, s.scheduler = self.replans, self.stop, self.scheduler
        s.evidence = self.evidence
        s.evidence.round, s.evidence.weak = {}, {}  # the open round starts afresh
        s.book.trained_at.clear()  # times of another process's clock
        s.roster.restored(now, config.heartbeat_timeout)
        s.round.restart_clock(now, config.heartbeat_timeout)
        return s


class Session:
    """One training session's membership, rounds, epochs and their decisions (a facade).

    ``scheduler`` is None until the dataset size is known (``--dataset-size`` or the first
    admitted node's ``NodeInfo.dataset_size``).
    """

    members = _Via[dict[str, Member]]("roster")
    admitted = _Via[set[str]]("roster")
    plan = _Via[EpochPlan | None]("book")
    assignments = _Via[dict[str, ShardAssignment]]("book")
    aggregating = _Via[int | None]("round")
    arrivals = _Via[dict[str, int]]("round")
    round_started = _Via[float]("round", "started")
    stop_requests = _Via[dict[str, str]]("stops", "requests")
    stop_round = _Via[int | None]("stops", "final_round")
    stop_reason = _Via[str]("stops", "reason")
    last_rebalance = _Via[str]("replans", "last")

    def __init__(self, config: SessionConfig, *, session_id: str, now: float) -> None:
        self.config = config
        self.session_id = session_id
        self.started_at = now
        self.dataset_size = config.dataset_size
        self.model_fingerprint = ""  # adopted from the first admitted node
        self.scheduler = _scheduler(config, self.dataset_size) if self.dataset_size else None
        self.has_weights = False
        self.completed = 0
        self.epoch = 0
        self.finished = False
        self.roster = Roster()
        self.paces = PaceBook()
        self.book = EpochBook()
        self.replans = Replans()
        self.stops = StopBook()
        self.evidence = Evidence()
        self.round = RoundState(started=now)

    # ---- derived state -------------------------------------------------------------------
    @property
    def open_round(self) -> int:
        return self.completed + 1

    def live(self) -> list[str]:
        return self.roster.live()

    def expected(self) -> list[str]:
        """Nodes whose upload the open round waits for, in join order."""
        return list(_round_inputs(self)[0].expected)

    def deadline(self) -> float | None:
        """When stragglers of the open round may be left behind (None: the pace of some
        missing node is neither measured nor estimable, or nobody is missing)."""
        return deadline(self.round, *_round_inputs(self), self.config)[0]

    def weight_for(self, node: str, samples: int, upload_round: int = -1) -> float:
        """The aggregation weight of ``node``'s upload for ``upload_round`` reporting
        ``samples``: at most the work its assignment holds for the rounds since its last
        counted upload (:meth:`EpochBook.work_since`), never more than its whole shard;
        without an assignment (not counted then), by the dataset size."""
        m = self.members.get(node)
        last = m.arrived_round if m else 0
        cap = self.book.work_since(
            node, upload_round, last, self.dataset_size, self.config.batch_size
        )
        return float(max(0, min(int(samples), cap)))

    # ---- membership events ---------------------------------------------------------------
    def join(self, node: str, name: str, now: float, token: str = "") -> Decision:
        """A Join with a valid token (jti ``token``) whose QUIC peer key is ``node``."""
        return self.roster.join(node, name, now, token, self.config, self.finished)

    def admit(self, node: str, info: NodeInfo, now: float) -> Decision:
        """NodeInfo arrived: check it against the session; the node becomes ready."""
        m = self.members.get(node)
        if m is None:
            return Decision(False, "NodeInfo before Join", "protocol")
        m.last_seen = now
        if info.name:  # a node the coordinator dialled sends its name here, not in a Join
            m.name = self.roster.unique_name(node, info.name)
        if refused := info_refusal(info, self.dataset_size, self.model_fingerprint):
            return refused
        self.model_fingerprint = self.model_fingerprint or info.model_fingerprint
        if self.scheduler is None:
            self.dataset_size = info.dataset_size
            self.scheduler = _scheduler(self.config, self.dataset_size)
        if refusal := self.scheduler.admit(info):
            return Decision(False, refusal.reason, refusal.code)
        if node not in self.admitted:
            self.scheduler.add(node, info)
            self.admitted.add(node)
        return self.roster.ready(node, info)

    def seen(self, node: str, now: float) -> None:
        """Any message from ``node`` (heartbeat)."""
        self.roster.seen(node, now)

    def progress(self, node: str, msg: TrainProgress, now: float) -> None:
        if self.roster.progress(node, msg, now):
            self.book.record(node, msg.epoch, msg.epoch_samples, now)
            if msg.samples_per_s > 0:
                self.paces.report(node, msg.samples_per_s)

    def lost(self, node: str, reason: str, now: float, *, left: bool = False) -> Decision:
        """The node's connection is gone (or it said Bye): it leaves the rounds, and the rest
        of its work is handed on."""
        m = self.roster.gone(node, reason, now, left=left)
        if m is None:
            return Decision(False, f"node {short_id(node)} was not live")
        self.stops.drop(node)
        arrived = node in self.arrivals
        self.book.hand_on(node, self.open_round, arrived, self.config.batch_size)
        return Decision(True, f"node {short_id(node)} {m.state.value}: {reason}")

    def tick(self, now: float) -> tuple[list[tuple[str, str]], RoundDecision]:
        """Periodic check: heartbeat losses, then whether the open round can complete."""
        gone = self.roster.timed_out(now, self.config.heartbeat_timeout)
        for node, reason in gone:
            self.lost(node, reason, now)
        self.forget(now)
        d = self.check(now)
        for node in d.drop:  # past the hard deadline: the nodes that arrived are held no longer
            gone.append((node, f"no upload for round {d.open_round} by its hard deadline"))
            self.lost(node, gone[-1][1], now)
        return gone, (self.check(now) if d.drop else d)

    def forget(self, now: float) -> list[str]:
        """Drop members gone for longer than ``forget_after_s`` (and the oldest gone ones
        beyond ``max_nodes`` of them) from the roster, the paces and the scheduler."""
        drop = self.roster.forget(now, self.config.forget_after_s, self.config.max_nodes)
        for n in drop:
            self.paces.forget(n)
            if self.scheduler is not None:
                self.scheduler.forget(n)
        return drop

    def strike(self, node: str, reason: str, now: float) -> Decision:
        """One of ``node``'s uploads failed (refused as bad, or named as the cause of a round
        whose aggregate failed). ``ok`` when this banned the node: it leaves the open round
        and its key is refused from now on."""
        d = self.roster.strike(node, self.config.max_strikes)
        if not d.ok:
            return d
        why = f"{d.reason}, the last: {reason}"
        if self.members[node].live():
            self.lost(node, why, now, left=True)
        return self.roster.ban(node, why, now)

    # ---- shards and epochs ---------------------------------------------------------------
    def maybe_plan(self, now: float) -> int | None:
        """Make the next epoch plan when its gate is open; returns the planned epoch or None."""
        epoch = self.book.next_epoch(self.completed, self.config.epochs)
        if self.finished or self.scheduler is None or self.stop_round is not None or epoch is None:
            return None
        ready = [n for n in self.live() if self.members[n].state is not MemberState.JOINED]
        if len(ready) < (self.config.min_nodes if epoch == 0 else 1):
            return None
        measured = self.paces.measured()
        plan = self.scheduler.plan_epoch(epoch, ready, self.open_round, measured)
        self.epoch, final = epoch, epoch == self.config.epochs - 1
        self.book.begin(
            plan, seed=self.config.seed, final=final, revision=self.replans.revision, paces=measured
        )
        if now > self.round_started:
            self.round.restart_clock(now)
        return epoch

    def shard(self, node: str, epoch: int, now: float) -> ShardReply:
        """A ShardRequest: the node's assignment for ``epoch``, or wait, or a refusal."""
        m = self.members.get(node)
        if m is None or not m.live():
            return ShardReply(None, "not joined", "not_joined")
        m.last_seen = now
        if self.finished:
            return ShardReply(None, f"no epoch {epoch}: the session has finished", "finished")
        self.maybe_plan(now)
        if never := self.book.never_planned(epoch, self.config.epochs):
            return ShardReply(None, never, "bad_epoch")
        if self.plan is None or epoch > self.plan.epoch:
            return ShardReply(None, f"epoch {epoch} is not planned yet; waiting")
        a = self.assignments.get(node) or _late_assignment(self, node)
        if a is None:
            return ShardReply(None, "no rounds left in this epoch; waiting for the next")
        if m.state is MemberState.READY:
            m.state = MemberState.TRAINING
        return shard_reply(node, a, node in self.book.late)

    def rebalance(self, now: float) -> list[tuple[str, ShardAssignment]]:
        """Re-plan the rest of the epoch if paces drifted from the shares (``replans.py``);
        the new assignments to send (empty: ``last_rebalance`` says why)."""
        if not self.config.rebalance or self.finished or self.aggregating is not None:
            return []
        live = set(self.live())
        return self.replans.replan(now, self.book, self.paces, live, self.completed, self.config)

    # ---- barriers ------------------------------------------------------------------------
    def upload(
        self, node: str, upload_round: int, now: float, *, base_round: int = -1, delta: bool = False
    ) -> UploadVerdict:
        """A BarrierSync arrived, for ``upload_round`` (the round the node contributes to),
        taken against the global weights of ``base_round`` (-1: none): ``RoundState.verdict``."""
        m = self.members.get(node)
        if m is None or not m.live():
            return UploadVerdict(Verdict.REFUSE, "join first", "not_joined")
        m.last_seen = now
        return self.round.verdict(
            upload_round,
            node,
            lambda: _work_for(self, node),
            completed=self.completed,
            finished=self.finished,
            has_weights=self.has_weights,
            planned=self.plan is not None,
            delta=delta,
            base_round=base_round,
        )

    def arrived(
        self,
        node: str,
        upload_round: int,
        samples: int,
        now: float,
        train_s: float = 0.0,
        *,
        epoch: int | None = None,
        epoch_samples: int = -1,
        loss: float | None = None,
        change: float = 0.0,
        evidence: bool = True,
    ) -> RoundDecision:
        """The node's upload for ``upload_round`` (the open round) was accumulated, weighing
        ``samples`` as :meth:`weight_for` bounds it; its pace is measured over the time it says
        it trained (``train_s``) within what the coordinator saw (``pacebook.trained_for``), and
        reported by ``train_s``.
        ``epoch_samples``: what of its work it had trained (-1: not said); ``loss``: shown
        until its next progress report; ``change``: the norm of its change; ``evidence``:
        whether it showed training (``evidence.py``: else it is neither a measurement nor work
        delivered, nor trained positions). Returns the round decision."""
        m = self.members[node]
        m.last_seen = now
        if loss is not None:
            m.loss = loss
        if upload_round == self.open_round and self.aggregating is None:
            if evidence:
                bs = self.config.batch_size
                self.book.record(
                    node, epoch, epoch_samples, now, counted=upload_round, batch_size=bs
                )
            samples = int(self.weight_for(node, samples, upload_round))  # bogus counts
            self.round.arrived(node, samples, now)
            self.evidence.counted(node, change, samples, evidence=evidence)
            delivered = samples if evidence else 0
            since, previous = max(self.round_started, m.joined_at), max(m.counted_at, m.joined_at)
            self.roster.at_barrier(node, upload_round, samples, now, delivered=delivered)
            if (a := self.assignments.get(node)) is not None and evidence:
                elapsed = trained_for(train_s, now - since, now - previous)
                self.paces.measure(node, samples, a.work_per_round, elapsed)
            if train_s > 0 and samples > 0:
                self.paces.report(node, samples / train_s)
        return self.check(now)

    def reject(self, node: str, upload_round: int, reason: str, now: float) -> RoundDecision:
        """A bad upload for ``upload_round``: if that is the open round, the node is left out
        of it, and the round no longer waits for the node."""
        if upload_round == self.open_round and node not in self.arrivals:
            self.round.left_out[node] = reason
        return self.check(now)

    def initial(self, now: float) -> None:
        """The round-0 weights are durable: the session has global weights."""
        self.has_weights = True
        self.completed = 0
        self.round.restart_clock(now)

    def check(self, now: float) -> RoundDecision:
        """Can the open round complete now? (``roundstate.round_decision``.)"""
        return round_decision(now, self.round, *_round_inputs(self), self.config)

    def close(self, aggregating: int) -> tuple[tuple[str, int], ...]:
        """Aggregation of the open round ``aggregating`` starts: no more uploads count for it."""
        assert aggregating == self.open_round and self.aggregating is None
        self.aggregating = aggregating
        return tuple(self.arrivals.items())

    def advance(self, completed: int, now: float) -> RoundOutcome:
        """The checkpoint of round ``completed`` is durable: it is the completed round now, and
        the next one opens; maybe the next epoch is planned, or the session finishes."""
        assert completed == self.open_round
        self.completed = completed
        self.roster.barriers_done(list(self.arrivals), now)
        self.round.next_round(now)
        self.evidence.round_closed()
        epoch = self.plan.epoch if self.plan else 0
        ends, plan_next, reason = round_end(
            completed, self.plan, self.config.epochs, self.stop_round, self.stop_reason
        )
        # The votes weigh what their voters delivered: the round's arrivals may decide a stop.
        stop = None if ends else self.stops.review(_stop_facts(self), self.config)
        self.finished = self.finished or ends or (stop is not None and stop.finished_now)
        planned = self.maybe_plan(now) if plan_next else None
        if stop is not None:
            reason = f"{reason.removesuffix('; ')}; {stop.reason}"
        elif plan_next:
            reason += (
                "next epoch waits for a live node"
                if planned is None
                else f"planned epoch {planned}"
            )
        return RoundOutcome(completed, epoch, self.finished, planned, reason, stop)

    # ---- stopping early ------------------------------------------------------------------
    def request_stop(self, node: str, kind: StopKind, reason: str, now: float) -> StopVerdict:
        """A node asks to end the session (``stoppolicy.py``); the verdict says whether the
        session stops, on which round, or whether the node is to leave, and why."""
        m = self.members.get(node)
        if m is None or not m.live():
            return StopVerdict(False, "join first")
        m.last_seen = now
        v = self.stops.ask(node, kind, reason, _stop_facts(self), self.config)
        self.finished = self.finished or v.finished_now
        return v

    # ---- views ---------------------------------------------------------------------------
    def train_config(self) -> TrainConfig:
        return views.train_config(self)

    def status(self, now: float, checkpoint: str = "") -> SessionStatus:
        return views.status(self, now, checkpoint)

    # ---- persistence (state.json) -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The durable part of the session: written after each completed round."""
        out: dict[str, Any] = msgspec.to_builtins(SessionRecord.of(self))
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, now: float) -> Session:
        """Restore after a restart (:meth:`SessionRecord.restore`)."""
        old = d if "roster" in d else upgrade_v1(d, SessionRecord.__struct_fields__)
        return msgspec.convert(old, SessionRecord).restore(now)


def _late_assignment(s: Session, node: str) -> ShardAssignment | None:
    """A shard for a node arriving inside an epoch (late joiner or rejoin)."""
    sch = s.scheduler
    assert sch is not None
    pace, batching = (
        sch.pace(node, s.paces.measured()),
        sch.batching(node) if node in sch else (0, 0),
    )
    return s.book.late_assignment(node, s.open_round, pace, batching, s.config, s.replans.revision)


def _work_for(s: Session, node: str) -> bool | None:
    """Whether ``node`` has work in the epoch: True when it just got some (a node back after
    being lost re-sends the upload it was holding: it counts as a late joiner's first round,
    and the node gets a shard for the rest), None when none is left."""
    if node in s.assignments:
        return False
    return None if _late_assignment(s, node) is None else True


def _round_inputs(s: Session) -> tuple[RoundFacts, dict[str, DeadlinePace]]:
    """What a decision on the open round reads besides its state: the facts (who is expected
    and their work) and the paces its deadline assumes for the missing nodes."""

    def counts(node: str) -> bool:
        m = s.members.get(node)
        return m is not None and m.live() and node not in s.round.left_out

    expected = tuple(s.book.expected(s.open_round, counts))
    facts = RoundFacts(
        open_round=s.open_round,
        finished=s.finished,
        planned=s.book.in_plan(s.open_round),
        expected=expected,
        work={n: s.assignments[n].work_per_round for n in expected},
    )
    missing = [n for n in expected if n not in s.arrivals]
    return facts, s.paces.for_deadline(missing, s.scheduler)


def _stop_facts(s: Session) -> StopFacts:
    """What a stop decision reads: the voters, each live admitted node with the samples it
    has delivered (the session decides who may vote; the stop book counts), and where the
    session is."""
    return StopFacts(
        voters={n: s.members[n].delivered for n in s.live() if n in s.admitted},
        has_weights=s.has_weights,
        completed=s.completed,
        in_plan=s.book.in_plan(s.open_round),
        finished=s.finished,
    )


def _scheduler(c: SessionConfig, dataset_size: int) -> Scheduler:
    """The scheduler of a session of ``dataset_size`` samples."""
    return Scheduler(
        dataset_size=dataset_size,
        batch_size=c.batch_size,
        sync_every=c.sync_every,
        seed=c.seed,
        min_vram=c.min_vram,
        trust=PACE_FACTOR,
    )


__all__ = [
    "BANNED_MAX",
    "GONE",
    "LIVE",
    "Decision",
    "Member",
    "MemberState",
    "RoundDecision",
    "RoundOutcome",
    "Session",
    "SessionRecord",
    "ShardReply",
    "StopVerdict",
    "UploadVerdict",
    "Verdict",
    "decide_stop",
]
