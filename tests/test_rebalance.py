"""Re-planning the rest of an epoch from measured paces (pure: no clock, no I/O)."""

from __future__ import annotations

import itertools
import math

import pytest

from lightning_drift.coordinator.replans import HORIZON_S, NodeWork, finishing_times, rebalance
from lightning_drift.coordinator.segments import normalize, split, total


def _positions(segments) -> list[int]:
    return [i for a, b in segments for i in range(a, b)]


def test_segment_helpers_split_and_join_ranges():
    segs = ((0, 5), (10, 12), (12, 20))
    assert total(segs) == 15
    assert split(segs, 6) == (((0, 5), (10, 11)), ((11, 12), (12, 20)))
    assert split(segs, 0) == ((), segs)
    assert split(segs, 99) == (segs, ())
    assert normalize(((0, 5), (5, 5), (5, 9), (12, 14))) == ((0, 9), (12, 14))


def test_a_node_three_times_as_fast_gets_three_times_the_rest():
    # Planned 1:1 from calibration; measured 3:1. After the move the two finish together.
    work = [
        NodeWork("fast", ((0, 600),), consumed=40, pace=30.0),
        NodeWork("slow", ((600, 1200),), consumed=20, pace=10.0),
    ]
    plan = rebalance(work, rounds_left=10, batch_size=10)
    assert plan and plan.moved > 0
    assert plan.segments["slow"][0][0] == 600 and plan.segments["fast"][0] == (0, 600)
    assert "apart at measured rates; moved" in plan.reason
    after = [NodeWork(w.node, plan.segments[w.node], w.consumed, w.pace) for w in work]
    t = finishing_times(after)
    assert abs(t["fast"] - t["slow"]) / t["slow"] < 0.05
    fast_rest = after[0].remaining
    slow_rest = after[1].remaining
    assert 2.8 < fast_rest / slow_rest < 3.2


@pytest.mark.parametrize(
    "work, rounds_left, reason",
    [
        ([NodeWork("a", ((0, 10),), 0, 1.0)], 9, "fewer than two nodes"),
        (
            [NodeWork("a", ((0, 500),), 0, 3.0), NodeWork("b", ((500, 1000),), 0, 1.0)],
            0,
            "0 round(s) of the epoch left, fewer than 1",
        ),
        (
            [NodeWork("a", ((0, 500),), 0, 3.0), NodeWork("bbbbbbbbbb", ((500, 1000),), 0, None)],
            9,
            "no measured rate yet for bbbbbbbb",
        ),
        (
            [NodeWork("a", ((0, 500),), 0, 10.0), NodeWork("b", ((500, 1000),), 0, 10.4)],
            9,
            "balanced: finishing times within 4% of each other",
        ),
        (
            [NodeWork("a", ((0, 500),), 500, 10.0), NodeWork("b", ((500, 1000),), 500, 1.0)],
            9,
            "no work left in the epoch",
        ),
        (
            # The slow node's rest is inside its protected margin: what it may have trained
            # since its report (7 s at its pace) and two batches.
            [NodeWork("a", ((0, 500),), 0, 10.0), NodeWork("b", ((500, 1000),), 480, 0.3)],
            9,
            "nothing can move",
        ),
        (
            # The fast node is at the end of its list: its epoch may be over, it takes nothing.
            [NodeWork("a", ((0, 500),), 499, 10.0), NodeWork("b", ((500, 1000),), 0, 1.0)],
            9,
            "nothing can move",
        ),
    ],
)
def test_nothing_moves_and_the_reason_says_why(work, rounds_left, reason):
    plan = rebalance(work, rounds_left, batch_size=10)
    assert not plan and plan.segments == {} and plan.moved == 0
    assert reason in plan.reason


def test_the_same_measurements_give_the_same_plan():
    work = [
        NodeWork("c", ((700, 1000),), 10, 5.0),
        NodeWork("a", ((0, 300),), 10, 20.0),
        NodeWork("b", ((300, 700),), 10, 7.0),
    ]
    assert rebalance(work, 8, batch_size=4) == rebalance(list(work), 8, batch_size=4)


_LAYOUTS = {
    # Each node's list: one range, a list grown by an earlier re-plan, one cut short.
    2: [
        (((0, 300),), ((300, 600),)),
        (((0, 300), (500, 600)), ((300, 500),)),
        (((0, 120),), ((120, 600),)),
    ],
    3: [
        (((0, 200),), ((200, 400),), ((400, 600),)),
        (((0, 100), (550, 600)), ((100, 400),), ((400, 550),)),
    ],
}


