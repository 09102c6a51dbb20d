"""The stop policy as a pure function, the one quorum count, and the stop book: every policy
and kind of request, votes weighed by delivered work, and standing requests counted again."""

from __future__ import annotations

import msgspec
import pytest

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.stoppolicy import (
    StopBook,
    StopFacts,
    Votes,
    decide_stop,
    quorum_need,
)

A, B, C = "a" * 64, "b" * 64, "c" * 64
SYBILS = [f"{i:02x}" * 32 for i in range(10)]  # keys of one token holder, nothing delivered


def config(policy: str = "quorum", quorum: float = 0.5) -> SessionConfig:
    return SessionConfig(dataset_size=10, stop_policy=policy, stop_quorum=quorum)  # type: ignore[arg-type]


def facts(voters: dict[str, int], **kw) -> StopFacts:
    base = dict(has_weights=True, completed=4, in_plan=True)
    base.update(kw)
    return StopFacts(voters=voters, **base)  # type: ignore[arg-type]


def test_quorum_need_is_the_ceiling_and_at_least_one():
    assert [quorum_need(0.5, n) for n in (0, 1, 2, 3, 4)] == [1, 1, 1, 2, 2]
    assert quorum_need(1.0, 3) == 3
    assert quorum_need(0.5, 301) == 151  # samples, for a stop


def test_votes_count_the_live_voters_and_the_work_they_delivered():
    v = Votes.count({A: 100, B: 300, C: 0}, {A: "x", C: "y", "gone" * 16: "z"})
    assert (v.asked, v.voters, v.asked_work, v.work) == (2, 3, 100, 400)
    assert str(v) == "2 of 3 node(s) asked, having delivered 100 of the live nodes' 400 samples"


@pytest.mark.parametrize(
    "policy, asked_work, work, stop, reason",
    [
        ("first", 0, 400, True, "stop policy first"),
        ("never", 400, 400, False, "stop policy never: the session trains all its epochs"),
        ("quorum", 199, 400, False, "stop policy quorum 0.5 needs 200"),
        ("quorum", 200, 400, True, "stop policy quorum 0.5 needs 200"),
        ("quorum", 0, 0, False, "no live node has delivered any work yet, so no quorum"),
    ],
)
def test_decide_stop_by_policy_with_a_reason(policy, asked_work, work, stop, reason):
    got, why = decide_stop(policy, 0.5, Votes(1, 3, asked_work, work))
    assert got is stop and reason in why and "1 of 3 node(s) asked" in why


def test_a_vote_weighs_the_work_its_voter_delivered_not_the_keys():
    """Ten keys that delivered nothing, all asking, against one node that delivered and did
    not ask: they weigh nothing; the one node that delivered stops it alone."""
    delivered = {A: 300, **dict.fromkeys(SYBILS, 0)}
    votes = Votes.count(delivered, dict.fromkeys(SYBILS, "x"))
    stop, why = decide_stop("quorum", 0.5, votes)
    assert not stop and "10 of 11 node(s) asked, having delivered 0 of" in why
    assert decide_stop("quorum", 0.5, Votes.count(delivered, {A: "x"}))[0]
    # Weighed, not counted: the node that did most of the work outweighs two that did less.
    work = {A: 500, B: 200, C: 200}
    assert decide_stop("quorum", 0.5, Votes.count(work, {A: "x"}))[0]
    assert not decide_stop("quorum", 0.5, Votes.count(work, {B: "x", C: "y"}))[0]


# ---- the stop book: every policy × kind ----------------------------------------------------

WORK = {A: 100, B: 300}  # A asks; it delivered a quarter of the work


@pytest.mark.parametrize(
    "policy, kind, stop, leave, says",
    [
        ("first", "callback", True, False, "stop policy first: round 5 is the final round"),
        ("first", "max_steps", True, False, "stop policy first: round 5 is the final round"),
        ("quorum", "callback", False, False, "session continues: 1 of 2 node(s) asked"),
        ("quorum", "max_steps", False, True, "it leaves, its work is handed on and the session"),
        ("never", "callback", False, False, "session continues: 1 of 2"),
        ("never", "max_steps", False, True, "trains on: 1 of 2 node(s) asked"),
    ],
)
def test_every_policy_and_kind(policy, kind, stop, leave, says):
    book = StopBook()
    v = book.ask(A, kind, "why", facts(WORK), config(policy))
    assert (v.stop, v.leave, v.newly) == (stop, leave, stop), v
    assert says in v.reason and f"node {A[:8]}" in v.reason, v.reason
    asked = "reached its max_steps (why)" if kind == "max_steps" else "asked to stop (why)"
    assert asked in v.reason
    # An overruled request stands (a vote) while its node is live; a node told to leave takes
    # its request with it, so it cannot stop the session from its way out.
    assert book.requests == ({} if leave else {A: "why"})
    assert (book.final_round == 5) is stop


