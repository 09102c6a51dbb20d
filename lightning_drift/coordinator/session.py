"""The session state machine: events in, decisions out. Pure: no I/O, no clock of its own.

The server (``server.py``) turns frames into calls on :class:`Session` and turns the returned
decisions into frames; every time-dependent call takes ``now`` (float seconds). Tests drive it
with a fake clock.

Node lifecycle::

    joined ──NodeInfo accepted──▶ ready ──shard/progress──▶ training ──upload──▶ barrier
       │                                                                          │
       └──────────── heartbeat timeout / connection gone ──▶ lost ◀───────────────┘
                     Bye ──▶ left          (a lost or left node may join again with its key)

Rounds. ``completed`` is the last completed round; the open round is ``completed + 1``.
Round 0 is the start-up sync: the first upload becomes the global weights. Every round of an
epoch has one barrier. The *expected* contributors of round r are the live nodes of the epoch
plan plus late joiners (and rejoiners) from their second round on; a late joiner's upload in its
first round counts only if it arrives before the round completes.

A round completes when every expected node has arrived, or when the straggler deadline has
passed and a quorum has arrived. The deadline adapts to measured pace::

    deadline = round start + max(floor, margin × max over missing nodes of (work / pace))

    pace = the node's pace as the coordinator measured it (its *vouched* rate: the samples
           of its last uploads, at most one round's work of its assignment, over the time from
           the round's start to the upload's arrival); before its first upload, the rate it
           reports (``TrainProgress``), else the scheduler's estimate ``Scheduler.score(node)``
           from its calibration (in samples/s once some node of the session is measured; see
           ``scheduler.py``); never below ``1 / PACE_FACTOR`` of the session's median vouched
           rate, nor, for a self-report, above ``PACE_FACTOR`` times it

So a node that heartbeats but never reports a rate, or reports a tiny one, cannot hold rounds
open forever. Only when some missing node has neither a pace nor an estimate and nothing at all
is measured is there no deadline: only the heartbeat timeout can drop a node then.

Trust. Every message reaches the session through ``boundary.py``: numbers finite and in range,
strings clean. What a node says about itself is still only believed within bounds: the rates it
reports within ``PACE_FACTOR`` of its vouched rate (the scheduler plans from vouched rates
only), its calibration within ``PACE_FACTOR`` of the session's median (``scheduler.py``).
Membership is capped (``max_nodes`` live nodes, ``max_nodes_per_token`` per token), members
that are gone are forgotten after ``forget_after_s``, and a node whose uploads fail
``max_strikes`` times is excluded for good (its key is refused from then on).

After a coordinator restart (:meth:`Session.from_dict`) the open round's clock starts a
reconnect grace of ``heartbeat_timeout`` after the restore: nodes first have to notice the
restart, reconnect and re-send their uploads, and the deadline must not leave them behind
meanwhile.

Stopping early. A node whose training wants to end (a callback set ``trainer.should_stop``,
``max_steps`` reached) asks with :meth:`Session.request_stop`; the session decides by its stop
policy (:func:`stop_decision`: ``first``, ``quorum`` of the live nodes, or ``never``; reaching
``max_steps`` is always honoured). Once it decides, the open round becomes the final round
(``stop_round``): every node holds one last barrier for it as soon as it can, no further epoch
is planned, and the session finishes when that round completes. Between epochs (the open
round belongs to no plan yet) it finishes at once, on the last completed round.

An upload's aggregation weight is its reported ``samples`` bounded by what its assignment
allows (:meth:`Session.weight_for`), so one node cannot dominate the weighted mean with a bogus
count. Every decision carries a readable ``reason``; tests assert on them.

Rebalancing. An epoch's shards are cut from the scores the scheduler has when it is planned
(calibration, for a node that has not trained yet). As measured rates come in (progress
reports, barrier uploads), :meth:`Session.rebalance` re-plans the unconsumed rest of the
epoch among the plan's live nodes (``lightning_drift.rebalance``), at most once per open
round; the server sends each changed node its new assignment (a higher ``revision``).
Positions a node reports having trained (``epoch_samples``), moved on by its measured speed for
the time since the report, tell where it is; work near that position never moves.
"""

from __future__ import annotations

import enum
import math
from dataclasses import asdict, dataclass
from typing import Any

import msgspec

from lightning_drift.coordinator.boundary import PACE_FACTOR, bound_rate, finite
from lightning_drift.coordinator.config import SessionConfig, StopPolicy
from lightning_drift.protocol import (
    NodeInfo,
    NodeStatus,
    SessionStatus,
    ShardAssignment,
    StopKind,
    TrainConfig,
    TrainProgress,
)
from lightning_drift.rebalance import NodeWork, rebalance
from lightning_drift.robust import lower_median
from lightning_drift.scheduler import (
    EpochPlan,
    Scheduler,
    Shard,
    consumed_after,
    plan_late,
    split,
    total,
    train_device_info,
)


class MemberState(enum.Enum):
    """Where a node is in its lifecycle (see the module docstring's diagram)."""

    JOINED = "joined"  # Join accepted, NodeInfo not yet
    READY = "ready"  # admitted: NodeInfo accepted
    TRAINING = "training"  # has a shard (or reported progress)
    BARRIER = "barrier"  # its upload for the open round is counted
    LOST = "lost"  # heartbeat timeout or connection gone
    LEFT = "left"  # said Bye, or was refused at the handshake
    EXCLUDED = "excluded"  # its uploads failed too often: its key is refused from now on


LIVE = frozenset({MemberState.JOINED, MemberState.READY, MemberState.TRAINING, MemberState.BARRIER})
GONE = frozenset({MemberState.LOST, MemberState.LEFT, MemberState.EXCLUDED})
BANNED_MAX = 4096  # excluded keys remembered (the oldest are forgotten first)
# The weight of a node's latest speed measurement in the pace re-plans go by (the rest is its
# earlier ones): measured windows of a few seconds vary by ±10 % on a shared machine, and
# following each one moved work back and forth every round (docs/benchmarks.md, wan.py).
PACE_SMOOTHING = 0.5
ELAPSED_MIN = 0.1  # seconds: the shortest round time a vouched rate is measured over


@dataclass(frozen=True)
class Decision:
    """The answer to one event: ``ok`` or not, a machine code when refused, and why."""

    ok: bool
    reason: str
    code: str = ""


