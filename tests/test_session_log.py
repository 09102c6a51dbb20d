"""The coordinator's session log: round records become metrics, written by Lightning's own
loggers and read back with each logger's own reader (the csv module, TensorBoard's); its
columns are keyed by node id and bounded, so its size grows linearly with the rounds."""

from __future__ import annotations

import csv
import hashlib
import logging
import math
from pathlib import Path

import pytest

from lightning_drift.coordinator.logs import (
    NodeColumns,
    NodeRound,
    RoundRecord,
    SessionLog,
    node_column_cap,
    round_metrics,
)

A, B = "11111111" + "a" * 56, "22222222" + "b" * 56
LABELS = {A: "11111111", B: "22222222"}


def record(completed_round: int, loss_a: float | None, loss_b: float | None) -> RoundRecord:
    nodes = (
        NodeRound(A, "a", 30, loss_a, 120.0, 0.5, 1000),
        NodeRound(B, "b", 10, loss_b, 40.0, 0.0, 1000),
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
    m = round_metrics(record(3, 2.0, 4.0), LABELS)
    assert m["round/loss"] == pytest.approx((30 * 2.0 + 10 * 4.0) / 40)
    assert m["round/nodes"] == 2 and m["round/samples"] == 40
    assert m["node/11111111/loss"] == 2.0 and m["node/22222222/samples_per_s"] == 40.0
    assert m["round/barrier_wait_max_s"] == 0.5 and m["round/nodes_omitted"] == 0
    none = round_metrics(record(3, None, None), LABELS)
    assert math.isnan(none["round/loss"]) and "node/11111111/loss" not in none


def test_a_node_without_a_label_counts_only_in_the_rounds_totals():
    m = round_metrics(record(3, 2.0, 4.0), {A: "11111111"})
    assert not any(k.startswith("node/22222222") for k in m)
    assert m["round/nodes"] == 2 and m["round/samples"] == 40 and m["round/nodes_omitted"] == 1
    assert m["round/loss"] == pytest.approx((30 * 2.0 + 10 * 4.0) / 40)


# -- columns keyed by node id, bounded ------------------------------------------------------


def test_columns_are_keyed_by_node_id_and_capped_and_each_node_is_new_once():
    # Prepare: room for three nodes
    cols = NodeColumns(3)

    # Execute / Assert: labels are short ids; a node seen again is not new
    assert cols.assign([A, B]) == ([A, B], [])
    assert cols.assign([B, A]) == ([], [])
    c, d, e = "3" * 64, "4" * 64, "5" * 64
    assert cols.assign([c, d, e]) == ([c], [d, e])  # full after c: d and e are left out
    assert cols.assign([d, e, A]) == ([], [])  # said once
    assert cols.labels == {A: "11111111", B: "22222222", c: "33333333"}


def test_a_node_that_shares_a_short_id_gets_a_longer_label():
    cols = NodeColumns(4)
    twin, triplet = "11111111" + "c" * 56, "11111111" + "c" * 8 + "d" * 48
    cols.assign([A, twin, triplet])
    assert cols.labels == {A: "11111111", twin: "11111111" + "c" * 8, triplet: triplet}


def test_the_nodes_said_to_be_left_out_are_remembered_up_to_the_cap():
    cols = NodeColumns(2)
    cols.assign([A, B])
    churn = [f"{k:064x}" for k in range(10)]
    assert cols.assign(churn) == ([], churn)
    # Only the last two are remembered: an older one is said again, a recent one is not.
    assert cols.assign([churn[-1], churn[0]]) == ([], [churn[0]])


def test_the_cap_is_derived_from_max_nodes():
    assert node_column_cap(64) == 128 and node_column_cap(1) == 2


def test_csv_and_tensorboard_logs_hold_one_row_and_one_point_per_round(tmp_path: Path):
    log = SessionLog(
        ["csv", "tensorboard"], tmp_path, run="session-x", hparams={"epochs": 2}, max_nodes=4
    )
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
    assert [p.step for p in acc.Scalars("node/11111111/samples_per_s")] == [1, 2, 3]


def test_a_logger_that_cannot_be_made_is_left_out_not_fatal(tmp_path: Path):
    log = SessionLog(["csv", "no.such.LoggerClass"], tmp_path, run="r", max_nodes=4)
    log.open()
    log.log_round(record(1, 1.0, 1.0))
    log.close()
    assert len(log.problems) == 1 and "no.such.LoggerClass" in log.problems[0]
    assert list(tmp_path.glob("csv/r/version_*/metrics.csv"))


def test_none_logs_nothing(tmp_path: Path):
    log = SessionLog(["none"], tmp_path, run="r", max_nodes=4)
    log.open()
    log.log_round(record(1, 1.0, 1.0))
    log.close()
    assert not log.enabled and list(tmp_path.iterdir()) == []


# -- the log's size grows linearly with the rounds -----------------------------------------


def churn(completed_round: int) -> RoundRecord:
    """A round of a session where nodes come and go: A steady, B renaming itself every round,
    and a new key with a new long name every round."""
    fresh = key(completed_round)
    nodes = (
        NodeRound(A, "a", 30, 2.0, 120.0, 0.5, 1000),
        NodeRound(B, f"b-renamed-{completed_round}", 10, 3.0, 40.0, 0.1, 1000),
        NodeRound(fresh, f"evil-{completed_round}-" + "x" * 40, 10, 1.0, 40.0, 0.2, 1000),
    )
    return RoundRecord(completed_round, 0, nodes, 3, 1.0, 0.1, 3000, 3000)


def key(k: int) -> str:
    """A node id (a key) of its own for every ``k``."""
    return hashlib.sha256(str(k).encode()).hexdigest()


def csv_log(directory: Path, rounds: int, max_nodes: int) -> Path:
    log = SessionLog(["csv"], directory, run="s", max_nodes=max_nodes)
    log.open()
    for r in range(1, rounds + 1):
        log.log_round(churn(r))
    log.close()
    assert log.problems == []
    (metrics,) = directory.glob("csv/s/version_*/metrics.csv")
    return metrics


def growth(tmp_path: Path, rounds: int, max_nodes: int) -> float:
    """Bytes the log grew by in its second ``rounds`` rounds over those of its first."""
    first = csv_log(tmp_path / f"first-{max_nodes}", rounds, max_nodes).stat().st_size
    both = csv_log(tmp_path / f"both-{max_nodes}", 2 * rounds, max_nodes).stat().st_size
    return (both - first) / first


def test_renames_and_new_keys_add_no_columns_past_the_cap_and_the_log_grows_linearly(
    tmp_path: Path, caplog
):
    # Prepare: --max-nodes 2, so four nodes get columns: A, B and the first two new keys
    caplog.set_level(logging.INFO, logger="lightning_drift")
    rounds = 60

    # Execute
    metrics = csv_log(tmp_path / "log", 2 * rounds, max_nodes=2)
    said = [r.getMessage() for r in caplog.records if "session_log.node_left_out" in r.getMessage()]
    ratio = growth(tmp_path, rounds, max_nodes=2)

    # Assert: the header is bounded and names no node; every round has its row
    with metrics.open() as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        header = reader.fieldnames or []
    node_columns = [c for c in header if c.startswith("node/")]
    labels = {c.split("/")[1] for c in node_columns}
    assert labels == {"11111111", "22222222", key(1)[:8], key(2)[:8]}
    assert len(node_columns) == 4 * 4
    assert not any("evil" in c or "renamed" in c for c in header)
    assert [int(r["step"]) for r in rows] == list(range(1, 2 * rounds + 1))
    assert float(rows[-1]["round/nodes_omitted"]) == 1 and rows[-1]["node/22222222/loss"]
    # Each node left out is said once, by id.
    assert len(said) == 2 * rounds - 2 and f"node={key(3)[:8]}" in said[0]
    # The second half of the rounds added about as many bytes as the first.
    assert ratio <= 1.2, ratio


def test_without_the_cap_the_same_churn_grows_the_log_faster_than_the_rounds(tmp_path: Path):
    """What the cap prevents, measured the same way: a column set per new key, and a CSV
    logger writing every row as wide as its header."""
    assert growth(tmp_path, 60, max_nodes=10**6) > 1.5
