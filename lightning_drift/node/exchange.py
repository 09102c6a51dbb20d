"""The node's round engine: one base round, at most one round in flight.

:class:`RoundExchange` holds a barrier on the node's side: it hands the upload off to the
runtime (the payload is built on the network thread from a copy of the weights), lets
training go on, and when the round's global weights have come and verified it applies them
in place, as ``global + (weights now - copy)`` for an overlapped barrier or exactly for a
blocking one. It owns the node's **base round** (the round of the verified global weights
the parameters are based on) and returns a :class:`BarrierRecord` per barrier (the
strategy's ``history``). A round whose answer does not verify is fetched whole; a
coordinator that lost its weights is sent the node's own.

The boundary: this is everything about a round that needs torch but not Lightning, so the
engine is tested with a bare ``torch.nn.Module`` and a runtime stand-in, no ``Trainer``. The
runtime (the network) is reached only through :class:`Exchanger`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import msgspec
import torch

from lightning_drift import protocol as p
from lightning_drift.errors import SessionError, SessionFinished
from lightning_drift.node import waiting
from lightning_drift.node.pace import PaceMeter
from lightning_drift.node.weights import (
    GlobalWeights,
    Received,
    StateDict,
    WeightsMismatch,
    apply_in_place,
    check_start,
    keep_round_copy,
    load_in_place,
    local_state,
    snapshot,
)

if TYPE_CHECKING:
    from lightning_drift.node.runtime import Delivery

log = logging.getLogger(__name__)
T = TypeVar("T")


class Exchanger(Protocol):
    """What the engine needs of the network (:class:`~lightning_drift.node.runtime.NodeRuntime`
    offers it): hold a barrier on the network thread, return its future at once."""

    def hand_off(
        self,
        prepare: Callable[[], tuple[p.BarrierSync, bytes]],
        receive: Callable[[p.BarrierReady, bytes], T],
    ) -> Future[Delivery[T]]: ...


class BarrierRecord(msgspec.Struct, kw_only=True):
    """One barrier as the node saw it, once its round was applied.

    ``round``: the round whose global weights came back (the new base round); ``contributed``:
    whether the upload counted; ``step``: optimizer steps of this fit when the barrier was
    held; ``wait_s``: seconds training waited for the round; ``round_trip_s``: from hand-off
    to applied; ``overlapped``: training went on meanwhile; ``payload``: how the weights came
    (whole, a change, "same")."""

    round: int
    contributed: bool
    epoch: int
    step: int = 0
    finished: bool = False
    samples: int = 0
    wait_s: float = 0.0
    round_trip_s: float = 0.0
    overlapped: bool = False
    bytes_sent: int = 0
    bytes_received: int = 0
    payload: p.Payload = "weights"
    sha256: str = ""


@dataclass
class InFlight:
    """A barrier whose round has not been applied yet."""

    future: Future[Delivery[Received]]
    taken: StateDict | None  # the weights at the barrier (overlapped); None when blocking
    sync: p.BarrierSync  # as the barrier made it (the network thread names the base)
    handed_at: float  # the meter's clock at the hand-off
    step: int  # optimizer steps of this fit when the barrier was held
    whole: bool = False  # the whole weights were sent (the coordinator asked for them)

    @property
    def overlapped(self) -> bool:
        """Training goes on while this round travels."""
        return self.taken is not None


class RoundExchange:
    """The rounds of one node: ``module``'s weights to and from the session.

    ``weights`` says how they travel (the session's transfer dtype); ``meter`` times the
    waits and hand-offs and counts the samples an upload carries; ``has_weights``: the
    session said it already has weights (a start-up sync then offers none); ``checkpoint_dir``
    keeps a copy of each round's global weights; ``on_delivery`` sees every round trip."""

    def __init__(
        self,
        runtime: Exchanger,
        weights: GlobalWeights,
        module: torch.nn.Module,
        meter: PaceMeter,
        *,
        has_weights: bool = False,
        checkpoint_dir: Path | None = None,
        on_delivery: Callable[[Delivery[Received]], None] | None = None,
    ) -> None:
        self.runtime = runtime
        self.weights = weights
        self.module = module
        self.meter = meter
        self.has_weights = has_weights
        self.checkpoint_dir = checkpoint_dir
        self.on_delivery = on_delivery
        self.base_round = -1  # the round of the verified global weights trained from
        self.in_flight: InFlight | None = None

    @property
    def arrived(self) -> bool:
        """The round in flight has its answer (settling it will not wait)."""
        return self.in_flight is not None and self.in_flight.future.done()

    def hand_off(self, sync: p.BarrierSync, *, overlap: bool, whole: bool = False) -> None:
        """Give the network thread this barrier's upload; with ``overlap`` the weights are
        copied first (training changes them meanwhile), otherwise the caller settles next.

        At the start-up sync a node whose session already has weights sends none (it names
        its own by sha256, and is answered with "same" when they are the session's);
        ``whole`` sends them anyway (the coordinator lost its weights and asked).

        ConfigError, before anything is copied or sent, when the model no longer fits the
        session (``GlobalWeights.check``: its tensors changed during fit, or a buffer that is
        non-finite by design changed), or when a parameter is non-finite at the start-up
        sync (``check_start``)."""
        assert self.in_flight is None, "at most one round in flight: settle it first"
        with self.meter.busy("handoff_s"):
            weights = self.weights
            state = local_state(self.module)
            weights.check(state)
            if sync.round == 0:
                check_start(self.module)
            taken = snapshot(self.module) if overlap else state
            has = self.base_round >= 0 or self.has_weights
            empty = sync.round == 0 and not whole and has

            def prepare() -> tuple[p.BarrierSync, bytes]:
                # On the network thread: the payload is built from the copy taken above.
                upload = weights.upload(taken, sync.round)
                marked = msgspec.structs.replace(
                    sync,
                    delta=upload.delta,
                    base_round=upload.base_round,
                    base_sha256=upload.base_sha256,
                )
                return marked, b"" if empty else upload.payload

            future = self.runtime.hand_off(prepare, self._receive)
            self.in_flight = InFlight(
                future,
                taken if overlap else None,
                sync,
                self.meter.clock(),
                self.meter.steps,
                whole=whole,
            )
            self.meter.uploaded()

    def _receive(self, ready: p.BarrierReady, blob: bytes) -> Received:
        return self.weights.receive(
            ready.round, blob, ready.sha256, payload=ready.payload, contributed=ready.contributed
        )

    def settle(self) -> BarrierRecord | None:
        """Wait for the round in flight, if any, and apply its global weights; the record of
        the barrier, or None when none was in flight."""
        inflight = self.in_flight
        if inflight is None:
            return None
        refetched: Delivery[Received] | None = None
        with self.meter.busy("wait_s") as waited:
            try:
                delivery: Delivery[Received] | None = waiting.result(
                    inflight.future, f"round {inflight.sync.round}'s global weights"
                )
            except SessionFinished as done:
                self.in_flight = None
                raise SessionError(
                    f"the session finished at round {done.final_round} while this node was "
                    "still training (it was left behind); the final weights are the "
                    f"coordinator's checkpoint {done.checkpoint or 'of that round'}",
                    code="finished",
                ) from None
            except SessionError as exc:
                self.in_flight = None
                if exc.code != "need_weights":
                    raise
                if inflight.whole:
                    # Asked again for what it was just sent: asking once more would never end.
                    raise SessionError(
                        f"the coordinator asked for this node's whole weights again (round "
                        f"{inflight.sync.round}) after they were sent; restart the coordinator "
                        "on its state dir, then this node",
                        code="protocol",
                    ) from None
                delivery = None
            except WeightsMismatch as exc:
                # Should never happen (the coordinator applies the same change, bit for bit);
                # if it does, nothing was taken from the answer: fetch the whole weights.
                log.warning("%s; fetching the round's whole weights", exc)
                refetched = self._refetch(inflight.sync.epoch)
                delivery = None
            except BaseException:
                self.in_flight = None
                raise
        self.in_flight = None
        if delivery is None and refetched is None:
            # The coordinator has no weights after all (it lost them): send ours.
            self.hand_off(inflight.sync, overlap=False, whole=True)
            return self.settle()
        return self._apply(inflight, delivery, refetched, waited())

    def _refetch(self, epoch: int) -> Delivery[Received]:
        """The session's current global weights, whole (a start-up sync that offers none)."""
        weights = self.weights

        def receive(ready: p.BarrierReady, blob: bytes) -> Received:
            return weights.receive(ready.round, blob, ready.sha256, payload=ready.payload)

        sync = p.BarrierSync(round=0, epoch=epoch)
        return self.runtime.hand_off(lambda: (sync, b""), receive).result()

    def _apply(
        self,
        inflight: InFlight,
        delivery: Delivery[Received] | None,
        refetched: Delivery[Received] | None,
        wait: float,
    ) -> BarrierRecord:
        """Fold the round's global weights into the module; the barrier's record."""
        if delivery is not None:
            ready, got = delivery.ready, delivery.weights
            sync, sent, received = delivery.sync, len(delivery.payload), len(delivery.blob)
        else:
            assert refetched is not None
            ready, got = refetched.ready, refetched.weights
            sync, sent, received = inflight.sync, 0, len(got.blob)
        with self.meter.busy("apply_s"):
            start = self.weights.start(got, final=ready.finished)
            if inflight.taken is None or ready.finished:
                # Blocking (nothing trained since the upload), or the session's final weights
                # (a straggler: nothing more to train): the round's weights (and, between
                # rounds, the residual a session keeps in the weights).
                load_in_place(self.module, start)
            else:
                apply_in_place(self.module, start, inflight.taken, got.carried)
        self.base_round = got.round  # the parameters are now based on this round's weights
        if self.checkpoint_dir is not None:
            keep_round_copy(self.checkpoint_dir, got.round, got.blob)
        if delivery is not None and self.on_delivery is not None:
            self.on_delivery(delivery)
        return BarrierRecord(
            round=got.round,
            contributed=ready.contributed if delivery is not None else False,
            epoch=sync.epoch,
            step=inflight.step,
            finished=ready.finished,
            samples=sync.samples,
            wait_s=wait,
            round_trip_s=self.meter.clock() - inflight.handed_at,
            overlapped=inflight.overlapped,
            bytes_sent=sent,
            bytes_received=received,
            payload=got.payload,
            sha256=ready.sha256,
        )

    def drop(self) -> None:
        """Forget the round in flight (the node is closing)."""
        self.in_flight = None


__all__ = ["BarrierRecord", "Exchanger", "InFlight", "RoundExchange"]
