"""The stop policy as a pure function, the one quorum count, and the stop book."""

from __future__ import annotations

import msgspec

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.stoppolicy import StopBook, decide_stop, quorum_need


def test_quorum_need_is_the_ceiling_and_at_least_one():
    assert [quorum_need(0.5, n) for n in (0, 1, 2, 3, 4)] == [1, 1, 1, 2, 2]
    assert quorum_need(1.0, 3) == 3


def test_decide_stop_by_policy():
    assert decide_stop("first", 0.5, 1, 4)[0]
    assert not decide_stop("never", 0.5, 4, 4)[0]
    assert decide_stop("never", 0.5, 1, 4, "max_steps")[0]
    stop, why = decide_stop("quorum", 0.5, 1, 3)
    assert not stop and "needs 2" in why
    assert decide_stop("quorum", 0.5, 2, 3)[0]


def test_the_stop_book_decides_once_and_round_trips():
    c = SessionConfig(dataset_size=10, stop_policy="quorum", stop_quorum=1.0)
    book = StopBook()
    kw = dict(has_weights=True, completed=4, in_plan=True)
    v = book.ask("a", "callback", "done", ["a", "b"], c, **kw)
    assert not v.stop and "session continues" in v.reason
    v = book.ask("b", "callback", "done\nnow", ["a", "b"], c, **kw)
    assert v.stop and v.newly and v.final_round == 5 and book.requests["b"] == "done now"
    again = book.ask("a", "callback", "", ["a", "b"], c, **kw)
    assert again.stop and not again.newly and again.final_round == 5
    saved = msgspec.to_builtins(book)
    assert saved["round"] == 5 and msgspec.convert(saved, StopBook) == book


def test_between_epochs_the_stop_finishes_on_the_completed_round():
    c = SessionConfig(dataset_size=10, stop_policy="first")
    v = StopBook().ask("a", "callback", "", ["a"], c, has_weights=True, completed=4, in_plan=False)
    assert v.stop and v.finished_now and v.final_round == 4
