"""Ending a session early: the stop policy as a pure function, and the requests so far.

A node whose training wants to end (a callback set ``trainer.should_stop``, ``max_steps``
reached) asks to stop; :func:`decide_stop` says whether the live nodes' requests end the
session under the operator's policy: ``first`` (the session follows any one node), ``quorum``
or ``never``. Under ``quorum`` a vote weighs the work its voter has *delivered* (the samples
of its counted uploads, as the coordinator weighed them: ``roster.Member.delivered``), never
the number of keys: keys are free under a shared token, so many keys that delivered nothing
weigh nothing, and while no live node has delivered anything no quorum can be reached.

Once it decides, the open round becomes the final round (``final_round``): every node holds
one last barrier for it as soon as it can, no further epoch is planned, and the session
finishes when that round completes. Between epochs (the open round belongs to no plan yet)
it finishes at once, on the last completed round.

A node that reached its ``max_steps`` can train no further, but that is its own limit, not
the session's: its request is a vote like any other, and when the policy does not end the
session the node is told to leave (:attr:`StopVerdict.leave`); its remaining work is handed
on to the others when it goes. A request stands while its node is live, and the votes are
counted again as each round completes (:meth:`StopBook.review`): a request made before its
voter had delivered anything counts once it has. A node told to leave takes its request
with it at once: it was counted when it was made, and a node on its way out (its last upload
still to come) must not stop the session it was just told trains on.

The boundary: who may vote, and what each has delivered, are the session's; counting votes
against a policy is this module's, and so is the one quorum rule that both a stop and a
round (``coordinator/roundstate.py``) count with (:func:`quorum_need`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import msgspec

from lightning_drift.coordinator.config import SessionConfig, StopPolicy
from lightning_drift.coordinator.verdicts import StopVerdict
from lightning_drift.protocol import StopKind
from lightning_drift.text import short_id

NAMED_MAX = 4  # voters named in the reason of a stop the standing requests decided


def quorum_need(quorum: float, voters: int) -> int:
    """How many of ``voters`` make a ``quorum`` (a fraction): ``ceil(quorum × voters)``, at
    least 1. The one quorum count of the coordinator: nodes for a round, delivered samples
    for a stop."""
    return max(1, math.ceil(quorum * voters))


@dataclass(frozen=True)
class Votes:
    """The stop requests standing among the live admitted nodes: how many asked, and the work
    (delivered samples) of those who asked against the work of all of them."""

    asked: int
    voters: int
    asked_work: int
    work: int

    @classmethod
    def count(cls, delivered: Mapping[str, int], requests: Mapping[str, str]) -> Votes:
        """The votes of the voters ``delivered`` names (node -> samples it delivered) whose
        nodes have a request standing in ``requests``."""
        asked = [n for n in delivered if n in requests]
        return cls(
            asked=len(asked),
            voters=len(delivered),
            asked_work=sum(max(0, delivered[n]) for n in asked),
            work=sum(max(0, w) for w in delivered.values()),
        )

    def __str__(self) -> str:
        return (
            f"{self.asked} of {self.voters} node(s) asked, having delivered {self.asked_work} "
            f"of the live nodes' {self.work} samples"
        )


def decide_stop(policy: StopPolicy, quorum: float, votes: Votes) -> tuple[bool, str]:
    """Whether the ``votes`` standing end the session, and why. ``first`` stops on the first
    request, ``never`` trains every epoch, ``quorum`` stops once the voters who asked have
    delivered at least :func:`quorum_need` of the samples all live voters delivered. Pure:
    the votes are the caller's; a request's kind does not change them."""
    if policy == "never":
        return False, f"{votes}, stop policy never: the session trains all its epochs"
    if policy == "first":
        return votes.asked > 0, f"{votes}, stop policy first"
    if votes.work <= 0:
        return False, (
            f"{votes}, stop policy quorum {quorum:g}: no live node has delivered any work yet, "
            "so no quorum can be reached"
        )
    need = quorum_need(quorum, votes.work)
    return votes.asked_work >= need, f"{votes}, stop policy quorum {quorum:g} needs {need}"


@dataclass(frozen=True)
class StopFacts:
    """What a stop decision reads of the session: the voters (the live admitted nodes) and
    the samples each has delivered, and where the session is (``in_plan``: the open round
    belongs to the epoch plan; otherwise it is between epochs)."""

    voters: Mapping[str, int]
    has_weights: bool
    completed: int
    in_plan: bool
    finished: bool = False


class StopBook(msgspec.Struct):
    """The stop requests of live nodes and, once decided, the final round and why."""

    requests: dict[str, str] = {}  # live node -> why it asked to stop
    final_round: int | None = msgspec.field(default=None, name="round")
    reason: str = ""

    def drop(self, node: str) -> None:
        """``node`` is no longer live: its request no longer counts."""
        self.requests.pop(node, None)

    def ask(
        self, node: str, kind: StopKind, reason: str, facts: StopFacts, config: SessionConfig
    ) -> StopVerdict:
        """``node`` asks to stop, for ``kind``'s ``reason``; the policy is ``config``'s. The
        verdict: the session stops; or, for a node at its ``max_steps``, it leaves while the
        session trains on; or the request is overruled (it stands, and counts again as each
        round completes)."""
        if facts.finished:
            done = facts.completed
            return StopVerdict(True, f"the session has finished at round {done}", done)
        if self.final_round is not None:
            return StopVerdict(True, self.reason, self.final_round)
        reason = " ".join(str(reason).split())[:200]  # a node's words: one bounded line
        self.requests[node] = reason or kind
        votes = Votes.count(facts.voters, self.requests)
        stop, why = decide_stop(config.stop_policy, config.stop_quorum, votes)
        if stop and not facts.has_weights:
            stop, why = False, "no global weights yet: nothing to finish on"
        asked = "reached its max_steps" if kind == "max_steps" else "asked to stop"
        who = f"node {short_id(node)} {asked} ({reason or kind})"
        if stop:
            return self._decide(f"{who}; {why}", facts)
        if kind == "max_steps":
            del self.requests[node]  # counted once; it leaves with its node (module docstring)
            return StopVerdict(
                False,
                f"{who}; it leaves, its work is handed on and the session trains on: {why}",
                leave=True,
            )
        return StopVerdict(False, f"{who}; session continues: {why}")

    def review(self, facts: StopFacts, config: SessionConfig) -> StopVerdict | None:
        """Count the standing requests again (a round has completed: what the voters have
        delivered changed): the stop they now decide, or None. A stop already decided, a
        finished session or no request of a live voter decides nothing new."""
        if self.final_round is not None or facts.finished or not facts.has_weights:
            return None
        votes = Votes.count(facts.voters, self.requests)
        if votes.asked == 0:
            return None
        stop, why = decide_stop(config.stop_policy, config.stop_quorum, votes)
        if not stop:
            return None
        asked = [short_id(n) for n in facts.voters if n in self.requests]
        names = ", ".join(asked[:NAMED_MAX]) + (", ..." if len(asked) > NAMED_MAX else "")
        return self._decide(f"the stop requests standing (node(s) {names}) now count: {why}", facts)

    def _decide(self, reason: str, facts: StopFacts) -> StopVerdict:
        """The session stops, for ``reason``: on the open round, or, between epochs, at once on
        the last completed round."""
        self.reason = reason
        if facts.in_plan:
            self.final_round = open_round = facts.completed + 1
            return StopVerdict(
                True,
                f"{reason}: round {open_round} is the final round",
                open_round,
                newly=True,
            )
        # Between epochs: no node trains toward the open round; the last one is final.
        self.final_round = facts.completed
        return StopVerdict(
            True,
            f"{reason}: finished on round {facts.completed}",
            facts.completed,
            finished_now=True,
            newly=True,
        )


__all__ = ["StopBook", "StopFacts", "Votes", "decide_stop", "quorum_need"]
