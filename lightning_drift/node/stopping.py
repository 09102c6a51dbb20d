"""Stop negotiation: a stop is the session's, not one node's.

When a callback sets ``trainer.should_stop`` (EarlyStopping) or the node reaches
``max_steps``, the node asks the coordinator (:meth:`StopNegotiation.ask`); an overruled
request undoes ``should_stop`` and is asked again at most every few seconds; once the
session has decided, the epoch's next barrier is the final one
(:meth:`StopNegotiation.plan`). A node at its ``max_steps`` can train no further whatever
the session decides: when the session trains on, it is told to leave, and it does
(:meth:`StopNegotiation.at_max_steps`, :meth:`~lightning_drift.node.epochwork.EpochWork
.leave`) while Lightning ends its fit. The boundary: what to ask and when to ask again is
this part's alone, apart from how barriers are held; the clock is injected and the trainer
is only read and told ``should_stop``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from lightning.pytorch.callbacks import EarlyStopping

from lightning_drift import protocol as p
from lightning_drift.node.barriers import EpochBarriers
from lightning_drift.node.epochwork import EpochWork

log = logging.getLogger(__name__)


class Stopper(Protocol):
    """What stop negotiation needs of the runtime."""

    @property
    def stop(self) -> p.StopDecision | None: ...

    def request_stop(self, request: p.StopRequest) -> p.StopDecision: ...


class StopNegotiation:
    """One node's side of the session's stop; ``clock`` in monotonic seconds."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._ask_again_at = 0.0  # after an overruled request, when to ask again
        self._overruled = ""  # the last overruling, logged once

    def plan(
        self,
        runtime: Stopper,
        trainer: Any,
        barriers: EpochBarriers,
        base_round: int,
        steps: int,
        every: float,
    ) -> None:
        """Ask the session to stop when Lightning was asked to (something set
        ``trainer.should_stop``); once the session has decided, the epoch's next barrier is
        the final one, due now. An overruled request is logged and training goes on."""
        if trainer.should_stop and runtime.stop is None:
            self.ask(runtime, trainer, "callback", why_stopping(trainer), steps, every)
        decision = runtime.stop
        if decision is not None and not barriers.stopped and base_round < decision.round:
            log.warning(
                "the session stops early: %s; holding the final barrier (round %d)",
                decision.reason,
                decision.round,
            )
            barriers.finish_at(decision.round)

    def ask(
        self,
        runtime: Stopper,
        trainer: Any,
        kind: p.StopKind,
        reason: str,
        steps: int,
        every: float,
    ) -> p.StopDecision | None:
        """Send a stop request and act on the answer, which it returns (None: not asked, a
        callback overruled a moment ago): an overruled ``should_stop`` is undone, and asked
        again at most every ``every`` seconds (at least one)."""
        now = self.clock()
        if kind == "callback" and now < self._ask_again_at:
            trainer.should_stop = False  # overruled a moment ago; the session's answer stands
            return None
        answer = runtime.request_stop(
            p.StopRequest(kind=kind, reason=reason, epoch=trainer.current_epoch, step=steps)
        )
        if answer.stop or answer.leave:
            return answer
        trainer.should_stop = False
        self._ask_again_at = now + max(1.0, every)
        if answer.reason != self._overruled:
            self._overruled = answer.reason
            log.warning("%s; this node trains on with the session", answer.reason)
        return answer

    def at_max_steps(self, runtime: Stopper, trainer: Any, work: EpochWork | None) -> bool:
        """Whether the fit reached ``Trainer(max_steps)``, where Lightning ends it. Then the
        session is asked, unless it has decided: it may stop (the final barrier follows, as
        for any stop), or train on without this node, which then leaves
        (:meth:`EpochWork.leave`: its last steps are sent, it ends on that round's global
        weights and says goodbye; the others take on the rest of its work)."""
        if trainer.max_steps in (-1, None) or trainer.global_step < trainer.max_steps:
            return False
        if runtime.stop is None and work is not None and not work.finished:
            reason = f"reached Trainer(max_steps={trainer.max_steps})"
            meter = work.meter
            answer = self.ask(
                runtime, trainer, "max_steps", reason, meter.steps, meter.progress_every
            )
            if answer is not None and answer.leave and not answer.stop:
                log.warning("%s; this node leaves the session and ends its fit", answer.reason)
                work.leave(reason)
        return True


def why_stopping(trainer: Any) -> str:  # Any: Trainer.callbacks is untyped
    """What a stop request says about why Lightning was asked to stop."""
    watchers = [c for c in trainer.callbacks if isinstance(c, EarlyStopping)]
    if watchers:
        what = ", ".join(f"EarlyStopping(monitor={c.monitor!r})" for c in watchers)
        return f"trainer.should_stop was set; callbacks: {what}"
    return "trainer.should_stop was set (a callback or the module)"


__all__ = ["StopNegotiation", "Stopper", "why_stopping"]
