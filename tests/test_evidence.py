"""Evidence of training: which uploads count as work delivered (pure)."""

from __future__ import annotations

import math

import msgspec
import pytest
import torch

from lightning_drift.aggregate import Accumulator, change_norm
from lightning_drift.coordinator.evidence import EVIDENCE_FACTOR, Evidence
from lightning_drift.errors import SessionError
from lightning_drift.robust import RobustAccumulator


def test_an_unchanged_upload_claiming_samples_shows_no_training():
    e = Evidence()
    assert "unchanged" in e.judge(0.0, 100)
    assert e.judge(0.0, 0) == ""  # claims nothing: nothing to judge
    assert e.judge(1e-9, 100) == ""  # no reference yet: any change will do
    assert e.judge(math.inf, 100) == ""  # the aggregate check's to refuse, not a claim


def test_a_change_far_below_the_rounds_reference_shows_no_training():
    e = Evidence()
    e.counted("a", 2.0, 100)  # 0.02 per sample
    e.counted("b", 4.0, 100)  # 0.04
    e.counted("c", 0.0, 100)  # unchanged: no value
    e.round_closed()
    assert e.reference == pytest.approx(0.02) and e.round == {}
    assert e.judge(2.0 / EVIDENCE_FACTOR * 1.01, 100) == ""  # just within the factor
    why = e.judge(2.0 / EVIDENCE_FACTOR * 0.99, 100)
    assert "below the session's" in why and "100 samples" in why
    # Claiming fewer samples for the same change is within bounds: a claim shapes its own.
    assert e.judge(0.1, 5) == ""
    e.round_closed()  # a round with no counted values keeps the reference
    assert e.reference == pytest.approx(0.02)
    # A step schedule cut every node's change a hundredfold: none showed training by the
    # reference, and the reference follows them (one node far below it does not move it).
    e.counted("a", 0.02, 100, evidence=False)
    e.counted("b", 0.04, 100, evidence=False)
    e.round_closed()
    assert e.reference == pytest.approx(0.0002) and e.judge(0.02, 100) == ""
    e.counted("a", 2.0, 100)
    e.counted("evil", 0.0001, 100, evidence=False)
    e.round_closed()
    assert e.reference == pytest.approx(0.02)
    r = msgspec.json.decode(msgspec.json.encode(e), type=Evidence)
    assert r.reference == e.reference  # kept across a restart


def test_the_accumulators_measure_a_change_as_they_would_record_it():
    g = {"w": torch.zeros(3), "n": torch.tensor(5)}
    up = {"w": torch.tensor([3.0, 4.0, 0.0]), "n": torch.tensor(9)}
    assert change_norm(g, up) == pytest.approx(5.0)
    assert change_norm(g, {"w": torch.tensor([3.0, 4.0, 0.0]), "n": up["n"]}, delta=True) == 5.0
    for acc in (Accumulator(g), RobustAccumulator(g, method="median")):
        assert acc.change(up) == pytest.approx(5.0) and len(acc) == 0  # nothing added
        acc.add("a", up, 1.0)
        assert acc.norms["a"] == pytest.approx(5.0)
        with pytest.raises(SessionError):
            acc.change({"w": torch.zeros(4), "n": up["n"]})