@pytest.mark.parametrize("n", [2, 3])
def test_every_re_plan_keeps_each_position_with_exactly_one_node(n):
    # Exhaustive over small layouts, trained prefixes, paces, rounds left and batch sizes:
    # positions are neither lost nor doubled, what a node has trained (plus its protected
    # margin) stays its own, donors only lose a tail, receivers only gain one, moves are whole
    # batches, and a plan always narrows the spread of finishing times.
    names = ["n0", "n1", "n2"][:n]
    paces = [1.0, 2.0, 3.0, 7.0] if n == 2 else [1.0, 3.0, 7.0]
    plans = 0
    for layout in _LAYOUTS[n]:
        for consumed in itertools.product([0, 30, 90], repeat=n):
            for pace in itertools.product(paces, repeat=n):
                for rounds_left in (1, 3, 12):
                    for batch in (1, 8):
                        work = [
                            NodeWork(name, segs, min(c, total(segs)), r)
                            for name, segs, c, r in zip(names, layout, consumed, pace, strict=True)
                        ]
                        plan = rebalance(work, rounds_left, batch_size=batch)
                        case = (layout, consumed, pace, rounds_left, batch)
                        if not plan:
                            continue
                        plans += 1
                        _check(work, plan, rounds_left, batch, case)
    assert plans > 50  # the grid exercises real moves, not only refusals


def _check(work, plan, rounds_left, batch, case):
    before = sorted(p for w in work for p in _positions(w.segments))
    new = {w.node: plan.segments.get(w.node, w.segments) for w in work}
    after = sorted(p for segs in new.values() for p in _positions(segs))
    assert after == before, case  # a partition of the same positions
    lost = gained = 0
    for w in work:
        old, now = _positions(w.segments), _positions(new[w.node])
        if len(now) < len(old):  # a donor: keeps a prefix, at least its protected margin
            assert now == old[: len(now)], case
            keep = math.ceil(w.pace * HORIZON_S) + 2 * batch
            assert len(now) >= min(len(old), w.consumed + keep), case
            lost += len(old) - len(now)
        elif len(now) > len(old):  # a receiver: keeps its list, gains a tail
            assert now[: len(old)] == old, case
            assert w.remaining > 0, case
            gained += len(now) - len(old)
        else:
            assert now == old, case
        assert (len(now) - len(old)) % batch == 0, case
    assert lost == gained == plan.moved > 0, case
    spread = _spread(finishing_times(work))
    moved = [NodeWork(w.node, new[w.node], w.consumed, w.pace) for w in work]
    assert _spread(finishing_times(moved)) < spread, case


def _spread(times: dict[str, float]) -> float:
    lo, hi = min(times.values()), max(times.values())
    return float("inf") if lo <= 0 else hi / lo - 1


@pytest.mark.parametrize("can_receive, moves", [(None, False), (True, True), (False, False)])
def test_a_fast_node_held_at_a_barrier_takes_work_when_the_caller_says_it_can(can_receive, moves):
    # The fast node's rest (100 samples) is inside its margin (300/s x 7 s): by the margin
    # alone it may be at the end of its epoch. The session knows better: rounds are global,
    # and a node held at a barrier that is not its epoch's last trains its tail.
    work = [
        NodeWork("fast", ((0, 200),), consumed=100, pace=300.0, can_receive=can_receive),
        NodeWork("slow", ((200, 1200),), consumed=100, pace=10.0, can_receive=True),
    ]
    plan = rebalance(work, rounds_left=5, batch_size=10)
    assert bool(plan) is moves, plan.reason
    if moves:
        assert total(plan.segments["fast"]) > 200 > 0 < total(plan.segments["slow"]) < 1000
        got = sorted(_positions(plan.segments["fast"]) + _positions(plan.segments["slow"]))
        assert got == list(range(1200))


def test_a_node_keeping_to_its_plan_gives_nothing_however_fast_another_looks():
    """An honest node measured at the pace its work was sized by keeps its work when another
    node looks a hundred times as fast; a node that fell behind its plan gives to it."""
    work = [
        NodeWork("honest", ((0, 600),), consumed=40, pace=10.0, keeps_plan=True),
        NodeWork("claims", ((600, 1200),), consumed=40, pace=1000.0, can_receive=True),
    ]
    plan = rebalance(work, rounds_left=10, batch_size=10)
    assert not plan and "keep to their plans" in plan.reason
    behind = [NodeWork(w.node, w.segments, w.consumed, w.pace, w.can_receive) for w in work]
    assert rebalance(behind, rounds_left=10, batch_size=10).segments["claims"]


def test_three_nodes_only_the_one_behind_its_plan_gives():
    work = [
        NodeWork("a", ((0, 400),), consumed=0, pace=10.0, keeps_plan=True),
        NodeWork("b", ((400, 800),), consumed=0, pace=5.0),  # behind: half its planned pace
        NodeWork("c", ((800, 1200),), consumed=0, pace=40.0, keeps_plan=True),
    ]
    plan = rebalance(work, rounds_left=10, batch_size=10)
    assert plan and total(plan.segments["b"]) < 400
    assert "a" not in plan.segments or total(plan.segments["a"]) >= 400
    moved = {n: total(s) for n, s in plan.segments.items()}
    assert sum(moved.values()) + (400 if "a" not in moved else 0) == 1200
