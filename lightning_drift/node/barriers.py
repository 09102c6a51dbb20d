"""When a node meets the others: the barrier points of an epoch, in optimizer steps.

Pure arithmetic, no Lightning and no I/O, so every schedule can be checked exhaustively.

The coordinator fixes how many barriers (rounds) an epoch has for this node
(``ShardAssignment.rounds``) and the global round of the first one
(``ShardAssignment.first_round``); the node spreads its shard's optimizer steps evenly over
them. The epoch's last barrier always falls on its last step, so every node ends each epoch
(and the session) holding the global weights.

Three rounds matter to a node, each with its own name here and in the strategy:

- the **base round**: the round of the verified global weights the node trains from (-1
  before any);
- the **scheduled round**: the global round the epoch's next barrier belongs to;
- the **upload round**: the round the node's next upload is for, the later of the two
  above (a node that came back late holds older weights than its schedule; a straggler that
  was answered with newer ones is past it: rounds only ever move forward).

When the session decides to stop early it names its final round; :meth:`EpochBarriers.finish_at`
turns the epoch's remaining barriers into that one barrier, due at once.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


def barrier_step(k: int, total: int, rounds: int, sync_every: int | None = None) -> int:
    """After how many optimizer steps of an epoch barrier ``k`` (1-based) of ``rounds`` falls.

    The coordinator's schedule spreads the barriers evenly: ``ceil(k * total / rounds)``; when
    a shard gives fewer steps than rounds, several barriers fall on one step. ``sync_every``
    moves barriers earlier (every ``sync_every`` steps) but never the epoch's last barrier,
    which always falls on the epoch's last step, so every node ends each epoch (and the
    session) on the global weights.
    """
    due = math.ceil(k * total / rounds)
    if sync_every and k < rounds:
        due = min(due, k * sync_every)
    return due


def steps_per_epoch(
    batches: float, *, shard_size: int, accumulate_grad_batches: int = 1, automatic: bool = True
) -> int:
    """How many optimizer steps one epoch over the shard gives (at least 1).

    ``batches`` is the loader's length in batches (``inf`` for a loader without ``__len__``:
    then one step per sample of the ``shard_size`` is assumed). Under automatic optimization
    Lightning steps the optimizer once per ``accumulate_grad_batches`` batches (the last
    group may be short); under manual optimization every batch counts as one step, however many
    times the module steps its optimizers in it.
    """
    if not math.isfinite(batches):
        batches = shard_size
    steps = math.ceil(batches / max(1, accumulate_grad_batches)) if automatic else int(batches)
    return max(1, steps)


def upload_round(base_round: int, scheduled_round: int) -> int:
    """The round a barrier's upload is for: the scheduled one, or later when the node already
    holds the weights of that round or a newer one."""
    return max(base_round + 1, scheduled_round)


@dataclass
class EpochBarriers:
    """One epoch's barrier points for this node, and how far through them it is.

    Create one per epoch from the shard assignment; set ``total_steps`` (how many optimizer
    steps the epoch gives, :func:`steps_per_epoch`) by its first step, once the loader's length
    is known; call :meth:`step` after every optimizer step and, while :meth:`due`, hold a
    barrier and call :meth:`held`; at the epoch's end hold the :meth:`owed` ones, if any (fewer
    steps ran than the loader promised).

    When the coordinator re-plans the rest of the epoch (the work grows or shrinks), call
    :meth:`retarget` with the epoch's new length: the barriers not held yet are spread evenly
    over the steps from the last barrier held to the new end, as if the new plan had been in
    force since that barrier.
    """

    rounds: int
    first_round: int = 0
    sync_every: int | None = None
    total_steps: int | None = None
    steps: int = 0  # optimizer steps taken this epoch
    done: int = 0  # barriers held this epoch
    final_round: int | None = None  # the session's final round, once it decided to stop
    final_held: bool = False
    anchor_steps: int = 0  # the steps and barriers held when the schedule was last (re)made
    anchor_done: int = 0
    last_barrier_steps: int = 0  # steps taken when the last barrier was held

    def step(self) -> int:
        """Count one optimizer step; return how many barriers are due now."""
        if self.total_steps is None:
            raise ValueError("set total_steps (the epoch's optimizer steps) by its first step")
        self.steps += 1
        return self.due()

    def finish_at(self, final_round: int) -> None:
        """The session stops on ``final_round``: the epoch's remaining barriers become one
        barrier for that round, due now (after the current step, or before the first)."""
        if self.final_round is None:
            self.final_round = final_round

    @property
    def stopped(self) -> bool:
        """The session decided to stop: this epoch ends at its final barrier."""
        return self.final_round is not None

    def due(self) -> int:
        """Barriers whose step has been reached but that are not held yet."""
        if self.final_round is not None:
            return 0 if self.final_held else 1
        if self.total_steps is None:
            return 0
        k = self.done
        while k < self.rounds and self.steps >= self.barrier_step(k + 1):
            k += 1
        return k - self.done

    def barrier_step(self, k: int) -> int:
        """The step of this epoch's barrier ``k`` (1-based); the epoch's length must be known."""
        assert self.total_steps is not None, "the epoch's total steps are not known yet"
        if k <= self.anchor_done:
            return self.anchor_steps
        j = k - self.anchor_done
        return self.anchor_steps + barrier_step(
            j,
            max(0, self.total_steps - self.anchor_steps),
            max(1, self.rounds - self.anchor_done),
            self.sync_every,
        )

    def owed(self) -> int:
        """Barriers of the epoch not held yet (due or not)."""
        if self.final_round is not None:
            return 0 if self.final_held else 1
        return max(0, self.rounds - self.done)

    @property
    def scheduled_round(self) -> int:
        """The global round the epoch's next barrier belongs to."""
        if self.final_round is not None:
            return self.final_round
        return self.first_round + self.done

    @property
    def last(self) -> bool:
        """True when the next barrier is the epoch's last (or the session's final one)."""
        return self.final_round is not None or self.done + 1 >= self.rounds

    def held(self) -> None:
        """Record that the next barrier was held."""
        if self.final_round is not None:
            if self.final_held:
                raise ValueError(f"the final barrier (round {self.final_round}) is already held")
            self.final_held = True
            return
        if self.done >= self.rounds:
            raise ValueError(f"all {self.rounds} barriers of the epoch are already held")
        self.done += 1
        self.last_barrier_steps = self.steps

    def retarget(self, total_steps: int) -> None:
        """The epoch now gives ``total_steps`` optimizer steps (a re-plan): re-spread the
        barriers not held yet from the last barrier held (or the epoch's start) to the new
        end. Barriers whose new step has passed are due at once."""
        self.total_steps = max(1, total_steps)
        self.anchor_steps = self.last_barrier_steps if self.done else 0
        self.anchor_done = self.done


__all__ = [
    "EpochBarriers",
    "barrier_step",
    "upload_round",
    "steps_per_epoch",
]