class Verdict(enum.Enum):
    """What becomes of one barrier upload: every outcome the server answers differently."""

    INITIAL = "initial"  # the first start-up weights: adopted as round 0, answered at once
    CURRENT = "current"  # not counted: answered at once with the current global weights
    OPEN = "open"  # counts toward the open round: answered when that round completes
    AGAIN = "again"  # already counted: answered when the round completes
    CLOSING = "closing"  # too late, or the node is excluded: answered when the round completes
    EXCLUDED = "excluded"  # left out of the open round now (see the reason): likewise
    REFUSE = "refuse"  # answered with Error(code)

    @property
    def at_once(self) -> bool:
        """Answered with the current global weights now, not with the round's result."""
        return self in (Verdict.INITIAL, Verdict.CURRENT)

    @property
    def contributed(self) -> bool:
        """The upload is part of the global weights the node gets back."""
        return self in (Verdict.INITIAL, Verdict.OPEN, Verdict.AGAIN)


@dataclass(frozen=True)
class UploadVerdict:
    """The session's verdict on a barrier upload, why, and the Error code of a refusal."""

    kind: Verdict
    reason: str
    code: str = ""


@dataclass(frozen=True)
class RoundDecision:
    """Whether ``open_round`` can complete now, and why."""

    open_round: int
    complete: bool
    reason: str
    contributors: tuple[tuple[str, int], ...] = ()  # (node, samples) in arrival order
    missing: tuple[str, ...] = ()


@dataclass(frozen=True)
class ShardReply:
    """``assignment`` or, when None, ``wait`` (answer later) or a refusal (``code``)."""

    assignment: ShardAssignment | None
    reason: str
    code: str = ""

    @property
    def wait(self) -> bool:
        return self.assignment is None and not self.code


@dataclass(frozen=True)
class RoundOutcome:
    """What followed the completion of ``completed_round``."""

    completed_round: int
    epoch: int  # the epoch the round belonged to
    finished: bool
    planned_epoch: int | None  # a new epoch plan was made
    reason: str


@dataclass(frozen=True)
class StopVerdict:
    """The session's answer to a stop request.

    ``stop``: the session finishes on completed round ``final_round`` (``finished_now``: it
    already has, on the last completed round, and a ``Finish`` is due). Otherwise the session
    trains on, and ``reason`` says why (the policy and the count)."""

    stop: bool
    reason: str
    final_round: int = -1
    finished_now: bool = False
    newly: bool = False  # this request made the decision (tell every node)


def stop_decision(
    policy: StopPolicy, quorum: float, asked: int, voters: int, kind: StopKind = "callback"
) -> tuple[bool, str]:
    """Whether ``asked`` of ``voters`` live nodes asking to stop end the session, and why.

    ``max_steps`` (a node that can train no further) always ends it, so that every node ends
    on the same weights. Otherwise: ``first`` stops on the first request, ``quorum`` once at
    least ``ceil(quorum × voters)`` (at least 1) have asked, ``never`` trains every epoch.
    Pure: the count is the caller's."""
    counted = f"{asked} of {voters} node(s) asked"
    if kind == "max_steps":
        return True, f"a node reached its max_steps ({counted}); it can train no further"
    if policy == "never":
        return False, f"{counted}, stop policy never: the session trains all its epochs"
    if policy == "first":
        return True, f"{counted}, stop policy first"
    need = max(1, math.ceil(quorum * voters))
    if asked >= need:
        return True, f"{counted}, stop policy quorum {quorum:g} needs {need}"
    return False, f"{counted}, stop policy quorum {quorum:g} needs {need}"


@dataclass
class Member:
    node: str
    name: str = ""
    state: MemberState = MemberState.JOINED
    joined_at: float = 0.0
    last_seen: float = 0.0
    device: str = ""
    vram_total: int = 0
    rate: float = 0.0  # samples/s it reports, bounded by ``vouched`` (shown in the status)
    pace: float = 0.0  # ``rate`` smoothed over its measurements (what re-plans go by)
    vouched: float = 0.0  # samples/s the coordinator measured from its uploads' arrivals
    token: str = ""  # the jti of the token it joined with
    strikes: int = 0  # failed uploads
    gone_at: float = 0.0  # when it became lost, left or excluded
    arrived_round: int = 0  # the last round this node's upload counted in
    barrier_since: float | None = None
    barrier_wait: float = 0.0  # how long it waited at its last completed barrier
    loss: float | None = None
    samples: int = 0
    vram_used: int = 0  # bytes on its training device, last report
    vram_peak: int = 0  # the most it reported
    reason: str = ""  # why it is lost/left

    def live(self) -> bool:
        return self.state in LIVE

    def smooth_pace(self) -> None:
        """Fold the latest ``rate`` into ``pace`` (an exponential moving average): a single
        window's noise (a busy core, a slow batch) does not move work back and forth."""
        self.pace = (
            self.rate
            if self.pace <= 0
            else PACE_SMOOTHING * self.rate + (1 - PACE_SMOOTHING) * self.pace
        )


