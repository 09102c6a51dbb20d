"""When a node meets the others: barrier points in optimizer steps (pure, no Lightning)."""

from __future__ import annotations

import math

import pytest

from lightning_drift.node.barriers import (
    EpochBarriers,
    barrier_step,
    steps_per_epoch,
    upload_round,
)


@pytest.mark.parametrize("total", [1, 2, 5, 7, 48, 100])
@pytest.mark.parametrize("rounds", [1, 2, 3, 8])
@pytest.mark.parametrize("sync_every", [None, 1, 3, 10])
def test_barrier_schedule_ends_every_epoch_on_its_last_step(total, rounds, sync_every):
    steps = [barrier_step(k, total, rounds, sync_every) for k in range(1, rounds + 1)]
    assert steps == sorted(steps)  # barriers come in order
    assert steps[-1] == total  # the epoch's last barrier is on its last step, always
    assert all(1 <= s <= total for s in steps) or total < rounds
    if sync_every is None:
        assert steps == [-(-k * total // rounds) for k in range(1, rounds + 1)]
    else:
        assert all(s <= k * sync_every for k, s in enumerate(steps[:-1], start=1))


def test_sync_every_moves_barriers_earlier_but_not_the_last():
    assert [barrier_step(k, 100, 2, 10) for k in (1, 2)] == [10, 100]
    assert [barrier_step(k, 100, 4) for k in (1, 2, 3, 4)] == [25, 50, 75, 100]


def _walk(plan: EpochBarriers, steps: int) -> list[tuple[int, int]]:
    """Step ``plan`` ``steps`` times as the strategy does; (step, scheduled round) per barrier."""
    held = []
    for _ in range(steps):
        plan.step()
        while plan.due():
            held.append((plan.steps, plan.scheduled_round))
            plan.held()
    return held


def test_an_epoch_holds_every_barrier_once_at_its_step_in_round_order():
    # Every small schedule, exhaustively: the walk holds exactly the barriers of barrier_step,
    # in order, each for the next global round, and the last one on the epoch's last step.
    for total in range(1, 25):
        for rounds in range(1, 9):
            for sync_every in (None, *range(1, 12)):
                plan = EpochBarriers(rounds, first_round=7, sync_every=sync_every)
                plan.total_steps = total
                held = _walk(plan, total)
                case = (total, rounds, sync_every)
                assert [s for s, _ in held] == [
                    barrier_step(k, total, rounds, sync_every) for k in range(1, rounds + 1)
                ], case
                assert [r for _, r in held] == list(range(7, 7 + rounds)), case
                assert held[-1][0] == total and plan.owed() == 0 and plan.due() == 0, case


def test_an_epoch_cut_short_owes_its_remaining_barriers():
    plan = EpochBarriers(rounds=4)
    plan.total_steps = 20
    assert [s for s, _ in _walk(plan, 11)] == [5, 10]
    assert plan.owed() == 2 and plan.due() == 0 and plan.scheduled_round == 2


def test_misuse_is_refused():
    plan = EpochBarriers(rounds=1)
    with pytest.raises(ValueError, match="total_steps"):
        plan.step()  # the epoch's length must be known by its first step
    assert plan.due() == 0  # nothing is due before the epoch's length is known
    plan.total_steps = 1
    plan.step()
    plan.held()
    with pytest.raises(ValueError, match="already held"):
        plan.held()


@pytest.mark.parametrize("batches", [1, 2, 7, 8, 9, 100])
@pytest.mark.parametrize("accumulate", [1, 2, 3, 8])
def test_steps_per_epoch_counts_optimizer_steps_under_accumulation(batches, accumulate):
    # Lightning steps at every accumulate-th batch and at the epoch's last (a short group).
    auto = steps_per_epoch(batches, shard_size=0, accumulate_grad_batches=accumulate)
    assert auto == math.ceil(batches / accumulate)
    # Manual optimization: the module steps once per batch, whatever the accumulation says.
    manual = steps_per_epoch(
        batches, shard_size=0, accumulate_grad_batches=accumulate, automatic=False
    )
    assert manual == batches


def test_steps_per_epoch_of_a_loader_without_length_and_of_an_empty_one():
    assert steps_per_epoch(math.inf, shard_size=30) == 30  # one step per sample of the shard
    assert steps_per_epoch(math.inf, shard_size=30, accumulate_grad_batches=4) == 8
    assert steps_per_epoch(0, shard_size=30) == 1  # never 0: the last barrier needs a step


def test_upload_round_only_moves_forward():
    assert upload_round(base_round=2, scheduled_round=3) == 3  # on schedule
    assert upload_round(base_round=0, scheduled_round=5) == 5  # joined late
    assert upload_round(base_round=6, scheduled_round=5) == 7  # answered with newer ones
    assert upload_round(base_round=-1, scheduled_round=0) == 0  # the start-up sync


def test_a_stop_turns_the_epochs_remaining_barriers_into_one_final_barrier_due_now():
    plan = EpochBarriers(rounds=4, first_round=9, total_steps=20)
    for _ in range(5):
        plan.step()
    assert plan.due() == 1
    plan.held()  # round 9, at step 5
    plan.step()
    assert plan.due() == 0 and plan.owed() == 3 and not plan.stopped
    plan.finish_at(10)
    plan.finish_at(12)  # the first decision stands
    assert plan.stopped and plan.due() == 1 and plan.owed() == 1
    assert plan.scheduled_round == 10 == upload_round(8, plan.scheduled_round)
    plan.held()
    assert plan.due() == 0 and plan.owed() == 0
    with pytest.raises(ValueError, match="final barrier"):
        plan.held()


def test_a_stop_before_the_first_step_is_due_at_once():
    plan = EpochBarriers(rounds=3, first_round=4)  # total_steps not known yet
    assert plan.due() == 0
    plan.finish_at(4)
    assert plan.due() == 1
def test_a_re_plan_spreads_the_barriers_left_from_the_last_one_held():
    # 4 barriers over 20 steps: 5, 10, 15, 20. After barrier 1 (step 5) and 2 more steps the
    # epoch grows to 35 steps: the 3 barriers left share steps 5..35: 15, 25, 35.
    plan = EpochBarriers(rounds=4)
    plan.total_steps = 20
    assert [s for s, _ in _walk(plan, 7)] == [5]
    plan.retarget(35)
    assert [plan.barrier_step(k) for k in (2, 3, 4)] == [15, 25, 35]
    assert [s for s, _ in _walk(plan, 28)] == [15, 25, 35]
    assert plan.owed() == 0


def test_a_re_plan_that_shrinks_the_epoch_makes_a_passed_barrier_due_at_once():
    plan = EpochBarriers(rounds=3)
    plan.total_steps = 30
    assert [s for s, _ in _walk(plan, 12)] == [10]
    plan.retarget(14)  # barriers 2 and 3 now at 12 and 14: barrier 2 is due now
    assert plan.due() == 1
    plan.held()
    assert [s for s, _ in _walk(plan, 2)] == [14]
    assert plan.owed() == 0


@pytest.mark.parametrize("sync_every", [None, 1, 4])
def test_every_re_plan_still_ends_the_epoch_on_its_last_step(sync_every):
    # Exhaustively over small cases: a re-plan after any barrier, to any new length, holds
    # every barrier once, in round order, the last on the new last step.
    for total in range(1, 14):
        for rounds in range(1, 6):
            for held_before in range(rounds):
                for new_total in range(1, 20):
                    plan = EpochBarriers(rounds, first_round=3, sync_every=sync_every)
                    plan.total_steps = total
                    held = []
                    while len(held) < held_before:
                        plan.step()
                        while plan.due() and len(held) < held_before:
                            held.append((plan.steps, plan.scheduled_round))
                            plan.held()
                    plan.retarget(max(new_total, plan.steps))
                    while True:
                        while plan.due():  # barriers whose new step has passed come at once
                            held.append((plan.steps, plan.scheduled_round))
                            plan.held()
                        if plan.steps >= plan.total_steps:
                            break
                        plan.step()
                    case = (total, rounds, held_before, new_total)
                    assert [r for _, r in held] == list(range(3, 3 + rounds)), case
                    assert held[-1][0] == plan.total_steps, case
                    assert plan.owed() == 0, case
