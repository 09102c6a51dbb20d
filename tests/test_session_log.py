"""The coordinator's session log: round records become metrics, written by Lightning's own
loggers and read back with each logger's own reader (the csv module, TensorBoard's)."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import pytest

from lightning_drift.coordinator.logs import (
    NodeRound,
    RoundRecord,
    SessionLog,
    metric_label,
    round_metrics,
)


def record(completed_round: int, loss_a: float | None, loss_b: float | None) -> RoundRecord:
    nodes = (
        NodeRound("a-11111111", 30, loss_a, 120.0, 0.5, 1000),
        NodeRound("b-22222222", 10, loss_b, 40.0, 0.0, 1000),
    )
    return RoundRecord(
        completed_round=completed_round,
        epoch=0,
        nodes=nodes,
        live_nodes=2,
        round_s=2.0,
        aggregation_s=0.1,
        bytes_received=2000,
        bytes_sent=2000,
    )


def test_round_metrics_weigh_reported_losses_by_samples():
    m = round_metrics(record(3, 2.0, 4.0))
    assert m["round/loss"] == pytest.approx((30 * 2.0 + 10 * 4.0) / 40)
    assert m["round/nodes"] == 2 and m["round/samples"] == 40
    assert m["node/a-11111111/loss"] == 2.0 and m["node/b-22222222/samples_per_s"] == 40.0
    assert m["round/barrier_wait_max_s"] == 0.5
    none = round_metrics(record(3, None, None))
    assert math.isnan(none["round/loss"]) and "node/a-11111111/loss" not in none


def test_metric_labels_keep_only_safe_characters():
    assert metric_label("gpu box/../[red]x", "abcdef0123456789") == "gpu_box_.._red_x-abcdef01"
    assert metric_label("", "abcdef0123456789") == "abcdef01"


def test_csv_and_tensorboard_logs_hold_one_row_and_one_point_per_round(tmp_path: Path):
    log = SessionLog(["csv", "tensorboard"], tmp_path, run="session-x", hparams={"epochs": 2})
    log.open()
    for r, loss in ((1, 3.0), (2, 2.5), (3, 2.0)):
        log.log_round(record(r, loss, loss + 1))
    log.close()
    assert log.problems == []

    (metrics,) = tmp_path.glob("csv/session-x/version_*/metrics.csv")
    with metrics.open() as f:
        rows = [row for row in csv.DictReader(f) if row["round/loss"]]
    assert [int(row["step"]) for row in rows] == [1, 2, 3]
    assert [float(row["round/loss"]) for row in rows] == [3.25, 2.75, 2.25]

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (events,) = {p.parent for p in tmp_path.glob("tensorboard/session-x/version_*/events.*")}
    acc = EventAccumulator(str(events))
    acc.Reload()
    points = acc.Scalars("round/loss")
    assert [p.step for p in points] == [1, 2, 3]
    assert [p.value for p in points] == pytest.approx([3.25, 2.75, 2.25])
    assert [p.step for p in acc.Scalars("node/a-11111111/samples_per_s")] == [1, 2, 3]


def test_a_logger_that_cannot_be_made_is_left_out_not_fatal(tmp_path: Path):
    log = SessionLog(["csv", "no.such.LoggerClass"], tmp_path, run="r")
    log.open()
    log.log_round(record(1, 1.0, 1.0))
    log.close()
    assert len(log.problems) == 1 and "no.such.LoggerClass" in log.problems[0]
    assert list(tmp_path.glob("csv/r/version_*/metrics.csv"))


def test_none_logs_nothing(tmp_path: Path):
    log = SessionLog(["none"], tmp_path, run="r")
    log.open()
    log.log_round(record(1, 1.0, 1.0))
    log.close()
    assert not log.enabled and list(tmp_path.iterdir()) == []