class Session:
    """One training session's membership, rounds, epochs and their decisions.

    ``scheduler`` is None until the dataset size is known (``--dataset-size`` or the first
    admitted node's ``NodeInfo.dataset_size``).
    """

    def __init__(self, config: SessionConfig, *, session_id: str, now: float) -> None:
        self.config = config
        self.session_id = session_id
        self.started_at = now
        self.scheduler: Scheduler | None = None
        self.dataset_size = config.dataset_size
        self.model_fingerprint = ""  # adopted from the first admitted node
        if self.dataset_size:
            self.scheduler = self._make_scheduler(self.dataset_size)
        self.members: dict[str, Member] = {}
        self.has_weights = False
        self.completed = 0
        self.epoch = 0
        self.plan: EpochPlan | None = None
        self.assignments: dict[str, ShardAssignment] = {}
        self.late: set[str] = set()  # nodes assigned after the plan was made (this epoch)
        self.orphans: dict[str, Shard] = {}  # lost node -> unconsumed rest of its shard
        self.finished = False
        self.closing: int | None = None  # round being aggregated
        self.arrivals: dict[str, int] = {}  # node -> samples, open round, in arrival order
        self.excluded: dict[str, str] = {}  # node -> reason, open round
        self.round_started = now
        self.reconnect_grace = 0.0  # seconds of round_started that are restart grace
        self.last_decision = ""
        self.admitted: set[str] = set()  # nodes the scheduler knows
        self.stop_requests: dict[str, str] = {}  # live node -> why it asked to stop
        self.stop_round: int | None = None  # the final round, once a stop is decided
        self.stop_reason = ""
        self.banned: dict[str, str] = {}  # excluded node -> why (its Joins are refused)
        # Positions of its epoch's work each node reported having trained (any report), and
        # as of its last upload that counted; both reset when an epoch is planned.
        self.trained: dict[str, int] = {}
        self.trained_at: dict[str, float] = {}  # when (not persisted: clocks differ)
        self.counted: dict[str, int] = {}
        self.revision = 0  # of the last re-plan; grows over the session
        self.rebalanced_round = -1  # the open round of the last re-plan (one per round)
        self.last_rebalance = ""

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
        return [n for n, m in self.members.items() if m.live()]

    def expected(self) -> list[str]:
        """Nodes whose upload the open round waits for, in join order."""
        r = self.open_round
        if self.plan is None or not (self.plan.first_round <= r <= self.plan.last_round):
            return []
        out = []
        for node, a in self.assignments.items():
            m = self.members.get(node)
            if m is None or not m.live() or node in self.excluded:
                continue
            if node in self.late and a.first_round >= r:
                continue  # a late joiner's first round: counts only if it comes in time
            if a.first_round + a.rounds - 1 < r:
                continue
            out.append(node)
        return out

    def deadline(self) -> float | None:
        """When stragglers of the open round may be left behind (None: the pace of some
        missing node is neither measured nor estimable, or nobody is missing)."""
        return self._deadline()[0]

    def _deadline(self) -> tuple[float | None, list[str], list[str]]:
        """(deadline, missing nodes whose pace is estimated, missing nodes of unknown pace).

        A missing node's pace is its last measured rate; without one, the scheduler's estimate
        from its calibration (``Scheduler.score``), once some node is measured (so that the
        estimate is in samples/s) and if it is > 0."""
        missing = [n for n in self.expected() if n not in self.arrivals]
        if not missing:
            return None, [], []
        longest = 0.0
        estimated: list[str] = []
        unknown: list[str] = []
        sch = self.scheduler
        factor: float | None = None
        factor_known = False  # computed at most once per call, and only when needed
        ref = self.reference_rate()
        floor = ref / PACE_FACTOR if ref is not None else 0.0
        for node in missing:
            m = self.members.get(node)
            if m is not None and m.vouched > 0:
                rate = max(m.vouched, floor)
            elif m is not None and m.rate > 0:
                rate = max(bound_rate(m.rate, ref), floor)
            else:
                if not factor_known and sch is not None:
                    factor, factor_known = sch.measured_factor(), True
                est = (
                    sch.score(node, factor=factor)
                    if sch is not None and factor is not None and node in sch
                    else 0.0
                )
                if not (math.isfinite(est) and est > 0):
                    if floor <= 0:
                        unknown.append(node)
                        continue
                    est = floor
                rate = max(est, floor)
                estimated.append(node)
            longest = max(longest, self.assignments[node].work_per_round / rate)
        if unknown:
            return None, estimated, unknown
        c = self.config
        dl = self.round_started + max(c.deadline_floor, c.deadline_margin * longest)
        return dl, estimated, unknown

    def reference_rate(self) -> float | None:
        """The session's median vouched rate (samples/s) over members measured so far."""
        return lower_median(m.vouched for m in self.members.values() if m.vouched > 0)

    def weight_for(self, node: str, samples: int) -> float:
        """The aggregation weight of ``node``'s upload reporting ``samples``.

        ``samples`` bounded to ``[0, shard size]`` of the node's assignment (its positions:
        a node may carry over at most its whole shard into one upload), so one buggy or
        hostile count cannot dominate the weighted mean. Without an assignment (its upload is
        not counted then) the bound is the dataset size.
        """
        a = self.assignments.get(node)
        cap = a.size if a is not None else self.dataset_size
        return float(max(0, min(int(samples), max(0, cap))))

    # ---- membership events ---------------------------------------------------------------
    def join(self, node: str, name: str, now: float, token: str = "") -> Decision:
        """A Join with a valid token (jti ``token``) whose QUIC peer key is ``node``.

        Refused: an excluded node (``excluded``), and a node over the caps on live members
        (``max_nodes``, ``max_nodes_per_token``: ``too_many_nodes``). ``name`` is made unique
        among the members (``name#2``, ...)."""
        m = self.members.get(node)
        if node in self.banned:
            return Decision(
                False,
                f"node {_short(node)} is excluded from this session: {self.banned[node]}",
                "excluded",
            )
        others = [x for n, x in self.members.items() if n != node and x.live()]
        c = self.config
        if not self.finished and len(others) >= c.max_nodes:
            return Decision(
                False,
                f"the session has its maximum of {c.max_nodes} live nodes (--max-nodes); try "
                "again when one leaves",
                "too_many_nodes",
            )
        if (
            not self.finished
            and token
            and c.max_nodes_per_token <= sum(1 for x in others if x.token == token)
        ):
            return Decision(
                False,
                f"token {token} already has {c.max_nodes_per_token} live nodes "
                "(--max-nodes-per-token); ask the coordinator for a token of your own",
                "too_many_nodes",
            )
        name = self._unique_name(node, name)
        if self.finished:
            # Nothing left to train, but a node that comes back late (resumed from its own
            # checkpoint, or cut off at the very end) may still fetch the final weights with a
            # start-up sync; its shard request is then answered with Finish.
            if m is None:
                self.members[node] = Member(
                    node=node, name=name, joined_at=now, last_seen=now, token=token
                )
                m = self.members[node]
            m.state, m.last_seen, m.gone_at = MemberState.LEFT, now, now
            return Decision(True, "the session has finished: the node may fetch the final weights")
        if m is None:
            self.members[node] = Member(
                node=node, name=name, joined_at=now, last_seen=now, token=token
            )
            return Decision(True, f"node {_short(node)} joined")
        was = m.state
        m.name = name or m.name
        m.last_seen = now
        m.joined_at = now
        m.state = MemberState.JOINED
        m.reason = ""
        m.token = token or m.token
        if was in GONE:
            return Decision(True, f"node {_short(node)} rejoined (was {was.value})")
        return Decision(True, f"node {_short(node)} reconnected (was {was.value})")

    def admit(self, node: str, info: NodeInfo, now: float) -> Decision:
        """NodeInfo arrived: check it against the session; the node becomes ready."""
        m = self.members.get(node)
        if m is None:
            return Decision(False, "NodeInfo before Join", "protocol")
        m.last_seen = now
        if info.name:  # a node the coordinator dialled sends its name here, not in a Join
            m.name = self._unique_name(node, info.name)
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
        if not self.model_fingerprint:
            self.model_fingerprint = info.model_fingerprint
        if self.scheduler is None:
            self.dataset_size = info.dataset_size
            self.scheduler = self._make_scheduler(self.dataset_size)
        refusal = self.scheduler.admit(info)
        if refusal:
            code = "dataset_mismatch" if "dataset" in refusal else "refused"
            return Decision(False, refusal, code)
        if node not in self.admitted:
            self.scheduler.add(node, info)
            self.admitted.add(node)
        dev = train_device_info(info)
        m.device = info.train_device if dev is None else f"{info.train_device} {dev.name}"
        m.vram_total = dev.vram_total if dev is not None else 0
        m.state = MemberState.READY
        return Decision(True, f"node {_short(node)} ready on {m.device}")

    def seen(self, node: str, now: float) -> None:
        """Any message from ``node`` (heartbeat)."""
        m = self.members.get(node)
        if m is not None and m.live():
            m.last_seen = now

    def progress(self, node: str, msg: TrainProgress, now: float) -> None:
        m = self.members.get(node)
        if m is None or not m.live():
            return
        m.last_seen = now
        if m.state is MemberState.READY:
            m.state = MemberState.TRAINING
        m.loss = msg.loss
        m.samples = msg.samples
        m.vram_used = max(0, msg.vram_used)
        m.vram_peak = max(m.vram_peak, msg.vram_peak, m.vram_used)
        self._trained(node, msg.epoch, msg.epoch_samples, now)
        if msg.samples_per_s > 0:
            m.rate = bound_rate(msg.samples_per_s, m.vouched or self.reference_rate())
            m.smooth_pace()

    def lost(self, node: str, reason: str, now: float, *, left: bool = False) -> Decision:
        """The node's connection is gone (or it said Bye): exclude it from the rounds."""
        m = self.members.get(node)
        if m is None or not m.live():
            return Decision(False, f"node {_short(node)} was not live")
        m.state = MemberState.LEFT if left else MemberState.LOST
        m.reason = reason
        m.gone_at = now
        m.barrier_since = None
        self.stop_requests.pop(node, None)
        a = self.assignments.get(node)
        if a is not None and self.plan is not None and a.epoch == self.plan.epoch:
            done = max(0, self.open_round - a.first_round)
            if node in self.arrivals:
                done += 1
            # What its counted uploads hold: the positions it said it had trained when it took
            # its last one, or (a node that does not say) what its barrier points imply.
            used = self.counted.get(node)
            if used is None or node in self.late:
                used = self._consumed(a, done)
            _, rest = split(a.ranges, used)
            if done < a.rounds and total(rest) > 0:
                self.orphans[node] = Shard.of(
                    node,
                    rest,
                    a.share,
                    batch_size=a.batch_size,
                    samples_per_step=a.samples_per_step,
                )
            self.trained.pop(node, None)
            self.trained_at.pop(node, None)
            self.counted.pop(node, None)
            # It gets a fresh assignment (its own rest if still free) when it comes back.
            del self.assignments[node]
            self.late.discard(node)
        return Decision(True, f"node {_short(node)} {m.state.value}: {reason}")

    def tick(self, now: float) -> tuple[list[tuple[str, str]], RoundDecision]:
        """Periodic check: heartbeat losses, then whether the open round can complete."""
        gone = []
        for node, m in self.members.items():
            if m.live() and now - m.last_seen > self.config.heartbeat_timeout:
                reason = (
                    f"no message for {now - m.last_seen:.1f}s "
                    f"(heartbeat timeout {self.config.heartbeat_timeout:g}s)"
                )
                gone.append((node, reason))
        for node, reason in gone:
            self.lost(node, reason, now)
        self.forget(now)
        return gone, self.check(now)

    def forget(self, now: float) -> list[str]:
        """Drop members gone for longer than ``forget_after_s`` (and the oldest gone ones
        beyond ``max_nodes`` of them) from the members, the status and the scheduler; returns
        them. A forgotten node that comes back joins as a new one (an excluded one stays
        refused)."""
        gone = sorted((m.gone_at, n) for n, m in self.members.items() if m.state in GONE)
        drop = [n for t, n in gone if now - t > self.config.forget_after_s]
        keep = [n for _, n in gone if n not in drop]
        drop += keep[: max(0, len(keep) - self.config.max_nodes)]
        for n in drop:
            del self.members[n]
            self.admitted.discard(n)
            if self.scheduler is not None:
                self.scheduler.forget(n)
        return drop

    def strike(self, node: str, reason: str, now: float) -> Decision:
        """One of ``node``'s uploads failed (refused as bad, or named as the cause of a round
        whose aggregate failed). ``ok`` when this excluded the node from the session: it
        leaves the open round and its key is refused from now on."""
        m = self.members.get(node)
        if m is None:
            return Decision(False, f"node {_short(node)} is not a member")
        m.strikes += 1
        limit = self.config.max_strikes
        if m.strikes < limit or m.state is MemberState.EXCLUDED:
            return Decision(False, f"node {_short(node)}: failed upload {m.strikes}/{limit}")
        why = f"{m.strikes} failed uploads, the last: {reason}"
        if m.live():
            self.lost(node, why, now, left=True)
        m.state, m.reason, m.gone_at = MemberState.EXCLUDED, why, now
        self.banned[node] = why
        while len(self.banned) > BANNED_MAX:
            del self.banned[next(iter(self.banned))]
        return Decision(True, f"node {_short(node)} excluded: {why}", "excluded")

    def _unique_name(self, node: str, name: str) -> str:
        """``name``, or ``name#k`` with the smallest k ≥ 2 no other member uses."""
        if not name:
            return name
        taken = {m.name for n, m in self.members.items() if n != node}
        if name not in taken:
            return name
        k = 2
        while f"{name}#{k}" in taken:
            k += 1
        return f"{name}#{k}"

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
        need = self.config.min_nodes if epoch == 0 else 1
        if len(ready) < need:
            return None
        self.plan = self.scheduler.plan_epoch(epoch, ready, self.open_round)
        self.epoch = epoch
        self.late.clear()
        self.orphans.clear()
        self.trained.clear()
        self.trained_at.clear()
        self.counted.clear()
        self.assignments = {
            n: self._assignment(n, sh, self.plan.first_round, self.plan.rounds)
            for n, sh in self.plan.shards.items()
        }
        if now > self.round_started:
            self.round_started = now
            self.reconnect_grace = 0.0
        return epoch

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
        a = self.assignments.get(node)
        if a is None:
            a = self._late_assignment(node)
            if a is None:
                return ShardReply(None, "no rounds left in this epoch; waiting for the next")
        if m.state is MemberState.READY:
            m.state = MemberState.TRAINING
        how = "late joiner " if node in self.late else ""
        return ShardReply(
            a,
            f"{how}{_short(node)}: epoch {a.epoch} [{a.start}, {a.stop}) from round "
            f"{a.first_round} for {a.rounds} round(s)",
        )

    def _assignment(self, node: str, sh: Shard, first_round: int, rounds: int):
        assert self.plan is not None
        return ShardAssignment(
            epoch=self.plan.epoch,
            start=sh.start,
            stop=sh.stop,
            rounds=rounds,
            first_round=first_round,
            seed=self.config.seed,
            share=sh.share,
            steps_per_round=sh.steps_per_round,
            final=self.plan.epoch == self.config.epochs - 1,
            batch_size=sh.batch_size,
            samples_per_step=sh.samples_per_step,
            segments=list(sh.segments),
            revision=self.revision,
        )

    def _late_assignment(self, node: str) -> ShardAssignment | None:
        """A shard for a node arriving inside an epoch (late joiner or rejoin).

        It takes the unconsumed rest of an orphaned shard (a lost node's; its own first) when
        there is one, else a slice proportional to its score for the rounds remaining
        (``scheduler.plan_late``). Exact coverage of the epoch holds only for the nodes of the
        plan and orphans handed on.
        """
        assert self.plan is not None and self.scheduler is not None
        r = self.open_round
        rounds = self.plan.last_round - r + 1
        if rounds <= 0:
            return None
        orphan = None
        if node in self.orphans:
            orphan = self.orphans.pop(node)
        elif self.orphans:
            orphan = self.orphans.pop(next(iter(self.orphans)))
        batch, per_step = self.scheduler.batching(node) if node in self.scheduler else (0, 0)
        sh = plan_late(
            self.plan,
            node,
            self.scheduler.score(node),
            r - self.plan.first_round,
            orphan,
            orphan_done=0,
            batch_size=batch,
            samples_per_step=per_step,
        )
        a = self._assignment(node, sh, r, rounds)
        self.assignments[node] = a
        self.late.add(node)
        return a

    # ---- rebalancing ---------------------------------------------------------------------
    def measured_rate(self, node: str) -> float | None:
        """The node's measured training speed in samples/s, or None before it has one.

        The one place re-plans read a node's speed: its recent measurements (progress
        report windows and rounds, smoothed: ``Member.pace``), so that a node whose
        machine got busier or freer is re-planned within a round or two; the scheduler's
        moving average, which plans whole epochs, when the member has none."""
        m = self.members.get(node)
        if m is not None and m.pace > 0:
            return m.pace
        if m is not None and m.rate > 0:
            return m.rate
        sch = self.scheduler
        if sch is None or node not in sch:
            return None
        return sch.measured(node)

    def rebalance(self, now: float) -> list[tuple[str, ShardAssignment]]:
        """Re-plan the rest of the epoch if measured speeds have drifted from the shares.

        Returns the new assignments to send, one per node whose work changed (empty when
        nothing moves: ``last_rebalance`` says why). At most one re-plan per open round; the
        plan's live nodes take part (late joiners and returning nodes keep their work).
        """
        plan = self.plan
        if not self.config.rebalance or self.finished or plan is None or self.closing is not None:
            return []
        if self.rebalanced_round >= self.open_round or self.open_round > plan.last_round:
            return []
        nodes = sorted(
            n
            for n, a in self.assignments.items()
            if a.epoch == plan.epoch and n not in self.late and self.members[n].live()
        )
        work = []
        for n in nodes:
            a = self.assignments[n]
            reach, more = self._reach(n)
            said = self.trained.get(n, 0)
            # Moved on by its speed, but not past where the rounds hold it, nor behind what it
            # said; a node that said more than the rounds allow is judged by the margin alone.
            at = min(a.size, max(said, min(self._position(n, now), reach)))
            can_receive = True if more and said < reach else None
            work.append(NodeWork(n, tuple(a.ranges), at, self.measured_rate(n), can_receive))
        decision = rebalance(
            work,
            plan.last_round - self.completed,
            batch_size=self._move_unit(nodes),
            # A node reports what it trained every progress_every_s (and at every upload).
            horizon_s=self.config.progress_every_s + 2.0,
        )
        self.last_rebalance = f"epoch {plan.epoch} round {self.open_round}: {decision.reason}"
        if not decision:
            return []
        self.revision += 1
        self.rebalanced_round = self.open_round
        rates = {w.node: w.rate or 0.0 for w in work}
        all_rates = sum(rates.values()) or 1.0
        out = []
        for node, segments in decision.segments.items():
            first = segments[0] if segments else (0, 0)
            a = msgspec.structs.replace(
                self.assignments[node],
                start=first[0],
                stop=first[1],
                segments=[(lo, hi) for lo, hi in segments] if len(segments) > 1 else [],
                share=rates[node] / all_rates,
                revision=self.revision,
            )
            self.assignments[node] = a
            out.append((node, a))
        return out

    def _move_unit(self, nodes: list[str]) -> int:
        """Samples a re-plan moves at a time: a whole optimizer step of every node taking part
        (the least common multiple of their samples per step), so shards cut in whole steps
        stay whole; the largest step when that multiple would be absurdly large."""
        units = [
            self.assignments[n].samples_per_step
            or self.assignments[n].batch_size
            or self.config.batch_size
            for n in nodes
        ]
        units = [max(1, u) for u in units] or [max(1, self.config.batch_size)]
        lcm = math.lcm(*units)
        return lcm if lcm <= 64 * max(units) else max(units)

    def _trained(self, node: str, epoch: int | None, epoch_samples: int, now: float) -> bool:
        """Record that ``node`` has trained ``epoch_samples`` positions of its work of
        ``epoch`` (ignored for another epoch than the plan's, or when not said)."""
        a = self.assignments.get(node)
        if epoch_samples < 0 or a is None or (epoch is not None and epoch != a.epoch):
            return False
        value = min(int(epoch_samples), a.size)
        if value > self.trained.get(node, -1):
            self.trained[node] = value
            self.trained_at[node] = now
        return True

    def _reach(self, node: str) -> tuple[int, bool]:
        """How far into its work ``node`` can be at most, and whether it has a barrier left
        beyond that point. Rounds are global: a node trains at most up to the barrier after
        the one in flight (the open round's), then waits for the open round; a node held
        there is not at the end of its epoch and can take more work at its tail."""
        a = self.assignments[node]
        ahead = self.open_round - a.first_round + 2
        return self._consumed(a, ahead), ahead < a.rounds

    def _consumed(self, a: ShardAssignment, barriers: int) -> int:
        """Positions of assignment ``a`` its node has trained by its ``barriers``-th barrier of
        the epoch, by its barrier points (in the node's own optimizer steps)."""
        return consumed_after(
            a.size,
            a.batch_size or self.config.batch_size,
            a.rounds,
            barriers,
            samples_per_step=a.samples_per_step,
        )

    def _position(self, node: str, now: float) -> int:
        """Where ``node`` is in its work now: what it last reported having trained, moved on
        by its measured speed for the time since (a report can be seconds old, and a stale
        position would make a node look slower than it is)."""
        trained = self.trained.get(node, 0)
        rate = self.measured_rate(node) or 0.0
        since = max(0.0, now - self.trained_at.get(node, now))
        return int(trained + rate * since)

    # ---- barriers ------------------------------------------------------------------------
    def upload(
        self,
        node: str,
        upload_round: int,
        now: float,
        *,
        base_round: int = -1,
        delta: bool = False,
    ) -> UploadVerdict:
        """A BarrierSync arrived, for ``upload_round`` (the round the node contributes to).

        ``base_round``: the round whose global weights the node holds (-1: none). A ``delta``
        upload (a change from those weights) must name it: without one it is refused
        (``bad_upload``), and a delta against other weights than the global ones it would be
        added to is left out of the open round (``EXCLUDED``), which then no longer waits for
        the node. Whole weights do not depend on it.
        """
        r = upload_round
        m = self.members.get(node)
        if m is None or not m.live():
            return UploadVerdict(Verdict.REFUSE, "join first", "not_joined")
        m.last_seen = now
        if r == 0:
            if not self.has_weights:
                return UploadVerdict(Verdict.INITIAL, "first start-up sync: adopted as round 0")
            return UploadVerdict(Verdict.CURRENT, "start-up sync: here are the global weights")
        if r < 0:
            return UploadVerdict(Verdict.REFUSE, f"round {r} is negative", "bad_round")
        if r <= self.completed:
            return UploadVerdict(
                Verdict.CURRENT,
                f"round {r} already completed; discarded (latest {self.completed})",
            )
        if self.finished:
            return UploadVerdict(Verdict.CURRENT, "the session has finished")
        if r > self.open_round:
            return UploadVerdict(
                Verdict.REFUSE,
                f"round {r} is not open; the open round is {self.open_round}",
                "bad_round",
            )
        if self.closing == r:
            return UploadVerdict(Verdict.CLOSING, f"round {r} is being aggregated; not counted")
        if node in self.excluded:
            return UploadVerdict(Verdict.CLOSING, f"excluded from round {r}: {self.excluded[node]}")
        if node in self.arrivals:
            return UploadVerdict(Verdict.AGAIN, f"upload for round {r} already counted")
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
            self.excluded[node] = reason
            return UploadVerdict(Verdict.EXCLUDED, reason)
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
        if upload_round == self.open_round and self.closing is None:
            if self._trained(node, epoch, epoch_samples, now):
                self.counted[node] = min(epoch_samples, self.assignments[node].size)
            samples = int(self.weight_for(node, samples))  # a bogus count must not skew pace
            self.arrivals[node] = samples
            m.state = MemberState.BARRIER
            m.arrived_round = upload_round
            m.barrier_since = now
            m.samples = samples
            self._vouch(m, samples, now)
            if train_s > 0 and samples > 0:
                m.rate = bound_rate(samples / train_s, m.vouched or self.reference_rate())
                m.smooth_pace()
        return self.check(now)

    def reject(self, node: str, upload_round: int, reason: str, now: float) -> RoundDecision:
        """A bad upload for ``upload_round``: if that is the open round, the node is excluded
        from it, and the round no longer waits for the node."""
        if upload_round == self.open_round and node not in self.arrivals:
            self.excluded[node] = reason
        return self.check(now)

    def initial(self, now: float) -> None:
        """The round-0 weights are durable: the session has global weights."""
        self.has_weights = True
        self.completed = 0
        self.round_started = now
        self.reconnect_grace = 0.0

    def check(self, now: float) -> RoundDecision:
        """Can the open round complete now? Pure function of the state and ``now``."""
        r = self.open_round
        if self.closing is not None:
            return RoundDecision(r, False, f"round {r} is being aggregated")
        if self.finished:
            return RoundDecision(r, False, "the session has finished")
        if self.plan is None or r > self.plan.last_round:
            return RoundDecision(r, False, f"round {r}: waiting for the epoch plan (start gate)")
        expected = self.expected()
        arrived = list(self.arrivals.items())
        got = [n for n, _ in arrived]
        missing = tuple(n for n in expected if n not in self.arrivals)
        if not arrived:
            d = RoundDecision(r, False, f"round {r}: waiting, 0/{len(expected)} arrived")
        elif not missing:
            d = RoundDecision(
                r,
                True,
                f"round {r} complete: all {len(expected)} live node(s) arrived "
                f"({', '.join(_short(n) for n in got)})",
                tuple(arrived),
            )
        else:
            need = max(1, math.ceil(self.config.quorum * len(expected)))
            have = sum(1 for n in expected if n in self.arrivals)
            dl, estimated, unknown = self._deadline()
            names = ", ".join(_short(n) for n in missing)
            basis = ""
            if estimated:
                basis = (
                    f" (pace of {', '.join(_short(n) for n in estimated)} estimated from "
                    "calibration, no measured rate)"
                )
            if self.reconnect_grace > 0:
                basis += f" (after a {self.reconnect_grace:g}s reconnect grace for the restart)"
            if dl is None:
                d = RoundDecision(
                    r,
                    False,
                    f"round {r}: waiting, {have}/{len(expected)} arrived, no deadline yet "
                    f"(pace of {', '.join(_short(n) for n in unknown)} unknown: no measured "
                    f"rate and no calibration estimate); missing {names}",
                    missing=missing,
                )
            elif now < dl:
                d = RoundDecision(
                    r,
                    False,
                    f"round {r}: waiting, {have}/{len(expected)} arrived, deadline in "
                    f"{dl - now:.1f}s{basis}; missing {names}",
                    missing=missing,
                )
            elif have >= need:
                d = RoundDecision(
                    r,
                    True,
                    f"round {r} complete: deadline passed {now - dl:.1f}s ago{basis} with "
                    f"quorum {have}/{len(expected)} (needed {need}); left behind {names}",
                    tuple(arrived),
                    missing,
                )
            else:
                d = RoundDecision(
                    r,
                    False,
                    f"round {r}: deadline passed{basis} but only {have}/{len(expected)} arrived, "
                    f"quorum needs {need}; waiting; missing {names}",
                    missing=missing,
                )
        self.last_decision = d.reason
        return d

    def close(self, closing: int) -> tuple[tuple[str, int], ...]:
        """Aggregation of the open round ``closing`` starts: no more uploads count for it."""
        assert closing == self.open_round and self.closing is None
        self.closing = closing
        return tuple(self.arrivals.items())

    def advance(self, closing: int, now: float) -> RoundOutcome:
        """The checkpoint of round ``closing`` is durable: it is the completed round now, and
        the next one opens; maybe the next epoch is planned, or the session finishes."""
        assert closing == self.open_round
        self.completed = closing
        self.closing = None
        for node in self.arrivals:
            m = self.members[node]
            if m.barrier_since is not None:
                m.barrier_wait = now - m.barrier_since
            m.barrier_since = None
            if m.state is MemberState.BARRIER:
                m.state = MemberState.TRAINING
        self.arrivals = {}
        self.excluded = {}
        self.round_started = now
        self.reconnect_grace = 0.0
        epoch = self.plan.epoch if self.plan else 0
        planned = None
        finished = False
        reason = f"round {closing} done"
        if self.stop_round is not None and closing >= self.stop_round:
            self.finished = True
            finished = True
            reason = f"round {closing} was the final round: {self.stop_reason}; finished"
        elif self.plan is not None and closing >= self.plan.last_round:
            if self.plan.epoch + 1 >= self.config.epochs:
                self.finished = True
                finished = True
                reason = f"round {closing} was the last of epoch {epoch}, the final epoch: finished"
            else:
                planned = self.maybe_plan(now)
                reason = f"round {closing} ended epoch {epoch}; " + (
                    f"planned epoch {planned}"
                    if planned is not None
                    else "next epoch waits for a live node"
                )
        return RoundOutcome(closing, epoch, finished, planned, reason)

    # ---- stopping early ------------------------------------------------------------------
    def request_stop(self, node: str, kind: StopKind, reason: str, now: float) -> StopVerdict:
        """A node asks to end the session (see the module docstring); the verdict says
        whether the session stops, on which round, and why."""
        m = self.members.get(node)
        if m is None or not m.live():
            return StopVerdict(False, "join first")
        m.last_seen = now
        if self.finished:
            return StopVerdict(
                True, f"the session has finished at round {self.completed}", self.completed
            )
        if self.stop_round is not None:
            return StopVerdict(True, self.stop_reason, self.stop_round)
        reason = " ".join(str(reason).split())[:200]  # a node's words: one bounded line
        self.stop_requests[node] = reason or kind
        voters = [n for n in self.live() if n in self.admitted]
        asked = sum(1 for n in voters if n in self.stop_requests)
        stop, why = stop_decision(
            self.config.stop_policy, self.config.stop_quorum, asked, len(voters), kind
        )
        who = f"node {_short(node)} asked to stop ({reason or kind})"
        if not stop or not self.has_weights:
            if stop:
                why = "no global weights yet: nothing to finish on"
            return StopVerdict(False, f"{who}; session continues: {why}")
        r = self.open_round
        self.stop_reason = f"{who}; {why}"
        if self.plan is not None and self.plan.first_round <= r <= self.plan.last_round:
            self.stop_round = r
            return StopVerdict(
                True, f"{self.stop_reason}: round {r} is the final round", r, newly=True
            )
        # Between epochs: no node trains toward the open round; the last one is final.
        self.stop_round = self.completed
        self.finished = True
        return StopVerdict(
            True,
            f"{self.stop_reason}: finished on round {self.completed}",
            self.completed,
            finished_now=True,
            newly=True,
        )

    # ---- views ---------------------------------------------------------------------------
    def train_config(self) -> TrainConfig:
        c = self.config
        return TrainConfig(
            session_id=self.session_id,
            epochs=c.epochs,
            batch_size=c.batch_size,
            sync_every=c.sync_every,
            aggregation=c.aggregation,
            outer_lr=c.outer_lr,
            outer_momentum=c.outer_momentum,
            transfer_dtype=c.transfer_dtype,
            seed=c.seed,
            dataset_size=self.dataset_size,
            round=self.completed,
            epoch=self.epoch,
            heartbeat_s=c.heartbeat_s,
            progress_every_s=c.progress_every_s,
            has_weights=self.has_weights,
            min_nodes=c.min_nodes,
            lightning_config=c.lightning_config,
            stop_round=-1 if self.stop_round is None else self.stop_round,
            overlap=c.overlap,
        )

    def status(self, now: float, checkpoint: str = "") -> SessionStatus:
        if self.finished:
            state = "finished"
        elif self.plan is None:
            state = "waiting"
        elif self.closing is not None:
            state = "aggregating"
        else:
            state = "training"
        nodes = []
        for node, m in self.members.items():
            a = self.assignments.get(node)
            wait = m.barrier_wait if m.barrier_since is None else now - m.barrier_since
            nodes.append(
                NodeStatus(
                    node_id=node,
                    name=m.name,
                    device=m.device,
                    vram_total=m.vram_total,
                    share=a.share if a is not None else 0.0,
                    samples_per_s=finite(m.rate),
                    round=m.arrived_round,
                    state=m.state.value,
                    barrier_wait_s=wait,
                    loss=m.loss,
                    samples=m.samples,
                    vram_used=m.vram_used,
                    vram_peak=m.vram_peak,
                    stop_asked=node in self.stop_requests,
                )
            )
        return SessionStatus(
            session_id=self.session_id,
            state=state,
            round=self.completed,
            epoch=self.epoch,
            epochs=self.config.epochs,
            aggregation=self.config.aggregation,
            nodes=nodes,
            checkpoint=checkpoint,
            started_at=self.started_at,
            stop_reason=self.stop_reason,
        )

    # ---- persistence (state.json) -------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The durable part of the session: written after each completed round."""
        return {
            "config": asdict(self.config),
            "session_id": self.session_id,
            "started_at": self.started_at,
            "dataset_size": self.dataset_size,
            "model_fingerprint": self.model_fingerprint,
            "has_weights": self.has_weights,
            "completed": self.completed,
            "epoch": self.epoch,
            "finished": self.finished,
            "plan": None if self.plan is None else self.plan.to_dict(),
            "assignments": {n: msgspec.to_builtins(a) for n, a in self.assignments.items()},
            "late": sorted(self.late),
            "orphans": {n: v.to_dict() for n, v in self.orphans.items()},
            "members": {
                n: {
                    "name": m.name,
                    "state": m.state.value,
                    "device": m.device,
                    "vram_total": m.vram_total,
                    "rate": m.rate,
                    "pace": m.pace,
                    "vouched": m.vouched,
                    "token": m.token,
                    "strikes": m.strikes,
                    "gone_at": m.gone_at,
                    "round": m.arrived_round,
                    "joined_at": m.joined_at,
                    "reason": m.reason,
                }
                for n, m in self.members.items()
            },
            "admitted": sorted(self.admitted),
            "banned": dict(self.banned),
            "scheduler": None if self.scheduler is None else self.scheduler.to_dict(),
            "stop": {
                "requests": dict(self.stop_requests),
                "round": self.stop_round,
                "reason": self.stop_reason,
            },
            "trained": dict(self.trained),
            "counted": dict(self.counted),
            "revision": self.revision,
            "rebalanced_round": self.rebalanced_round,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any], *, now: float) -> Session:
        """Restore after a restart. Members that were live get twice ``heartbeat_timeout``
        (from ``now``) to reconnect before they are lost: they first have to notice the old
        coordinator is gone (about ``heartbeat_timeout``), then reconnect with backoff.

        The open round starts afresh, its clock after a reconnect grace of ``heartbeat_timeout``
        (``round_started = now + heartbeat_timeout``): the straggler deadline, floor included,
        counts from when nodes can have re-sent their uploads, so quorum does not close the
        round while honest uploads are still on their way back."""
        config = SessionConfig.from_dict(d["config"])
        s = cls(config, session_id=d["session_id"], now=now)
        s.started_at = d.get("started_at", now)
        s.dataset_size = d.get("dataset_size", 0)
        s.model_fingerprint = d.get("model_fingerprint", "")
        if d.get("scheduler") is not None:
            s.scheduler = Scheduler.from_dict(d["scheduler"])
        s.has_weights = d["has_weights"]
        s.completed = d["completed"]
        s.epoch = d["epoch"]
        s.finished = d["finished"]
        if d.get("plan"):
            s.plan = EpochPlan.from_dict(d["plan"])
        s.assignments = {
            n: msgspec.convert(a, ShardAssignment) for n, a in d.get("assignments", {}).items()
        }
        s.late = set(d.get("late", ()))
        s.orphans = {n: Shard.from_dict(v) for n, v in d.get("orphans", {}).items()}
        s.admitted = set(d.get("admitted", ()))
        stop = d.get("stop") or {}
        s.stop_requests = {str(k): str(v) for k, v in (stop.get("requests") or {}).items()}
        s.stop_round = None if stop.get("round") is None else int(stop["round"])
        s.stop_reason = str(stop.get("reason", ""))
        s.banned = dict(d.get("banned", {}))
        s.trained = {str(n): int(v) for n, v in d.get("trained", {}).items()}
        s.counted = {str(n): int(v) for n, v in d.get("counted", {}).items()}
        s.revision = int(d.get("revision", 0))
        s.rebalanced_round = int(d.get("rebalanced_round", -1))
        for n, md in d.get("members", {}).items():
            saved = MemberState(md["state"])
            state = saved if saved in GONE else MemberState.TRAINING
            s.members[n] = Member(
                node=n,
                name=md.get("name", ""),
                state=state,
                joined_at=md.get("joined_at", now),
                last_seen=now + config.heartbeat_timeout,
                device=md.get("device", ""),
                vram_total=md.get("vram_total", 0),
                rate=md.get("rate", 0.0),
                pace=md.get("pace", 0.0),
                vouched=md.get("vouched", 0.0),
                token=md.get("token", ""),
                strikes=md.get("strikes", 0),
                gone_at=md.get("gone_at", now) if saved in GONE else 0.0,
                arrived_round=md.get("round", 0),
                reason=md.get("reason", ""),
            )
        s.round_started = now + config.heartbeat_timeout
        s.reconnect_grace = config.heartbeat_timeout
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

    def _vouch(self, m: Member, samples: int, now: float) -> None:
        """Measure ``m``'s pace from its upload arriving now: its samples, at most one round's
        work of its assignment, over the time since the round started (or since it joined,
        if later). Skipped while the round's clock has not started (a restart's grace)."""
        a = self.assignments.get(m.node)
        if a is None or samples <= 0:
            return
        work = a.work_per_round
        elapsed = now - max(self.round_started, m.joined_at)
        if elapsed <= 0 or work <= 0:
            return
        rate = min(samples, work) / max(elapsed, ELAPSED_MIN)
        m.vouched = rate if m.vouched <= 0 else 0.7 * m.vouched + 0.3 * rate
        if self.scheduler is not None and m.node in self.admitted:
            self.scheduler.observe(m.node, rate)


def _short(node: str) -> str:
    return node[:8]


__all__ = [
    "Decision",
    "Member",
    "MemberState",
    "RoundDecision",
    "RoundOutcome",
    "Session",
    "ShardReply",
    "StopVerdict",
    "UploadVerdict",
    "Verdict",
    "stop_decision",
]