def test_max_steps_under_quorum_is_a_vote_that_stops_when_it_weighs_enough():
    v = StopBook().ask(B, "max_steps", "", facts(WORK), config("quorum"))
    assert v.stop and not v.leave and v.final_round == 5
    assert "node bbbbbbbb reached its max_steps (max_steps)" in v.reason
    assert "needs 200" in v.reason


def test_before_any_work_is_delivered_no_quorum_is_reached_and_the_reason_says_so():
    v = StopBook().ask(A, "max_steps", "", facts({A: 0, B: 0}), config("quorum", 0.1))
    assert not v.stop and v.leave
    assert "no live node has delivered any work yet, so no quorum can be reached" in v.reason


def test_zero_delivery_keys_out_vote_nothing():
    """One token holder's many keys all ask (callbacks, and one at its max_steps): the
    honest node that delivered the work has not asked, and the session trains on."""
    book = StopBook()
    voters = {A: 300, **dict.fromkeys(SYBILS, 0)}
    for key in SYBILS[:-1]:
        v = book.ask(key, "callback", "stop", facts(voters), config("quorum", 0.5))
        assert not v.stop and "session continues" in v.reason
    v = book.ask(SYBILS[-1], "max_steps", "", facts(voters), config("quorum", 0.5))
    assert not v.stop and v.leave and "10 of 11 node(s) asked, having delivered 0" in v.reason
    assert book.final_round is None and book.review(facts(voters), config()) is None


def test_without_global_weights_nothing_is_finished_on():
    v = StopBook().ask(A, "callback", "", facts({A: 0}, has_weights=False), config("first"))
    assert not v.stop and "no global weights yet" in v.reason
    v = StopBook().ask(A, "max_steps", "", facts({A: 0}, has_weights=False), config("first"))
    assert not v.stop and v.leave  # it cannot train on: it leaves all the same


def test_the_stop_book_decides_once_and_round_trips():
    c = config("quorum", 1.0)
    book = StopBook()
    v = book.ask(A, "callback", "done", facts({A: 10, B: 10}), c)
    assert not v.stop and "session continues" in v.reason
    v = book.ask(B, "callback", "done\nnow", facts({A: 10, B: 10}), c)
    assert v.stop and v.newly and v.final_round == 5 and book.requests[B] == "done now"
    again = book.ask(A, "max_steps", "", facts({A: 10, B: 10}), c)
    assert again.stop and not again.newly and not again.leave and again.final_round == 5
    saved = msgspec.to_builtins(book)
    assert saved["round"] == 5 and msgspec.convert(saved, StopBook) == book


def test_a_finished_session_answers_with_its_last_round():
    v = StopBook().ask(A, "max_steps", "", facts({A: 1}, finished=True), config())
    assert v.stop and not v.newly and v.final_round == 4 and "has finished at round 4" in v.reason


def test_between_epochs_the_stop_finishes_on_the_completed_round():
    v = StopBook().ask(A, "callback", "", facts({A: 0}, in_plan=False), config("first"))
    assert v.stop and v.finished_now and v.final_round == 4


# ---- standing requests, counted again as rounds complete -----------------------------------


def test_a_standing_request_stops_once_its_voter_has_delivered_enough():
    book = StopBook()
    assert not book.ask(A, "callback", "early", facts({A: 0, B: 0}), config()).stop
    assert book.review(facts({A: 0, B: 0}), config()) is None  # nothing delivered yet
    assert book.review(facts({A: 100, B: 300}), config()) is None  # a quarter: not enough
    v = book.review(facts({A: 300, B: 300}, completed=6), config())
    assert v is not None and v.stop and v.newly and v.final_round == 7 == book.final_round
    assert f"the stop requests standing (node(s) {A[:8]}) now count" in v.reason
    assert "needs 300" in v.reason and v.reason.endswith("round 7 is the final round")
    assert book.review(facts({A: 300, B: 300}), config()) is None  # decided once


def test_a_review_between_epochs_finishes_at_once():
    book = StopBook(requests={A: "early"})
    v = book.review(facts({A: 5, B: 5}, in_plan=False, completed=9), config())
    assert v is not None and v.finished_now and v.final_round == 9


@pytest.mark.parametrize("policy", ["never", "quorum"])
def test_a_review_decides_nothing_the_policy_does_not(policy):
    book = StopBook(requests={A: "x", "gone" * 16: "y"})
    assert book.review(facts({A: 1, B: 100}), config(policy)) is None
    # Requests of nodes that are not voters (not live, not admitted) count for nothing.
    assert StopBook(requests={C: "x"}).review(facts({A: 1}), config("first")) is None
    assert book.review(facts({A: 1}, finished=True), config("first")) is None
