"""Ending a session early: the stop policy as a pure function, and the requests so far.

A node whose training wants to end (a callback set ``trainer.should_stop``, ``max_steps``
reached) asks to stop; :func:`decide_stop` says whether the live nodes' requests end the
session under the operator's policy (``first``, ``quorum`` of the live nodes, or ``never``;
reaching ``max_steps`` is always honoured). Once it decides, the open round becomes the final
round (``final_round``): every node holds one last barrier for it as soon as it can, no
further epoch is planned, and the session finishes when that round completes. Between epochs
(the open round belongs to no plan yet) it finishes at once, on the last completed round.

The boundary: who may vote and what the session does with the answer are the session's;
counting votes against a policy is this module's, and so is the one quorum rule that both a
stop and a round (``coordinator/roundstate.py``) count with (:func:`quorum_need`).
"""

from __future__ import annotations

import math

import msgspec

from lightning_drift.coordinator.config import SessionConfig, StopPolicy
from lightning_drift.coordinator.verdicts import StopVerdict
from lightning_drift.protocol import StopKind
from lightning_drift.text import short_id


def quorum_need(quorum: float, voters: int) -> int:
    """How many of ``voters`` make a ``quorum`` (a fraction): ``ceil(quorum × voters)``, at
    least 1. The one quorum count of the coordinator (rounds and stops)."""
    return max(1, math.ceil(quorum * voters))


def decide_stop(
    policy: StopPolicy, quorum: float, asked: int, voters: int, kind: StopKind = "callback"
) -> tuple[bool, str]:
    """Whether ``asked`` of ``voters`` live nodes asking to stop end the session, and why.

    ``max_steps`` (a node that can train no further) always ends it, so that every node ends
    on the same weights. Otherwise: ``first`` stops on the first request, ``quorum`` once at
    least :func:`quorum_need` have asked, ``never`` trains every epoch. Pure: the count is the
    caller's."""
    counted = f"{asked} of {voters} node(s) asked"
    if kind == "max_steps":
        return True, f"a node reached its max_steps ({counted}); it can train no further"
    if policy == "never":
        return False, f"{counted}, stop policy never: the session trains all its epochs"
    if policy == "first":
        return True, f"{counted}, stop policy first"
    need = quorum_need(quorum, voters)
    return asked >= need, f"{counted}, stop policy quorum {quorum:g} needs {need}"


class StopBook(msgspec.Struct):
    """The stop requests of live nodes and, once decided, the final round and why."""

    requests: dict[str, str] = {}  # live node -> why it asked to stop
    final_round: int | None = msgspec.field(default=None, name="round")
    reason: str = ""

    def drop(self, node: str) -> None:
        """``node`` is no longer live: its request no longer counts."""
        self.requests.pop(node, None)

    def ask(
        self,
        node: str,
        kind: StopKind,
        reason: str,
        voters: list[str],
        config: SessionConfig,
        *,
        has_weights: bool,
        completed: int,
        in_plan: bool,
    ) -> StopVerdict:
        """``node`` asks to stop; ``voters``: the live admitted nodes; the policy is
        ``config``'s. ``in_plan``: the open round belongs to the epoch plan (else the session is
        between epochs and finishes at once, on ``completed``)."""
        if self.final_round is not None:
            return StopVerdict(True, self.reason, self.final_round)
        open_round = completed + 1
        reason = " ".join(str(reason).split())[:200]  # a node's words: one bounded line
        self.requests[node] = reason or kind
        asked = sum(1 for n in voters if n in self.requests)
        stop, why = decide_stop(config.stop_policy, config.stop_quorum, asked, len(voters), kind)
        who = f"node {short_id(node)} asked to stop ({reason or kind})"
        if not stop or not has_weights:
            if stop:
                why = "no global weights yet: nothing to finish on"
            return StopVerdict(False, f"{who}; session continues: {why}")
        self.reason = f"{who}; {why}"
        if in_plan:
            self.final_round = open_round
            return StopVerdict(
                True,
                f"{self.reason}: round {open_round} is the final round",
                open_round,
                newly=True,
            )
        # Between epochs: no node trains toward the open round; the last one is final.
        self.final_round = completed
        return StopVerdict(
            True,
            f"{self.reason}: finished on round {completed}",
            completed,
            finished_now=True,
            newly=True,
        )


__all__ = ["StopBook", "decide_stop", "quorum_need"]
