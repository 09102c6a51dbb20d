"""The pace book: one average per pace, reports bounded by measurements."""

from __future__ import annotations

import msgspec
import pytest

from lightning_drift.coordinator.boundary import PACE_FACTOR
from lightning_drift.coordinator.config import MEASURED_SMOOTHING, PACE_SMOOTHING
from lightning_drift.coordinator.pacebook import PaceBook, ema, trained_for


def test_ema_starts_at_the_first_value():
    assert ema(0.0, 70.0, 0.5) == 70.0
    assert ema(50.0, 70.0, 0.5) == 60.0


def test_a_measurement_is_at_most_a_rounds_work_over_the_elapsed_time_and_averaged_once():
    b = PaceBook()
    b.measure("a", 500, work=100.0, elapsed=2.0)  # carried over work: counts one round
    assert b.of("a").measured == 50.0
    b.measure("a", 100, work=100.0, elapsed=1.0)
    assert b.of("a").measured == pytest.approx(ema(50.0, 100.0, MEASURED_SMOOTHING))
    b.measure("a", 0, work=100.0, elapsed=1.0)  # no samples, no measurement
    b.measure("a", 10, work=100.0, elapsed=0.0)  # the round's clock has not started
    assert b.of("a").measured == pytest.approx(ema(50.0, 100.0, MEASURED_SMOOTHING))


def test_reports_are_bounded_by_the_measured_pace_and_move_nothing():
    b = PaceBook()
    b.measure("a", 100, work=100.0, elapsed=4.0)  # 25 samples/s
    b.report("a", 1e6)
    assert b.of("a").reported == pytest.approx(25.0 * PACE_FACTOR)
    b.report("a", 30.0)
    assert b.of("a").smoothed == pytest.approx(ema(25.0 * PACE_FACTOR, 30.0, PACE_SMOOTHING))
    assert b.for_replan("a") == 25.0  # re-plans go by what was measured, never by reports
    b.report("b", 1e6)
    assert b.for_replan("b") is None  # a claim alone is no pace


def test_deadline_paces_use_measured_then_the_median_floor_never_reports():
    b = PaceBook()
    b.measure("a", 100, work=100.0, elapsed=1.0)  # 100 samples/s: the median
    b.report("b", 1.0)  # a tiny claim: not read
    paces = b.for_deadline(["a", "b", "c"], scheduler=None)
    assert paces["a"].pace == 100.0 and not paces["a"].estimated
    assert paces["b"].estimated and paces["b"].pace == pytest.approx(100.0 / PACE_FACTOR)
    assert paces["c"].estimated and paces["c"].pace == pytest.approx(100.0 / PACE_FACTOR)
    assert PaceBook().for_deadline(["c"], scheduler=None) == {}  # nothing known: no deadline


def test_the_pace_book_round_trips():
    b = PaceBook()
    b.measure("a", 100, work=100.0, elapsed=1.0)
    b.report("a", 90.0)
    assert msgspec.convert(msgspec.to_builtins(b), PaceBook) == b


def test_the_time_trained_is_the_nodes_word_within_what_the_coordinator_saw():
    # least: its round's start to its arrival; most: its previous counted upload to it.
    assert trained_for(10.0, 0.1, 10.2) == 10.0  # overlapped: it trained before its round
    assert trained_for(0.0, 0.1, 10.2) == 0.1  # says nothing: the least, as before
    assert trained_for(1e-9, 3.0, 10.0) == 3.0  # claims to be fast: not believed
    assert trained_for(1e9, 3.0, 10.0) == 10.0  # claims to be slow: at most what it could be
    assert trained_for(5.0, 3.0, 1.0) == 3.0  # most below least (a restart's clock): least
