"""The epoch's work on a node: its shard, its barrier points, holding them, following re-plans.

Every epoch the coordinator assigns the node work (a :class:`~lightning_drift.protocol.
ShardAssignment`); :class:`EpochWork` turns it into a sampler and the epoch's barrier points
(:class:`~lightning_drift.node.barriers.EpochBarriers`), holds each barrier through the round
engine (:class:`~lightning_drift.node.exchange.RoundExchange`), follows a re-plan of the rest
of the epoch between two optimizer steps, and keeps one
:class:`~lightning_drift.node.exchange.BarrierRecord` per round applied (the strategy's
``history``).

The boundary: this is the epoch's bookkeeping, which needs neither Lightning nor the network
directly. Lightning's loop is reached through :class:`Loop` (the strategy hands it
:class:`~lightning_drift.node.loopstate.TrainerLoop`) and the runtime through :class:`Link`,
so the epoch's work is tested with stand-ins, no ``Trainer``.
"""

from __future__ import annotations

import logging
from collections.abc import Sized
from typing import Protocol

import torch

from lightning_drift import protocol as p
from lightning_drift.errors import SessionFinished
from lightning_drift.hardware import memory_now
from lightning_drift.node.barriers import EpochBarriers, upload_round
from lightning_drift.node.exchange import BarrierRecord, RoundExchange
from lightning_drift.node.pace import PaceMeter
from lightning_drift.node.shards import ShardSampler

log = logging.getLogger(__name__)


class Loop(Protocol):
    """What the node's parts need of Lightning's fit loop."""

    @property
    def epoch(self) -> int:
        """The epoch the fit loop is in."""
        ...

    def more_epochs(self) -> bool:
        """An epoch follows this one in the fit."""
        ...

    def steps_per_epoch(self, shard_size: int) -> int:
        """Optimizer steps the epoch's loader gives over a shard of ``shard_size``."""
        ...

    def jump_to_epoch(self, epoch: int) -> int: ...

    def follow_epoch_length(self, batches: int) -> None: ...

    def keep_fitting(self, epochs: int) -> int | None: ...

    def end_fit(self) -> None: ...

    def log_metrics(self, metrics: dict[str, float]) -> None: ...


class Link(Protocol):
    """What the epoch's work needs of the runtime: the latest re-plan, progress reports, the
    bytes moved, and leaving the session (goodbye)."""

    bytes_sent: int
    bytes_received: int

    def replan(self) -> p.ShardAssignment | None: ...

    def report(self, progress: p.TrainProgress) -> None: ...

    def close(self, reason: str = "done") -> None: ...


