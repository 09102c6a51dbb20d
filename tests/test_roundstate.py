"""The round decision as a pure function: every case from a state, paces and a config."""

from __future__ import annotations

import pytest

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.pacebook import DeadlinePace
from lightning_drift.coordinator.roundstate import (
    RoundFacts,
    RoundState,
    deadline,
    hard_deadline,
    round_decision,
    upload_by_base,
)
from lightning_drift.coordinator.verdicts import Verdict

A, B, C = ("a" * 64, "b" * 64, "c" * 64)
CFG = SessionConfig(dataset_size=100, quorum=0.5, deadline_floor=2.0, deadline_margin=1.5)


def facts(*expected: str, planned: bool = True) -> RoundFacts:
    return RoundFacts(3, False, planned, expected, {n: 100.0 for n in expected})


def test_all_arrived_completes_in_arrival_order():
    st = RoundState(arrivals={B: 10, A: 20})
    d = round_decision(0.0, st, facts(A, B), {}, CFG)
    assert d.complete and d.contributors == ((B, 10), (A, 20))
    assert "all 2 live node(s) arrived" in d.reason


def test_the_deadline_is_the_slowest_missing_nodes_work_over_its_pace():
    st = RoundState(started=10.0, arrivals={A: 10})
    paces = {B: DeadlinePace(10.0), C: DeadlinePace(50.0, estimated=True)}
    assert deadline(st, facts(A, B, C), paces, CFG)[0] == pytest.approx(10.0 + 1.5 * 100 / 10)
    d = round_decision(20.0, st, facts(A, B, C), paces, CFG)
    assert not d.complete and "deadline in 5.0s" in d.reason and "estimated" in d.reason


def test_past_the_deadline_a_quorum_completes_and_leaves_the_rest_behind():
    st = RoundState(started=0.0, arrivals={A: 10})
    paces = {B: DeadlinePace(100.0)}
    d = round_decision(5.0, st, facts(A, B), paces, CFG)
    assert d.complete and d.missing == (B,) and "quorum 1/2 (needed 1)" in d.reason
    d = round_decision(5.0, st, facts(A, B, C), {B: paces[B], C: paces[B]}, CFG)
    assert not d.complete and "quorum needs 2" in d.reason


def test_no_deadline_while_a_missing_pace_is_unknown_nor_while_aggregating():
    st = RoundState(arrivals={A: 10})  # 1 of 3: no quorum
    d = round_decision(20.0, st, facts(A, B, C), {}, CFG)
    assert not d.complete and "no deadline yet" in d.reason and not d.drop
    st.aggregating = 3
    assert "being aggregated" in round_decision(0.0, st, facts(A), {}, CFG).reason
    assert "start gate" in round_decision(0.0, RoundState(), facts(planned=False), {}, CFG).reason


def test_the_round_clock_and_the_next_round():
    st = RoundState(arrivals={A: 1}, left_out={B: "bad"}, aggregating=3)
    st.restart_clock(100.0, 15.0)
    assert (st.started, st.grace) == (115.0, 15.0)
    st.next_round(200.0)
    assert (st.started, st.grace, st.aggregating, st.arrivals, st.left_out) == (
        200.0, 0.0, None, {}, {}
    )  # fmt: skip


def test_an_upload_by_its_base():
    assert upload_by_base(3, 2, delta=False, base_round=-1).kind is Verdict.OPEN
    assert upload_by_base(3, 2, delta=True, base_round=-1).code == "bad_upload"
    assert upload_by_base(3, 2, delta=True, base_round=1).kind is Verdict.LEFT_OUT
    st = RoundState()
    v = st.verdict(3, A, lambda: False, completed=2, finished=False, has_weights=True,
                   planned=True, delta=True, base_round=1)  # fmt: skip
    assert v.kind is Verdict.LEFT_OUT and A in st.left_out
    v = st.verdict(3, A, lambda: False, completed=2, finished=False, has_weights=True,
                   planned=True, delta=True, base_round=2)  # fmt: skip
    assert v.kind is Verdict.LATE  # left out of this round: asked again, still not counted


