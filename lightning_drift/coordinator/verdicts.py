"""What the session answers: one typed record per kind of event. Pure data, no behaviour.

The server and the rounds act on these and never on the words inside them: every record says
what to do in its fields (``ok``, ``kind``, ``complete``, ``stop``...), and its ``reason`` is
for people and tests. They live apart from the parts that make them so that the shells can
import what they act on without importing how it is decided.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from lightning_drift.protocol import ShardAssignment


@dataclass(frozen=True)
class Decision:
    """The answer to one event: ``ok`` or not, a machine code when refused, and why."""

    ok: bool
    reason: str
    code: str = ""


class Verdict(enum.Enum):
    """What becomes of one barrier upload: every outcome the server answers differently."""

    INITIAL = "initial"  # the first start-up weights: adopted as round 0, answered at once
    CURRENT = "current"  # not counted: answered at once with the current global weights
    OPEN = "open"  # counts toward the open round: answered when that round completes
    AGAIN = "again"  # already counted: answered when the round completes
    LATE = "late"  # a late upload (its round is aggregating), or from a node left out of it:
    # not counted, answered when the round completes
    LEFT_OUT = "left_out"  # left out of the open round now (see the reason): likewise
    REFUSE = "refuse"  # answered with Error(code)

    @property
    def at_once(self) -> bool:
        """Answered with the current global weights now, not with the round's result."""
        return self in (Verdict.INITIAL, Verdict.CURRENT)

    @property
    def contributed(self) -> bool:
        """The upload is part of the global weights the node gets back."""
        return self in (Verdict.INITIAL, Verdict.OPEN, Verdict.AGAIN)


@dataclass(frozen=True)
class UploadVerdict:
    """The session's verdict on a barrier upload, why, and the Error code of a refusal."""

    kind: Verdict
    reason: str
    code: str = ""


@dataclass(frozen=True)
class RoundDecision:
    """Whether ``open_round`` can complete now, and why."""

    open_round: int
    complete: bool
    reason: str
    contributors: tuple[tuple[str, int], ...] = ()  # (node, samples) in arrival order
    missing: tuple[str, ...] = ()
    drop: tuple[str, ...] = ()  # missing past the round's hard deadline: to be dropped


@dataclass(frozen=True)
class ShardReply:
    """``assignment`` or, when None, ``wait`` (answer later) or a refusal (``code``)."""

    assignment: ShardAssignment | None
    reason: str
    code: str = ""

    @property
    def wait(self) -> bool:
        return self.assignment is None and not self.code


@dataclass(frozen=True)
class RoundOutcome:
    """What followed the completion of ``completed_round``."""

    completed_round: int
    epoch: int  # the epoch the round belonged to
    finished: bool
    planned_epoch: int | None  # a new epoch plan was made
    reason: str
    stop: StopVerdict | None = None  # the standing stop requests decided a stop meanwhile


@dataclass(frozen=True)
class StopVerdict:
    """The session's answer to a stop request.

    ``stop``: the session finishes on completed round ``final_round`` (``finished_now``: it
    already has, on the last completed round, and a ``Finish`` is due). Otherwise the session
    trains on, and ``reason`` says why (the policy and the count); with ``leave`` it trains on
    without the asking node, which reached its ``max_steps``: that node leaves, and its
    remaining work is handed on when it has gone."""

    stop: bool
    reason: str
    final_round: int = -1
    finished_now: bool = False
    newly: bool = False  # this request made the decision (tell every node)
    leave: bool = False


__all__ = [
    "Decision",
    "RoundDecision",
    "RoundOutcome",
    "ShardReply",
    "StopVerdict",
    "UploadVerdict",
    "Verdict",
]