class EpochWork:
    """One node's epochs once it has joined: ``exchange`` holds the rounds, ``meter`` counts
    the steps and samples, ``overlap`` says whether barriers before the epoch's last one
    overlap their rounds, ``sync_every`` (optional) brings the barriers earlier; ``history``
    gets a record per round applied."""

    def __init__(
        self,
        exchange: RoundExchange,
        meter: PaceMeter,
        loop: Loop,
        link: Link,
        *,
        overlap: bool,
        sync_every: int | None = None,
        history: list[BarrierRecord] | None = None,
    ) -> None:
        self.exchange, self.meter, self.loop, self.link = exchange, meter, loop, link
        self.overlap, self.sync_every = overlap, sync_every
        self.assignment: p.ShardAssignment | None = None
        self.barriers: EpochBarriers | None = None
        self.sampler: ShardSampler | None = None
        self.loader: Sized | None = None  # the epoch's loader over ``sampler``
        # One record per barrier, for tests and logs (the caller's list, kept across fits).
        self.history: list[BarrierRecord] = [] if history is None else history
        self.finished = False

    @property
    def base_round(self) -> int:
        """The round of the verified global weights the parameters are based on."""
        return self.exchange.base_round

    def take(self, a: p.ShardAssignment, dataset_size: int) -> ShardSampler:
        """The epoch's work: its barrier points and the sampler over it."""
        if a.epoch != self.loop.epoch:
            was = self.loop.jump_to_epoch(a.epoch)
            log.info("rejoin: jumping from epoch %d to the session's epoch %d", was, a.epoch)
        self.assignment = a
        self.barriers = EpochBarriers(
            rounds=a.rounds, first_round=a.first_round, sync_every=self.sync_every
        )
        self.meter.new_epoch()
        log.info(
            "shard epoch=%d ranges=%s size=%d rounds=%d first_round=%d",
            a.epoch,
            a.ranges,
            a.size,
            a.rounds,
            a.first_round,
        )
        self.loop.log_metrics({"drift/shard_size": float(a.size), "drift/epoch": a.epoch})
        return ShardSampler.for_assignment(a, dataset_size)

    def finished_meanwhile(self, done: SessionFinished) -> None:
        """The session finished while this node was away, or between two of its epochs (a
        stop): make sure it holds the final weights, train nothing more, end the fit."""
        if self.base_round < done.final_round:
            self.sync(p.BarrierSync(round=0, epoch=self.loop.epoch))
        log.warning(
            "the session finished at round %d; this node holds its final weights",
            done.final_round,
        )
        self.finished = True
        self.loop.end_fit()

    def stepped(self) -> None:
        """After an optimizer step: count it towards the barrier points, apply the round in
        flight if its weights have come, follow a re-plan if one has."""
        plan = self.barriers
        assert plan is not None, "a step is counted inside an epoch"
        self.meter.step()
        if plan.total_steps is None:  # the loader's length is known from the first step on
            plan.total_steps = self._steps_per_epoch()
        plan.step()
        if self.exchange.arrived:
            self.settle()
        replan = self.link.replan()
        if replan is not None:
            self.follow(replan)

    def report(self, device: torch.device) -> None:
        """Send the coordinator a progress report when one is due."""
        meter = self.meter
        if meter.report_due():
            used, peak = memory_now(device)
            # The round this node is training towards.
            self.link.report(meter.report(self.base_round + 1, self.loop.epoch, used, peak))

    def hold(self, *, blocking: bool | None = None) -> None:
        """Hold the epoch's next barrier now: the one place a barrier is executed.

        First the round still in flight, if any, is waited for and applied (at most one
        round in flight). Then the weights are handed to the network thread for the next round.
        ``blocking=None`` blocks at the epoch's last barrier (or always, without overlap) and
        overlaps the others; ``blocking=True`` holds a final, blocking barrier: when it returns,
        the node holds exactly the round's global weights."""
        plan = self.barriers
        assert plan is not None, "a barrier is held inside an epoch"
        if blocking is None:
            blocking = not self.overlap or plan.last
        self.settle()
        if self.finished:
            return
        meter = self.meter
        sync = p.BarrierSync(
            round=upload_round(self.base_round, plan.scheduled_round),
            epoch=self.loop.epoch,
            samples=meter.samples,
            steps=plan.steps,
            loss=meter.last_loss,
            # Training time since the previous upload: the coordinator measures pace from it.
            train_seconds=meter.train_seconds(),
            epoch_samples=meter.epoch_samples,
        )
        self.exchange.hand_off(sync, overlap=not blocking)
        plan.held()
        if blocking:
            self.settle()

    def hold_due(self) -> None:
        """Hold every barrier the plan says is due now."""
        plan = self.barriers
        while plan is not None and plan.due() and not self.finished:
            self.hold()

    def hold_owed(self) -> None:
        """At the epoch's end: hold the barriers fewer optimizer steps than promised left."""
        plan = self.barriers
        while plan is not None and plan.owed() and not self.finished:
            log.info("epoch ended before barrier %d; holding it now", plan.done + 1)
            self.hold()

    def leave(self, reason: str) -> None:
        """This node trains no further (it reached its ``max_steps``) while the session trains
        on without it: the steps since its last barrier go in one last, blocking barrier, so
        they count and the node ends on that round's global weights (with none, the round in
        flight is settled); then it says goodbye (``reason``), the coordinator hands the rest
        of its work on, and it holds no barrier again: :attr:`finished` from here on."""
        plan = self.barriers
        if plan is not None and not self.finished and plan.steps > plan.last_barrier_steps:
            plan.finish_at(plan.scheduled_round)
            self.hold(blocking=True)
        self.settle()
        self.finished = True
        self.link.close(reason)

    def sync(self, sync: p.BarrierSync) -> None:
        """A blocking barrier outside the epoch's plan (the start-up sync, fetching the final
        weights): upload, wait for the round's global weights and load them exactly."""
        self.exchange.hand_off(sync, overlap=False)
        self.settle()

    def settle(self) -> None:
        """Wait for the round in flight, if any, apply its global weights, record it."""
        record = self.exchange.settle()
        if record is not None:
            self.applied(record)

    def applied(self, record: BarrierRecord) -> None:
        """A round was applied: record it, log it, and end the fit if the session is over."""
        self.finished = record.finished
        self.history.append(record)
        log.info(
            "barrier round=%d contributed=%s payload=%s wait_s=%.3f overlapped=%s samples=%d",
            record.round,
            record.contributed,
            record.payload,
            record.wait_s,
            record.overlapped,
            record.samples,
        )
        self.loop.log_metrics(
            {
                "drift/round": float(record.round),
                "drift/barrier_wait_s": record.wait_s,
                "drift/bytes_sent": float(self.link.bytes_sent),
                "drift/bytes_received": float(self.link.bytes_received),
                "drift/samples_per_round": float(record.samples),
            }
        )
        plan = self.barriers
        more = plan is not None and (plan.stopped or plan.owed() > 0 or self.loop.more_epochs())
        if self.finished and more:
            # The session stopped early, or a straggler was answered with the session's final
            # weights: nothing left to train.
            log.warning("the session finished at round %d; stopping", record.round)
            self.loop.end_fit()

    def follow(self, a: p.ShardAssignment) -> None:
        """Take the coordinator's re-plan of the current epoch: the sampler's rest, Lightning's
        epoch length and the barriers not yet held follow it."""
        current, plan, sampler, loader = self.assignment, self.barriers, self.sampler, self.loader
        if current is None or plan is None or sampler is None or loader is None:
            return
        if a.epoch != current.epoch or a.revision <= current.revision or not plan.owed():
            return
        with self.meter.busy("replan_s"):
            overrun = sampler.update(a.ranges)
            self.assignment = a
            self.loop.follow_epoch_length(len(loader))
            plan.retarget(self._steps_per_epoch())
        if overrun:
            log.warning(
                "re-plan revision=%d: %d sample(s) already loaded here moved to another node; "
                "they are trained twice this epoch",
                a.revision,
                overrun,
            )
        log.info(
            "replan epoch=%d revision=%d size=%d steps=%s",
            a.epoch,
            a.revision,
            a.size,
            plan.total_steps,
        )
        self.loop.log_metrics({"drift/shard_size": float(a.size)})

    def _steps_per_epoch(self) -> int:
        assert self.assignment is not None
        return self.loop.steps_per_epoch(self.assignment.size)


__all__ = ["EpochWork", "Link", "Loop"]
