"""Epoch plans and who trains what: assignments, late joiners, orphaned work, positions. Pure.

An epoch's shards are cut from the paces the scheduler has when it is planned
(``Scheduler.plan_epoch``); every round of an epoch has one barrier. A node arriving inside an
epoch (a late joiner, or one that comes back) gets the unconsumed rest of an orphaned shard (a
lost node's; its own first) when there is one, else a slice sized for the rounds remaining at
its pace (:func:`plan_late`); its upload in its first round counts only if it arrives before
the round completes. Exact coverage of the epoch holds only for the nodes of the plan and
orphans handed on.

Positions a node reports having trained (``epoch_samples``) are kept here: where it is (for
re-plans, moved on by its pace for the time since the report) and what its last counted upload
held (for the rest a lost node hands on).

The boundary: this book knows work (which positions of the permutation each node holds and
has trained), not people or time: the roster says who is live, the pace book how fast, and
the caller passes ``now``.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Mapping

import msgspec

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.segments import split, total
from lightning_drift.coordinator.verdicts import ShardReply
from lightning_drift.protocol import ShardAssignment
from lightning_drift.scheduler import (
    EpochPlan,
    Shard,
    batch_aligned,
    consumed_after,
    steps_for,
)
from lightning_drift.text import short_id


def plan_late(
    plan: EpochPlan,
    node: str,
    pace: float,
    rounds_done: int,
    orphan: Shard | None,
    *,
    orphan_done: int | None = None,
    batch_size: int = 0,
    samples_per_step: int = 0,
) -> Shard:
    """The shard for ``node`` joining epoch ``plan.epoch`` after ``rounds_done`` of its barriers.

    With an ``orphan`` (the shard of a node that was lost), the late node gets the part of it
    the lost node had not yet trained on: the lost node is taken to have consumed what it
    would have by its ``orphan_done``-th barrier of the epoch (default ``rounds_done``).

    Without one, every position of the permutation already belongs to a planned node, so the
    late node gets a contiguous slice sized for the rounds remaining at its pace (the rate
    per unit of pace that the plan gives everyone), placed at a deterministic offset derived
    from the epoch and node id. The compromise: those samples are seen twice this epoch.
    Exact coverage (every sample once per epoch) is promised only for the nodes present when
    the epoch was planned, and for orphans handed on.

    With the late node's ``batch_size`` and ``samples_per_step`` known, its shard is whole
    optimizer steps of its own, plus a :func:`batch_aligned` tail (from an orphan), and a
    slice gives it at least one step per remaining round.
    """
    remaining = max(1, plan.rounds - max(0, rounds_done))
    n = plan.dataset_size or max((s.stop for s in plan.shards.values()), default=0)
    unit = samples_per_step or batch_size
    if orphan is not None:
        done = rounds_done if orphan_done is None else orphan_done
        used = consumed_after(
            orphan.size,
            orphan.batch_size or plan.batch_size,
            plan.rounds,
            done,
            samples_per_step=orphan.samples_per_step,
        )
        _, rest = split(orphan.ranges, used)
        size = total(rest)
        if unit > 0:
            whole = size - size % unit
            size = whole + batch_aligned(size - whole, batch_size, n)
        rest, _ = split(rest, size)
        return Shard.of(
            node,
            rest,
            orphan.share,
            steps_for(size, batch_size or plan.batch_size, remaining, samples_per_step),
            batch_size=batch_size,
            samples_per_step=samples_per_step,
        )
    if plan.total_pace > 0 and plan.rounds > 0:
        per_round = n * pace / (plan.total_pace * plan.rounds)
        share = pace / (plan.total_pace + pace)
    else:
        sizes = [s.size for s in plan.shards.values()] or [n]
        per_round = sum(sizes) / len(sizes) / max(1, plan.rounds)
        share = 1.0 / (len(plan.shards) + 1)
    size = max(0, min(n, round(per_round * remaining)))
    if unit > 0:
        size = min(max(remaining, round(size / unit)) * unit, n - n % unit)
    span = n - size + 1
    digest = hashlib.sha256(f"drift-late:{plan.epoch}:{node}".encode()).digest()
    start = int.from_bytes(digest[:8], "big") % span if span > 0 else 0
    return Shard(
        node=node,
        start=start,
        stop=start + size,
        share=share,
        steps_per_round=steps_for(size, batch_size or plan.batch_size, remaining, samples_per_step),
        batch_size=batch_size,
        samples_per_step=samples_per_step,
    )


def assign(
    plan: EpochPlan,
    sh: Shard,
    first_round: int,
    rounds: int,
    *,
    seed: int,
    final: bool,
    revision: int,
) -> ShardAssignment:
    """The assignment of shard ``sh`` of ``plan``, from ``first_round`` for ``rounds``."""
    return ShardAssignment(
        epoch=plan.epoch,
        start=sh.start,
        stop=sh.stop,
        rounds=rounds,
        first_round=first_round,
        seed=seed,
        share=sh.share,
        steps_per_round=sh.steps_per_round,
        final=final,
        batch_size=sh.batch_size,
        samples_per_step=sh.samples_per_step,
        segments=list(sh.segments),
        revision=revision,
    )


def consumed(a: ShardAssignment, barriers: int, batch_size: int) -> int:
    """Positions of assignment ``a`` its node has trained by its ``barriers``-th barrier of the
    epoch, by its barrier points (in the node's own optimizer steps; ``batch_size``: the
    session's, for a node that did not say its own)."""
    return consumed_after(
        a.size,
        a.batch_size or batch_size,
        a.rounds,
        barriers,
        samples_per_step=a.samples_per_step,
    )


def shard_reply(node: str, a: ShardAssignment, late: bool) -> ShardReply:
    """The answer to a ShardRequest that ``node``'s assignment ``a`` is."""
    how = "late joiner " if late else ""
    return ShardReply(
        a,
        f"{how}{short_id(node)}: epoch {a.epoch} [{a.start}, {a.stop}) from round "
        f"{a.first_round} for {a.rounds} round(s)",
    )


def round_end(
    completed: int, plan: EpochPlan | None, epochs: int, stop_round: int | None, stop_reason: str
) -> tuple[bool, bool, str]:
    """After round ``completed`` completed: (the session finishes, the next epoch is to be
    planned, why). A decided stop's final round, or the last round of the final epoch, ends
    the session; the last round of another epoch asks for the next plan."""
    epoch = plan.epoch if plan else 0
    if stop_round is not None and completed >= stop_round:
        return True, False, f"round {completed} was the final round: {stop_reason}; finished"
    if plan is None or completed < plan.last_round:
        return False, False, f"round {completed} done"
    if plan.epoch + 1 >= epochs:
        return (
            True,
            False,
            f"round {completed} was the last of epoch {epoch}, the final epoch: finished",
        )
    return False, True, f"round {completed} ended epoch {epoch}; "


class EpochBook(msgspec.Struct):
    """The current epoch's plan, assignments, late joiners, orphans and reported positions.

    ``trained``: the positions of its epoch's work each node reported having trained (any
    report), ``trained_at`` when (not kept across a restart: clocks differ); ``counted``: as
    of its last upload that counted. All three reset when an epoch is planned."""

    plan: EpochPlan | None = None
    assignments: dict[str, ShardAssignment] = {}
    late: set[str] = set()  # nodes assigned after the plan was made (this epoch)
    orphans: dict[str, Shard] = {}  # lost node -> unconsumed rest of its shard
    trained: dict[str, int] = {}
    trained_at: dict[str, float] = {}
    counted: dict[str, int] = {}
    # The measured pace each node's work was sized by (absent: by its calibration, unproven):
    # a node measured at that pace or better keeps to its plan, and no re-plan takes its work.
    planned: dict[str, float] = {}

    def begin(
        self,
        plan: EpochPlan,
        *,
        seed: int,
        final: bool,
        revision: int,
        paces: Mapping[str, float] | None = None,
    ) -> None:
        """A new epoch is planned: its assignments replace the last epoch's; ``paces``: the
        measured paces the plan was made with."""
        self.plan = plan
        self.planned = {n: p for n, p in (paces or {}).items() if n in plan.shards and p > 0}
        self.assignments = {
            n: assign(
                plan, sh, plan.first_round, plan.rounds, seed=seed, final=final, revision=revision
            )
            for n, sh in plan.shards.items()
        }
        for kept in (self.late, self.orphans, self.trained, self.trained_at, self.counted):
            kept.clear()

    def next_epoch(self, completed: int, epochs: int) -> int | None:
        """The epoch to plan once round ``completed`` has completed (None: the planned one
        has rounds left, or it was the last of ``epochs``)."""
        if self.plan is not None and completed < self.plan.last_round:
            return None
        epoch = 0 if self.plan is None else self.plan.epoch + 1
        return epoch if epoch < epochs else None

    def never_planned(self, epoch: int, epochs: int) -> str:
        """Why a shard of ``epoch`` can never be given ("" when it can): only the epoch after
        the planned one (0 before any) may still come, and none past the session's ``epochs``.
        Says what the node should do."""
        coming = 0 if self.plan is None else self.plan.epoch + 1
        if epoch <= coming and epoch < epochs:
            return ""
        return (
            f"epoch {epoch} will never be planned: the session trains epochs 0-{epochs - 1} and "
            f"plans epoch {min(coming, epochs - 1)} next. A node asks for the epoch its "
            "Lightning loop is in: resume from a checkpoint of this session (or none), or let "
            "the node start at the session's epoch"
        )

    def in_plan(self, r: int) -> bool:
        """Round ``r`` is one of the planned epoch's barriers."""
        return self.plan is not None and self.plan.first_round <= r <= self.plan.last_round

    def expected(self, r: int, counts: Callable[[str], bool]) -> list[str]:
        """Nodes whose upload round ``r`` waits for, in assignment order: those ``counts``
        says still count (live, not left out) with a barrier in ``r``; a late joiner's first
        round counts only if it comes in time."""
        if not self.in_plan(r):
            return []
        out = []
        for node, a in self.assignments.items():
            if not counts(node):
                continue
            if node in self.late and a.first_round >= r:
                continue  # a late joiner's first round: counts only if it comes in time
            if a.first_round + a.rounds - 1 < r:
                continue
            out.append(node)
        return out

    def late_assignment(
        self,
        node: str,
        r: int,
        pace: float,
        batching: tuple[int, int],
        config: SessionConfig,
        revision: int,
    ) -> ShardAssignment | None:
        """A shard for ``node`` arriving inside the epoch at open round ``r`` (late joiner or
        rejoin), at its ``pace``; None when no round of the epoch is left."""
        plan = self.plan
        assert plan is not None
        rounds = plan.last_round - r + 1
        if rounds <= 0:
            return None
        orphan = None
        if node in self.orphans:
            orphan = self.orphans.pop(node)
        elif self.orphans:
            orphan = self.orphans.pop(next(iter(self.orphans)))
        batch, per_step = batching
        sh = plan_late(
            plan,
            node,
            pace,
            r - plan.first_round,
            orphan,
            orphan_done=0,
            batch_size=batch,
            samples_per_step=per_step,
        )
        final = plan.epoch == config.epochs - 1
        a = assign(plan, sh, r, rounds, seed=config.seed, final=final, revision=revision)
        self.assignments[node] = a
        self.late.add(node)
        return a

    def hand_on(self, node: str, open_round: int, arrived: bool, batch_size: int) -> None:
        """``node`` is lost: the rest of its work after what its counted uploads hold becomes
        an orphan (for the next node to arrive), and it forgets its assignment (it gets a fresh
        one, its own rest if still free, when it comes back)."""
        a = self.assignments.get(node)
        if a is None or self.plan is None or a.epoch != self.plan.epoch:
            return
        done = max(0, open_round - a.first_round) + (1 if arrived else 0)
        # What its counted uploads hold: the positions it said it had trained when it took
        # its last one, or (a node that does not say) what its barrier points imply.
        used = self.counted.get(node)
        if used is None or node in self.late:
            used = consumed(a, done, batch_size)
        _, rest = split(a.ranges, used)
        if done < a.rounds and total(rest) > 0:
            self.orphans[node] = Shard.of(
                node, rest, a.share, batch_size=a.batch_size, samples_per_step=a.samples_per_step
            )
        for kept in (self.trained, self.trained_at, self.counted):
            kept.pop(node, None)
        del self.assignments[node]
        self.late.discard(node)

    def record(
        self,
        node: str,
        epoch: int | None,
        epoch_samples: int,
        now: float,
        *,
        counted: int | None = None,
        batch_size: int = 1,
    ) -> None:
        """``node`` has trained ``epoch_samples`` positions of its work of ``epoch`` (ignored
        for another epoch than its assignment's, or when not said); ``counted``: the round of
        an upload that counts, which holds at most the work of its assignment's rounds up to
        that one (what a node says beyond it is a claim, never taken as trained)."""
        a = self.assignments.get(node)
        if epoch_samples < 0 or a is None or (epoch is not None and epoch != a.epoch):
            return
        value = min(int(epoch_samples), a.size)
        if counted is not None:
            value = min(value, consumed(a, max(0, counted - a.first_round + 1), batch_size))
        if value > self.trained.get(node, -1):
            self.trained[node] = value
            self.trained_at[node] = now
        if counted is not None:
            self.counted[node] = value

    def work_since(
        self, node: str, upload_round: int, last_round: int, dataset_size: int, batch_size: int
    ) -> int:
        """The most samples ``node``'s upload for ``upload_round`` can hold: its assignment's
        work for the rounds since ``last_round`` (its last counted upload), a step more for
        rounding (``batch_size``: the session's, for a node that did not say its own), never
        more than its whole shard; ``dataset_size`` for a node without an assignment, its
        whole shard for ``upload_round`` < 0."""
        a = self.assignments.get(node)
        if a is None:
            return max(0, dataset_size)
        if upload_round < 0:
            return a.size
        since = last_round if last_round >= a.first_round else a.first_round - 1
        step = a.samples_per_step or a.batch_size or batch_size
        return min(a.size, math.ceil(a.work_per_round * max(1, upload_round - since)) + step)

    def reach(self, node: str, open_round: int, batch_size: int) -> tuple[int, bool]:
        """How far into its work ``node`` can be at most, and whether it has a barrier left
        beyond that point. Rounds are global: a node trains at most up to the barrier after
        the one in flight (the open round's), then waits for the open round; a node held
        there is not at the end of its epoch and can take more work at its tail."""
        a = self.assignments[node]
        ahead = open_round - a.first_round + 2
        return consumed(a, ahead, batch_size), ahead < a.rounds

    def position(self, node: str, now: float, pace: float) -> int:
        """Where ``node`` is in its work now: what it last reported having trained, moved on
        by ``pace`` for the time since (a report can be seconds old, and a stale position
        would make a node look slower than it is)."""
        since = max(0.0, now - self.trained_at.get(node, now))
        return int(self.trained.get(node, 0) + pace * since)


__all__ = ["EpochBook", "assign", "consumed", "plan_late", "round_end", "shard_reply"]
