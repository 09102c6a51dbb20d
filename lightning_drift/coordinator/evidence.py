"""Evidence of training: whether an upload's change shows the work its node claims. Pure.

What a node says about itself (its samples, its speed, where it is in its shard) is a claim.
What the coordinator receives is evidence: an upload that arrived, and how far its weights
moved from the global weights it was taken against. Speeds measured from arrivals move work
between nodes (re-plans, the next epoch's shares), so an upload counts as evidence of pace
only if it carries training:

- an upload claiming samples whose weights did not move at all (its change is exactly 0)
  shows no training;
- nor does one whose change per claimed sample is more than :data:`EVIDENCE_FACTOR` times
  below the session's reference: the lower median of the change per sample of the last
  round's counted uploads. Honest nodes differ by their batch sizes and shares (a node with
  four times the batch takes a quarter of the steps per sample), never by a factor of 16;
  a node that returns its weights nearly unchanged at once, to look fast, does.

Such an upload still arrives (the round does not wait for its node, and never stalls because
every upload of it showed none), but its node is not measured by it, it adds nothing to the
work its node delivered, and what it says it trained is not taken as trained. An unchanged
upload also weighs nothing in the mean and is a strike: a node that keeps returning its
weights unchanged is excluded, and its work is handed on from what its counted uploads held.
A change that is only far below the reference is no strike, nor does it lose its weight: a
learning rate that drops steeply between two rounds (a step schedule) makes honest changes
fall at once, and the reference then follows them (:meth:`Evidence.round_closed`). The first
round of a session has no reference: only an unchanged upload is caught then.

The boundary: the change's norm is measured by the accumulator that has the global weights
(``Accumulator.change``); judging it against the reference is here, and so is the reference.
A holder of most of a round's keys can move the reference (as it can move any statistic of
the round); robust aggregation and the operator's ``max_nodes`` are what bound that.
"""

from __future__ import annotations

import math

import msgspec

from lightning_drift.robust import lower_median

# An upload's change per claimed sample this many times below the reference shows no
# training (see the module docstring).
EVIDENCE_FACTOR = 16.0


class Evidence(msgspec.Struct):
    """The session's reference change per sample, and the open round's counted values."""

    reference: float = 0.0  # lower median change per sample of the last round (0: none yet)
    round: dict[str, float] = {}  # node -> change per sample of its counted upload
    weak: dict[str, float] = {}  # the same, of uploads far below the reference

    def judge(self, norm: float, samples: float) -> str:
        """Why an upload whose change is ``norm`` (L2, every floating tensor) and that claims
        ``samples`` (as the session bounds them) shows no training; "" when it may count.
        An upload claiming nothing claims no work: it is never judged."""
        if samples <= 0:
            return ""
        if not math.isfinite(norm):
            return ""  # not a claim of speed: the round's aggregate check deals with it
        if norm <= 0:
            return f"its weights are unchanged, yet it claims {samples:.0f} samples trained"
        per_sample = norm / samples
        if self.reference > 0 and per_sample * EVIDENCE_FACTOR < self.reference:
            return (
                f"its change ({norm:.3g}, {per_sample:.3g} per claimed sample) is over "
                f"{EVIDENCE_FACTOR:g}x below the session's ({self.reference:.3g} per sample) "
                f"for the {samples:.0f} samples it claims"
            )
        return ""

    def counted(self, node: str, norm: float, samples: float, *, evidence: bool = True) -> None:
        """``node``'s upload (change ``norm``, ``samples`` weighed) arrived in the open round;
        ``evidence``: whether it showed training (:meth:`judge`)."""
        if samples > 0 and math.isfinite(norm) and norm > 0:
            (self.round if evidence else self.weak)[node] = norm / samples

    def round_closed(self) -> None:
        """The open round was aggregated: its uploads that showed training are the new
        reference; when none did (every change fell at once), the ones that fell are."""
        ref = lower_median(self.round.values())
        if ref is None:
            ref = lower_median(self.weak.values())
        if ref is not None:
            self.reference = ref
        self.round, self.weak = {}, {}


__all__ = ["EVIDENCE_FACTOR", "Evidence"]
