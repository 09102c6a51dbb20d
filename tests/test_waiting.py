"""The training thread's waits say what they wait for, and still end with the answer."""

from __future__ import annotations

import logging
import threading
from concurrent.futures import Future

import pytest

from lightning_drift.node import waiting


def test_a_long_wait_says_what_it_waits_for_and_ends_with_the_answer(caplog):
    fut: Future[int] = Future()
    timer = threading.Timer(0.35, fut.set_result, args=(7,))
    timer.start()
    with caplog.at_level(logging.WARNING, logger="lightning_drift.node.waiting"):
        assert waiting.result(fut, "round 3's global weights", every=0.1) == 7
    lines = [r.getMessage() for r in caplog.records]
    assert lines and all("still waiting for round 3's global weights" in m for m in lines)


def test_an_error_ends_the_wait():
    fut: Future[int] = Future()
    fut.set_exception(RuntimeError("refused"))
    with pytest.raises(RuntimeError, match="refused"):
        waiting.result(fut, "x", every=0.1)
