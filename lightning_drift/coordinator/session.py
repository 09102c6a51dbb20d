"""The session: events in, decisions out, over small pure parts. No I/O, no clock of its own.

The server (``server.py``) turns frames into calls on :class:`Session` and turns the returned
decisions into frames; every time-dependent call takes ``now`` (float seconds). Tests drive it
with a fake clock. ``Session`` is a facade: each rule lives in one part, which says in its
docstring why its boundary is where it is:

- ``roster.py``: members, caps, names, heartbeats, strikes and bans;
- ``pacebook.py``: every speed estimate (measured, reported, smoothed) and its one average;
- ``epochbook.py``: epoch plans, assignments, late joiners, orphaned work, positions;
- ``replans.py``: re-plans of the rest of an epoch by measured paces;
- ``roundstate.py``: the open round and the pure ``round_decision`` (quorum and deadline);
- ``stoppolicy.py``: stop requests and the pure ``decide_stop``;
- ``views.py``: the training config and the status; ``verdicts.py``: the answer types.

What the facade itself keeps: the session's own facts (its id, the dataset and model it
trains, the completed round and epoch, whether it has weights or has finished), and the
order in which one event touches the parts. Trust: every message reaches the session through
``boundary.py`` (numbers finite and in range, strings clean); what a node says about itself
is then believed only within the bounds the pace book and the scheduler set. An upload's
aggregation weight is its reported ``samples`` bounded by its assignment
(:meth:`Session.weight_for`), so one node cannot dominate the weighted mean with a bogus count.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any, Generic, TypeVar

import msgspec

from lightning_drift.coordinator import views
from lightning_drift.coordinator.boundary import PACE_FACTOR
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.epochbook import EpochBook, assign
from lightning_drift.coordinator.pacebook import PaceBook
from lightning_drift.coordinator.replans import Replans
from lightning_drift.coordinator.roster import (
    BANNED_MAX,
    GONE,
    LIVE,
    Member,
    MemberState,
    Roster,
)
from lightning_drift.coordinator.roundstate import (
    RoundFacts,
    RoundState,
    deadline,
    round_decision,
    upload_by_round,
)
from lightning_drift.coordinator.stoppolicy import StopBook, decide_stop, stop_decision
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
from lightning_drift.scheduler import EpochPlan, Scheduler, train_device_info
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


class Session:
    """One training session's membership, rounds, epochs and their decisions (a facade).

    ``scheduler`` is None until the dataset size is known (``--dataset-size`` or the first
    admitted node's ``NodeInfo.dataset_size``).
    """

    members = _Via[dict[str, Member]]("roster")
    admitted = _Via[set[str]]("roster")
    banned = _Via[dict[str, str]]("roster")
    plan = _Via[EpochPlan | None]("book")
    assignments = _Via[dict[str, ShardAssignment]]("book")
    late = _Via[set[str]]("book")
    orphans = _Via[dict[str, Any]]("book")
    trained = _Via[dict[str, int]]("book")
    counted = _Via[dict[str, int]]("book")
    aggregating = _Via[int | None]("round")
    arrivals = _Via[dict[str, int]]("round")
    left_out = _Via[dict[str, str]]("round")
    round_started = _Via[float]("round", "started")
    reconnect_grace = _Via[float]("round", "grace")
    stop_requests = _Via[dict[str, str]]("stops", "requests")
    stop_round = _Via[int | None]("stops", "final_round")
    stop_reason = _Via[str]("stops", "reason")
    revision = _Via[int]("replans")
    rebalanced_round = _Via[int]("replans", "round")
    last_rebalance = _Via[str]("replans", "last")

    def __init__(self, config: SessionConfig, *, session_id: str, now: float) -> None:
        self.config = config
        self.session_id = session_id
        self.started_at = now
        self.dataset_size = config.dataset_size
        self.model_fingerprint = ""  # adopted from the first admitted node
        self.scheduler = self._make_scheduler(self.dataset_size) if self.dataset_size else None
        self.has_weights = False
        self.completed = 0
        self.epoch = 0
        self.finished = False
        self.roster = Roster()
        self.paces = PaceBook()
        self.book = EpochBook()
        self.replans = Replans()
        self.stops = StopBook()
        self.round = RoundState(started=now)

    # ---- derived state -------------------------------------------------------------------
    @property
    def open_round(self) -> int:
        return self.completed + 1

    @property
    def last_round(self) -> int | None:
        """The session's final round, once the last epoch is planned."""
        if self.plan is not None and self.plan.epoch == self.config.epochs - 1:
            return self.plan.last_round
        return None

    def live(self) -> list[str]:
        return self.roster.live()

    def expected(self) -> list[str]:
        """Nodes whose upload the open round waits for, in join order."""
        return self.book.expected(self.open_round, self._counts)

    def _counts(self, node: str) -> bool:
        m = self.members.get(node)
        return m is not None and m.live() and node not in self.left_out

    def _facts(self) -> RoundFacts:
        expected = tuple(self.expected())
        return RoundFacts(
            open_round=self.open_round,
            finished=self.finished,
            planned=self.book.in_plan(self.open_round),
            expected=expected,
            work={n: self.assignments[n].work_per_round for n in expected},
        )

    def _round_paces(self, facts: RoundFacts) -> dict[str, Any]:
        missing = [n for n in facts.expected if n not in self.arrivals]
        return self.paces.for_deadline(missing, self.scheduler)

    def deadline(self) -> float | None:
        """When stragglers of the open round may be left behind (None: the pace of some
        missing node is neither measured nor estimable, or nobody is missing)."""
        facts = self._facts()
        return deadline(self.round, facts, self._round_paces(facts), self.config)[0]

    def reference_rate(self) -> float | None:
        """The session's median measured pace (samples/s) over members measured so far."""
        return self.paces.reference()

    def measured_rate(self, node: str) -> float | None:
        """The pace re-plans go by for ``node`` (:meth:`PaceBook.for_replan`)."""
        return self.paces.for_replan(node)

    def weight_for(self, node: str, samples: int) -> float:
        """The aggregation weight of ``node``'s upload reporting ``samples``: bounded to
        ``[0, size]`` of its assignment (a node may carry over at most its whole shard into
        one upload); without an assignment (not counted then), by the dataset size."""
        a = self.assignments.get(node)
        cap = a.size if a is not None else self.dataset_size
        return float(max(0, min(int(samples), max(0, cap))))

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
        if self.dataset_size and info.dataset_size != self.dataset_size:
            return Decision(
                False,
                f"dataset has {info.dataset_size} samples but this session trains on "
                f"{self.dataset_size}; use the same dataset as the other nodes",
                "dataset_mismatch",
            )
        if self.model_fingerprint and info.model_fingerprint != self.model_fingerprint:
            return Decision(
                False,
                "the model's parameter names, shapes or dtypes differ from the session's "
                f"(fingerprint {info.model_fingerprint[:12]}…, session "
                f"{self.model_fingerprint[:12]}…); every node must build the same model",
                "model_mismatch",
            )
        self.model_fingerprint = self.model_fingerprint or info.model_fingerprint
        if self.scheduler is None:
            self.dataset_size = info.dataset_size
            self.scheduler = self._make_scheduler(self.dataset_size)
        if refusal := self.scheduler.admit(info):
            return Decision(False, refusal.reason, refusal.code)
        if node not in self.admitted:
            self.scheduler.add(node, info)
            self.admitted.add(node)
        dev = train_device_info(info)
        m.device = info.train_device if dev is None else f"{info.train_device} {dev.name}"
        m.vram_total = dev.vram_total if dev is not None else 0
        m.state = MemberState.READY
        return Decision(True, f"node {short_id(node)} ready on {m.device}")

    def seen(self, node: str, now: float) -> None:
        """Any message from ``node`` (heartbeat)."""
        self.roster.seen(node, now)

    def progress(self, node: str, msg: TrainProgress, now: float) -> None:
        m = self.members.get(node)
        if m is None or not m.live():
            return
        m.last_seen = now
        if m.state is MemberState.READY:
            m.state = MemberState.TRAINING
        m.loss, m.samples = msg.loss, msg.samples
        m.vram_used = max(0, msg.vram_used)
        m.vram_peak = max(m.vram_peak, msg.vram_peak, m.vram_used)
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
        return gone, self.check(now)

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
        if self.finished or self.scheduler is None or self.stop_round is not None:
            return None
        if self.plan is not None and self.completed < self.plan.last_round:
            return None
        epoch = 0 if self.plan is None else self.plan.epoch + 1
        if epoch >= self.config.epochs:
            return None
        ready = [n for n in self.live() if self.members[n].state is not MemberState.JOINED]
        if len(ready) < (self.config.min_nodes if epoch == 0 else 1):
            return None
        plan = self.scheduler.plan_epoch(epoch, ready, self.open_round, self.paces.measured())
        self.epoch = epoch
        self.book.begin(
            plan,
            {
                n: self._assign(plan, sh, plan.first_round, plan.rounds)
                for n, sh in plan.shards.items()
            },
        )
        if now > self.round_started:
            self.round.restart_clock(now)
        return epoch

    def _assign(self, plan: EpochPlan, sh: Any, first_round: int, rounds: int) -> ShardAssignment:
        final = plan.epoch == self.config.epochs - 1
        return assign(
            plan,
            sh,
            first_round,
            rounds,
            seed=self.config.seed,
            final=final,
            revision=self.revision,
        )

    def shard(self, node: str, epoch: int, now: float) -> ShardReply:
        """A ShardRequest: the node's assignment for ``epoch``, or wait, or a refusal."""
        m = self.members.get(node)
        if m is None or not m.live():
            return ShardReply(None, "not joined", "not_joined")
        m.last_seen = now
        if self.finished or epoch >= self.config.epochs:
            return ShardReply(None, f"no epoch {epoch}: the session has finished", "finished")
        self.maybe_plan(now)
        if self.plan is None or epoch > self.plan.epoch:
            return ShardReply(None, f"epoch {epoch} is not planned yet; waiting")
        a = self.assignments.get(node) or self._late_assignment(node)
        if a is None:
            return ShardReply(None, "no rounds left in this epoch; waiting for the next")
        if m.state is MemberState.READY:
            m.state = MemberState.TRAINING
        how = "late joiner " if node in self.late else ""
        return ShardReply(
            a,
            f"{how}{short_id(node)}: epoch {a.epoch} [{a.start}, {a.stop}) from round "
            f"{a.first_round} for {a.rounds} round(s)",
        )

    def _late_assignment(self, node: str) -> ShardAssignment | None:
        """A shard for a node arriving inside an epoch (late joiner or rejoin)."""
        sch, plan = self.scheduler, self.plan
        assert sch is not None and plan is not None
        return self.book.late_assignment(
            node,
            self.open_round,
            sch.score(node, self.paces.measured()),
            sch.batching(node) if node in sch else (0, 0),
            seed=self.config.seed,
            final=plan.epoch == self.config.epochs - 1,
            revision=self.revision,
        )

    def rebalance(self, now: float) -> list[tuple[str, ShardAssignment]]:
        """Re-plan the rest of the epoch if paces drifted from the shares (``replans.py``);
        the new assignments to send (empty: ``last_rebalance`` says why)."""
        if not self.config.rebalance or self.finished or self.aggregating is not None:
            return []
        return self.replans.replan(
            now,
            self.book,
            self.paces,
            lambda n: self.members[n].live(),
            completed=self.completed,
            batch_size=self.config.batch_size,
            # A node reports what it trained every progress_every_s (and at every upload).
            horizon_s=self.config.progress_every_s + 2.0,
        )

    # ---- barriers ------------------------------------------------------------------------
    def upload(
        self, node: str, upload_round: int, now: float, *, base_round: int = -1, delta: bool = False
    ) -> UploadVerdict:
        """A BarrierSync arrived, for ``upload_round`` (the round the node contributes to).

        ``base_round``: the round whose global weights the node holds (-1: none). A ``delta``
        upload (a change from those weights) must name it: without one it is refused
        (``bad_upload``), and a delta against other weights than the global ones it would be
        added to is left out of the open round (``LEFT_OUT``), which then no longer waits for
        the node. Whole weights do not depend on it.
        """
        r = upload_round
        m = self.members.get(node)
        if m is None or not m.live():
            return UploadVerdict(Verdict.REFUSE, "join first", "not_joined")
        m.last_seen = now
        said = upload_by_round(
            r,
            node,
            self.round,
            completed=self.completed,
            finished=self.finished,
            has_weights=self.has_weights,
        )
        if said is not None:
            return said
        if self.plan is None:
            return UploadVerdict(
                Verdict.REFUSE, "no epoch is planned yet; send ShardRequest first", "no_shard"
            )
        accepted = f"round {r} upload accepted"
        if node not in self.assignments:
            # A node back after being lost re-sends the upload it was holding: take it as a
            # late joiner's first round (counts if in time) and give it a shard for the rest.
            if self._late_assignment(node) is None:
                return UploadVerdict(Verdict.REFUSE, "no rounds left in this epoch", "no_shard")
            accepted += " from a returning node"
        if delta and base_round < 0:
            return UploadVerdict(
                Verdict.REFUSE,
                "a delta upload must name the round of the weights it was taken against "
                "(BarrierSync.base_round); upload whole weights when there are none",
                "bad_upload",
            )
        if delta and base_round != self.completed:
            # (local - global) is only meaningful against the weights it was taken from.
            reason = (
                f"delta against round {base_round}'s weights, but the global weights are round "
                f"{self.completed}'s: left out of round {r}"
            )
            self.left_out[node] = reason
            return UploadVerdict(Verdict.LEFT_OUT, reason)
        return UploadVerdict(Verdict.OPEN, accepted)

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
    ) -> RoundDecision:
        """The node's upload for ``upload_round`` (the open round) was accumulated. Returns
        the round decision.

        ``samples`` is recorded as :meth:`weight_for` bounds it (the weight it was accumulated
        with), also for the pace measured from ``train_s``. ``epoch_samples``: the positions
        of its epoch's work the node had trained when it took the upload (-1: not said).
        ``loss``: the node's loss at the upload (shown until its next progress report).
        """
        m = self.members[node]
        m.last_seen = now
        if loss is not None:
            m.loss = loss
        if upload_round == self.open_round and self.aggregating is None:
            if self.book.record(node, epoch, epoch_samples, now):
                self.counted[node] = min(epoch_samples, self.assignments[node].size)
            samples = int(self.weight_for(node, samples))  # a bogus count must not skew pace
            self.arrivals[node] = samples
            m.state, m.arrived_round, m.barrier_since = MemberState.BARRIER, upload_round, now
            m.samples = samples
            self._measure(m, samples, now)
            if train_s > 0 and samples > 0:
                self.paces.report(node, samples / train_s)
        return self.check(now)

    def reject(self, node: str, upload_round: int, reason: str, now: float) -> RoundDecision:
        """A bad upload for ``upload_round``: if that is the open round, the node is left out
        of it, and the round no longer waits for the node."""
        if upload_round == self.open_round and node not in self.arrivals:
            self.left_out[node] = reason
        return self.check(now)

    def initial(self, now: float) -> None:
        """The round-0 weights are durable: the session has global weights."""
        self.has_weights = True
        self.completed = 0
        self.round.restart_clock(now)

    def check(self, now: float) -> RoundDecision:
        """Can the open round complete now? (``roundstate.round_decision``.)"""
        facts = self._facts()
        return round_decision(now, self.round, facts, self._round_paces(facts), self.config)

    def close(self, closing: int) -> tuple[tuple[str, int], ...]:
        """Aggregation of the open round ``closing`` starts: no more uploads count for it."""
        assert closing == self.open_round and self.aggregating is None
        self.aggregating = closing
        return tuple(self.arrivals.items())

    def advance(self, closing: int, now: float) -> RoundOutcome:
        """The checkpoint of round ``closing`` is durable: it is the completed round now, and
        the next one opens; maybe the next epoch is planned, or the session finishes."""
        assert closing == self.open_round
        self.completed = closing
        for node in self.arrivals:
            m = self.members[node]
            if m.barrier_since is not None:
                m.barrier_wait = now - m.barrier_since
            m.barrier_since = None
            if m.state is MemberState.BARRIER:
                m.state = MemberState.TRAINING
        self.round.next_round(now)
        epoch = self.plan.epoch if self.plan else 0
        planned = None
        reason = f"round {closing} done"
        if self.stop_round is not None and closing >= self.stop_round:
            self.finished = True
            reason = f"round {closing} was the final round: {self.stop_reason}; finished"
        elif self.plan is not None and closing >= self.plan.last_round:
            if self.plan.epoch + 1 >= self.config.epochs:
                self.finished = True
                reason = f"round {closing} was the last of epoch {epoch}, the final epoch: finished"
            else:
                planned = self.maybe_plan(now)
                reason = f"round {closing} ended epoch {epoch}; " + (
                    f"planned epoch {planned}"
                    if planned is not None
                    else "next epoch waits for a live node"
                )
        return RoundOutcome(closing, epoch, self.finished, planned, reason)

    # ---- stopping early ------------------------------------------------------------------
    def request_stop(self, node: str, kind: StopKind, reason: str, now: float) -> StopVerdict:
        """A node asks to end the session (``stoppolicy.py``); the verdict says whether the
        session stops, on which round, and why."""
        m = self.members.get(node)
        if m is None or not m.live():
            return StopVerdict(False, "join first")
        m.last_seen = now
        if self.finished:
            return StopVerdict(
                True, f"the session has finished at round {self.completed}", self.completed
            )
        v = self.stops.ask(
            node,
            kind,
            reason,
            [n for n in self.live() if n in self.admitted],
            policy=self.config.stop_policy,
            quorum=self.config.stop_quorum,
            has_weights=self.has_weights,
            open_round=self.open_round,
            completed=self.completed,
            in_plan=self.book.in_plan(self.open_round),
        )
        self.finished = self.finished or v.finished_now
        return v

    # ---- views ---------------------------------------------------------------------------
    def train_config(self) -> TrainConfig:
        return views.train_config(
            self.config,
            session_id=self.session_id,
            dataset_size=self.dataset_size,
            completed=self.completed,
            epoch=self.epoch,
            has_weights=self.has_weights,
            stop_round=self.stop_round,
        )

    def status(self, now: float, checkpoint: str = "") -> SessionStatus:
        return SessionStatus(
            session_id=self.session_id,
            state=views.session_state(
                finished=self.finished,
                planned=self.plan is not None,
                aggregating=self.aggregating is not None,
            ),
            round=self.completed,
            epoch=self.epoch,
            epochs=self.config.epochs,
            aggregation=self.config.aggregation,
            nodes=views.nodes_status(
                self.members, now, self.assignments, self.paces, self.stop_requests
            ),
            checkpoint=checkpoint,
            started_at=self.started_at,
            stop_reason=self.stop_reason,
        )

    # ---- persistence (state.json) -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The durable part of the session: written after each completed round."""
        record = SessionRecord(
            config=asdict(self.config),
            session_id=self.session_id,
            started_at=self.started_at,
            dataset_size=self.dataset_size,
            model_fingerprint=self.model_fingerprint,
            has_weights=self.has_weights,
            completed=self.completed,
            epoch=self.epoch,
            finished=self.finished,
            roster=self.roster,
            paces=self.paces,
            epochs=self.book,
            replans=self.replans,
            stop=self.stops,
            scheduler=self.scheduler,
        )
        out: dict[str, Any] = msgspec.to_builtins(record)
        return out

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, now: float) -> Session:
        """Restore after a restart. Members that were live get ``heartbeat_timeout`` more
        (from ``now``) to reconnect before they are lost: they first have to notice the old
        coordinator is gone, then reconnect with backoff. The open round starts afresh, its
        clock after a reconnect grace of ``heartbeat_timeout``: the straggler deadline, floor
        included, counts from when nodes can have re-sent their uploads, so quorum does not
        close the round while honest uploads are still on their way back."""
        rec = msgspec.convert(d if "roster" in d else _from_v1(d), SessionRecord)
        config = SessionConfig.from_dict(rec.config)
        s = cls(config, session_id=rec.session_id, now=now)
        for name in ("started_at", "dataset_size", "model_fingerprint", "has_weights"):
            setattr(s, name, getattr(rec, name))
        s.completed, s.epoch, s.finished = rec.completed, rec.epoch, rec.finished
        s.roster, s.paces, s.book = rec.roster, rec.paces, rec.epochs
        s.replans, s.stops, s.scheduler = rec.replans, rec.stop, rec.scheduler
        s.book.trained_at.clear()  # times of another process's clock
        s.roster.restored(now, config.heartbeat_timeout)
        s.round.restart_clock(now, config.heartbeat_timeout)
        return s

    # ---- internals -----------------------------------------------------------------------
    def _make_scheduler(self, dataset_size: int) -> Scheduler:
        c = self.config
        return Scheduler(
            dataset_size=dataset_size,
            batch_size=c.batch_size,
            sync_every=c.sync_every,
            seed=c.seed,
            min_vram=c.min_vram,
            trust=PACE_FACTOR,
        )

    def _measure(self, m: Member, samples: int, now: float) -> None:
        """Measure ``m``'s pace from its upload arriving now: its samples, at most one round's
        work of its assignment, over the time since the round started (or since it joined,
        if later). Skipped while the round's clock has not started (a restart's grace)."""
        a = self.assignments.get(m.node)
        if a is not None:
            elapsed = now - max(self.round_started, m.joined_at)
            self.paces.measure(m.node, samples, a.work_per_round, elapsed)


def _from_v1(d: dict[str, Any]) -> dict[str, Any]:
    """A session saved before the parts kept themselves, in today's shape."""
    members = d.get("members", {})
    return {
        **{k: d[k] for k in SessionRecord.__struct_fields__ if k in d and k != "scheduler"},
        "scheduler": d.get("scheduler"),
        "roster": {
            "members": {n: {**m, "node": n} for n, m in members.items()},
            "admitted": d.get("admitted", []),
            "banned": d.get("banned", {}),
        },
        "paces": {
            "nodes": {
                n: {
                    "reported": m.get("rate", 0.0),
                    "smoothed": m.get("pace", 0.0),
                    "measured": m.get("vouched", 0.0),
                }
                for n, m in members.items()
            }
        },
        "epochs": {
            k: d[k]
            for k in ("plan", "assignments", "late", "orphans", "trained", "counted")
            if k in d
        },
        "replans": {"revision": d.get("revision", 0), "round": d.get("rebalanced_round", -1)},
        "stop": d.get("stop") or {},
    }


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
    "stop_decision",
]