def test_without_a_quorum_the_missing_are_dropped_at_the_hard_deadline():
    """1 of 3 arrived, quorum needs 2: past the deadline (2 s) the round waits, until the hard
    deadline (the deadline and twice as long again, at least a heartbeat timeout: 2 + 15)
    drops the nodes still missing, so the one that arrived is not held for ever."""
    st = RoundState(started=0.0, arrivals={A: 10})
    paces = {B: DeadlinePace(100.0), C: DeadlinePace(100.0)}
    assert hard_deadline(2.0, st, CFG) == 2.0 + CFG.heartbeat_timeout
    assert hard_deadline(20.0, st, CFG) == 60.0
    d = round_decision(16.9, st, facts(A, B, C), paces, CFG)
    assert not d.complete and not d.drop and "quorum needs 2" in d.reason
    d = round_decision(17.0, st, facts(A, B, C), paces, CFG)
    assert not d.complete and d.drop == (B, C) and "hard deadline passed" in d.reason
    # With its quorum the round completes at the deadline and drops nobody.
    d = round_decision(100.0, st, facts(A, B), {B: paces[B]}, CFG)
    assert d.complete and not d.drop


def test_while_a_pace_is_unknown_the_hard_deadline_is_the_deadline_too():
    """A missing pace is unknown and no quorum has arrived: no deadline, but a hard one all
    the same, counted from the round's start (max(floor, heartbeat timeout), three times):
    the missing are dropped then."""
    limit = 3 * max(CFG.deadline_floor, CFG.heartbeat_timeout)
    st = RoundState(started=5.0, arrivals={A: 10})
    d = round_decision(5.0 + limit - 0.1, st, facts(A, B, C), {}, CFG)
    assert not d.complete and not d.drop and "no deadline yet" in d.reason
    d = round_decision(5.0 + limit, st, facts(A, B, C), {}, CFG)
    assert not d.complete and d.drop == (B, C), d.reason
    # A restart's reconnect grace moves the start, and with it the hard deadline.
    st = RoundState(arrivals={A: 10})
    st.restart_clock(100.0, grace=30.0)
    assert not round_decision(130.0 + limit - 0.1, st, facts(A, B, C), {}, CFG).drop
    assert round_decision(130.0 + limit, st, facts(A, B, C), {}, CFG).drop == (B, C)


def test_once_a_quorum_arrived_the_deadline_is_a_margin_over_the_time_it_took():
    """A quorum (A, 8 s into the round) bounds the deadline at 1.5 x 8 s, whatever the
    missing node's pace says (a slow measured pace, or none); never past deadline_max."""
    st = RoundState(started=100.0)
    st.arrived(A, 10, 108.0)
    assert st.took == {A: 8.0}
    slow = {B: DeadlinePace(0.01)}  # 100 samples a round: over two hours by its pace
    assert deadline(st, facts(A, B), slow, CFG)[0] == pytest.approx(112.0)
    assert deadline(st, facts(A, B), {}, CFG)[0] == pytest.approx(112.0)  # pace unknown
    d = round_decision(112.0, st, facts(A, B), slow, CFG)
    assert d.complete and d.missing == (B,) and "left behind" in d.reason
    # Without a quorum (1 of 3) the pace rules, but no further than deadline_max.
    capped = SessionConfig(dataset_size=100, quorum=0.5, deadline_floor=2.0, deadline_max=60.0)
    paces = {B: DeadlinePace(0.01), C: DeadlinePace(0.01)}
    assert deadline(st, facts(A, B, C), paces, capped)[0] == pytest.approx(160.0)
    assert deadline(st, facts(A, B, C), paces, CFG)[0] == pytest.approx(100.0 + 3600.0)
    # A fast quorum never shortens the deadline below the floor.
    st = RoundState(started=0.0)
    st.arrived(A, 10, 0.5)
    assert deadline(st, facts(A, B), slow, CFG)[0] == pytest.approx(CFG.deadline_floor)
    st.next_round(5.0)
    assert st.took == {} and st.arrivals == {}


def test_while_nobody_has_arrived_nobody_is_held_and_nobody_is_dropped():
    st = RoundState(started=0.0)
    d = round_decision(1e9, st, facts(A, B), {A: DeadlinePace(100.0)}, CFG)
    assert not d.complete and not d.drop and "0/2 arrived" in d.reason


def test_a_round_nobody_is_expected_in_waits_instead_of_completing_empty():
    d = round_decision(1e9, RoundState(), facts(), {}, CFG)
    assert not d.complete and not d.drop and "0/0 arrived" in d.reason


def test_only_an_expected_arrival_holds_the_round_to_its_hard_deadline():
    """A late joiner's first upload is not counted (the round does not expect it): it does
    not make the nodes the round waits for droppable."""
    st = RoundState(started=0.0, arrivals={C: 10})
    d = round_decision(1e9, st, facts(A, B), {A: DeadlinePace(100.0)}, CFG)
    assert not d.complete and not d.drop, d.reason
