"""The epoch's work without a Trainer: a stand-in for Lightning's loop, the runtime and the
round engine, so each test decides what the coordinator assigned and answered."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from support import Loop

from lightning_drift.errors import SessionFinished
from lightning_drift.node.epochwork import EpochWork
from lightning_drift.node.exchange import BarrierRecord
from lightning_drift.node.pace import PaceMeter
from lightning_drift.protocol import BarrierSync, ShardAssignment


@dataclass
class Link:
    replans: list[ShardAssignment] = field(default_factory=list)
    reports: list = field(default_factory=list)
    bytes_sent: int = 0
    bytes_received: int = 0
    closed: list[str] = field(default_factory=list)

    def replan(self) -> ShardAssignment | None:
        return self.replans.pop(0) if self.replans else None

    def report(self, progress) -> None:
        self.reports.append(progress)

    def close(self, reason: str = "done") -> None:
        self.closed.append(reason)


class Exchange:
    """The round engine as the epoch's work uses it: each hand-off is answered at the next
    settle with its own round (``finished`` from ``finish``)."""

    def __init__(self) -> None:
        self.base_round = -1
        self.handed: list[tuple[BarrierSync, bool]] = []
        self.pending: BarrierSync | None = None
        self.finish = False

    @property
    def arrived(self) -> bool:
        return self.pending is not None

    def hand_off(self, sync: BarrierSync, *, overlap: bool) -> None:
        assert self.pending is None, "at most one round in flight"
        self.handed.append((sync, overlap))
        self.pending = sync

    def settle(self) -> BarrierRecord | None:
        sync, self.pending = self.pending, None
        if sync is None:
            return None
        self.base_round = max(self.base_round, sync.round)
        return BarrierRecord(
            round=self.base_round, contributed=True, epoch=sync.epoch, finished=self.finish
        )


def work(overlap: bool = True, epochs: int = 3) -> tuple[EpochWork, Loop, Link, Exchange]:
    loop, link, exchange = Loop(epochs=epochs), Link(), Exchange()
    clock = iter(range(10_000)).__next__
    meter = PaceMeter(lambda: float(clock()))
    w = EpochWork(exchange, meter, loop, link, overlap=overlap)  # type: ignore[arg-type]
    return w, loop, link, exchange


def assignment(**kw) -> ShardAssignment:
    fields = {"epoch": 0, "start": 0, "stop": 40, "rounds": 2, "first_round": 1, "seed": 1}
    return ShardAssignment(**{**fields, **kw})


def test_taking_an_epoch_of_a_session_that_moved_on_jumps_to_its_epoch():
    w, loop, _, _ = work()
    sampler = w.take(assignment(epoch=2), 100)
    assert loop.jumped == [2] and len(sampler) == 40
    assert w.barriers is not None and w.barriers.rounds == 2 and w.assignment.epoch == 2
    assert loop.metrics[-1] == {"drift/shard_size": 40.0, "drift/epoch": 2}


def test_barriers_overlap_their_rounds_except_the_epochs_last():
    w, loop, _, exchange = work()
    w.sampler = w.take(assignment(), 100)
    w.loader = list(range(10))
    for _ in range(10):  # 10 steps of 4 samples: barriers after steps 5 and 10
        w.stepped()
        w.hold_due()
    rounds = [(s.round, overlap) for s, overlap in exchange.handed]
    assert rounds == [(1, True), (2, False)]
    assert [r.round for r in w.history] == [1, 2] and exchange.base_round == 2
    assert not w.finished and not loop.ended


def test_without_overlap_every_barrier_waits_and_an_upload_never_goes_back_in_rounds():
    w, _, _, exchange = work(overlap=False)
    exchange.base_round = 4  # answered with newer weights than the schedule's
    w.sampler = w.take(assignment(), 100)
    w.hold()
    assert exchange.handed[0][0].round == 5 and not exchange.handed[0][1]
    assert exchange.pending is None  # settled before returning


def test_a_re_plan_of_the_epoch_is_followed_only_when_newer():
    w, loop, link, _ = work()
    w.sampler = w.take(assignment(), 100)
    w.loader = w.sampler
    link.replans.append(assignment(revision=0, stop=80))  # not newer: ignored
    w.stepped()
    assert w.assignment.stop == 40 and loop.lengths == []
    link.replans.append(assignment(revision=1, segments=[(0, 20), (60, 80)]))
    w.stepped()
    assert w.assignment.revision == 1 and loop.lengths == [40]
    assert w.barriers.total_steps == 10  # 40 samples of the new plan, 4 a step
    link.replans.append(assignment(epoch=1, revision=2))  # another epoch's: ignored
    w.stepped()
    assert w.assignment.revision == 1


def test_a_session_over_before_the_last_epoch_ends_the_fit():
    w, loop, _, exchange = work()
    w.take(assignment(), 100)
    exchange.finish = True
    w.hold(blocking=True)
    assert w.finished and loop.ended and w.history[-1].finished
    w.hold()  # nothing more is handed off once finished
    assert len(exchange.handed) == 1


def test_a_session_finished_meanwhile_is_caught_up_to_its_final_weights():
    w, loop, _, exchange = work()
    exchange.base_round = 3
    w.finished_meanwhile(SessionFinished(final_round=5))
    assert [s.round for s, _ in exchange.handed] == [0]  # fetch the final weights
    assert w.finished and loop.ended
    w2, loop2, _, exchange2 = work()
    exchange2.base_round = 5
    w2.finished_meanwhile(SessionFinished(final_round=5))
    assert exchange2.handed == [] and w2.finished and loop2.ended


def test_a_progress_report_names_the_round_trained_towards():
    w, _, link, exchange = work()
    exchange.base_round = 6
    w.take(assignment(), 100)
    w.meter.progress_every = 0.0  # due at once
    for _ in range(2):  # the fit's first step only opens the report's window
        w.meter.batch(4)
        w.stepped()
    w.report(torch.device("cpu"))
    assert link.reports and link.reports[0].round == 7


def test_a_node_that_leaves_sends_its_last_steps_waits_for_their_round_and_says_goodbye():
    w, loop, link, exchange = work()
    w.sampler = w.take(assignment(), 100)
    w.loader = list(range(10))
    for _ in range(7):  # the barrier after step 5 is in flight; two steps since
        w.stepped()
        w.hold_due()
    w.leave("reached Trainer(max_steps=7)")
    assert [(s.round, overlap) for s, overlap in exchange.handed] == [(1, True), (2, False)]
    assert exchange.pending is None and w.history[-1].round == 2  # it holds round 2's weights
    assert w.finished and link.closed == ["reached Trainer(max_steps=7)"]
    assert not loop.ended  # Lightning's max_steps ends the fit
    w.hold_owed()
    w.hold_due()
    assert len(exchange.handed) == 2  # no barrier after leaving


def test_a_node_that_leaves_right_after_a_barrier_only_settles_its_round():
    w, _, link, exchange = work()
    w.sampler = w.take(assignment(), 100)
    w.loader = list(range(10))
    for _ in range(5):
        w.stepped()
        w.hold_due()
    w.leave("reached Trainer(max_steps=5)")
    assert [s.round for s, _ in exchange.handed] == [1] and exchange.pending is None
    assert w.finished and link.closed == ["reached Trainer(max_steps=5)"]
