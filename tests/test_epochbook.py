"""The epoch book: assignments, expected contributors, orphans handed on, positions."""

from __future__ import annotations

import msgspec

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.epochbook import EpochBook, round_end
from lightning_drift.protocol import ShardAssignment
from lightning_drift.scheduler import EpochPlan, Shard

A, B, C = ("a" * 64, "b" * 64, "c" * 64)
CFG = SessionConfig(dataset_size=1000, batch_size=10, epochs=2)


def book() -> EpochBook:
    plan = EpochPlan(
        epoch=0, rounds=5, first_round=1, dataset_size=1000, batch_size=10, total_pace=2.0,
        shards={A: Shard(A, 0, 500, 0.5, 10), B: Shard(B, 500, 1000, 0.5, 10)},
    )  # fmt: skip
    b = EpochBook()
    b.begin(plan, seed=1, final=False, revision=0)
    return b


def test_begin_assigns_every_shard_and_expects_every_live_node():
    b = book()
    assert [(a.start, a.stop, a.rounds) for a in b.assignments.values()] == [
        (0, 500, 5), (500, 1000, 5)
    ]  # fmt: skip
    assert b.expected(1, lambda n: True) == [A, B]
    assert b.expected(1, lambda n: n != B) == [A]
    assert b.expected(6, lambda n: True) == []  # past the plan
    assert b.next_epoch(3, epochs=2) is None and b.next_epoch(5, epochs=2) == 1
    assert b.next_epoch(5, epochs=1) is None


def test_a_lost_node_hands_on_the_rest_after_its_counted_upload():
    b = book()
    b.record(A, 0, 120, now=1.0, counted=2, batch_size=10)  # rounds 1-2 hold up to 200
    assert b.counted[A] == 120
    b.hand_on(A, open_round=3, arrived=False, batch_size=10)
    assert b.orphans[A].ranges == ((120, 500),) and A not in b.assignments
    late = b.late_assignment(C, 3, 1.0, (10, 10), CFG, revision=0)
    assert late is not None and late.ranges[0][0] >= 120 and C in b.late
    assert b.expected(3, lambda n: True) == [B]  # a late joiner's first round: if in time
    assert C in b.expected(4, lambda n: True)


def test_a_counted_upload_holds_at_most_the_work_of_its_rounds():
    """A node saying its round-1 upload holds its whole shard: round 1 of its work (100) is
    what the coordinator takes as trained, and what a lost node hands on starts there."""
    b = book()
    b.record(A, 0, 500, now=1.0, counted=1, batch_size=10)
    assert b.counted[A] == 100
    b.hand_on(A, open_round=2, arrived=False, batch_size=10)
    assert b.orphans[A].ranges == ((100, 500),)
    # The most one upload may weigh: the rounds since the last counted one, and a step.
    assert b.work_since(B, 1, 0, 1000, 10) == 110
    assert b.work_since(B, 3, 1, 1000, 10) == 210
    assert b.work_since(B, 9, 0, 1000, 10) == 500  # never more than the shard
    assert b.work_since(C, 1, 0, 1000, 10) == 1000  # no assignment: the dataset


def test_positions_move_on_by_the_pace_since_the_report():
    b = book()
    b.record(A, 0, 100, now=10.0)
    b.record(A, 0, 50, now=11.0)  # an older position is not a step back
    assert b.trained[A] == 100 and b.position(A, 15.0, pace=10.0) == 150
    assert b.reach(A, open_round=1, batch_size=10) == (200, True)


def test_round_end_says_what_comes_next():
    plan = book().plan
    assert round_end(3, plan, 2, None, "") == (False, False, "round 3 done")
    assert round_end(5, plan, 2, None, "")[:2] == (False, True)
    assert round_end(5, plan, 1, None, "")[:2] == (True, False)
    assert round_end(3, plan, 2, 3, "asked")[0]


def test_the_book_round_trips():
    b = book()
    b.record(A, 0, 100, now=1.0, counted=True)
    back = msgspec.convert(msgspec.to_builtins(b), EpochBook)
    assert back == b and isinstance(back.assignments[A], ShardAssignment)
