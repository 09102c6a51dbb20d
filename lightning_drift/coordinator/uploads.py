"""The upload core: what becomes of one barrier upload, decided in two steps.

The server asks twice per upload. :meth:`Uploads.admit` takes the upload's ``BarrierSync``
before any byte of its body is read and says what to do with the body (:class:`Admission`:
read it, with this limit and this header check; read and throw it away; or refuse at once).
Once the body is here, :meth:`Uploads.accept` decides again (the round may have moved on
while it arrived), adopts the start-up weights or decodes and accumulates the upload, and
returns a :class:`Handled`: the :class:`Answer` to send and the :class:`~.effects.Effects`
to carry out (events, a round decision, bans). A body that could not be read (too large,
too slow, a bad header) is reported instead of accepted (:meth:`Uploads.unread`), with the
same kind of result. The core never calls back into the server.

An answer that waits for a round's weights (a counted upload, a late one) is awaited by the
server after it has carried out the effects (one of which may be that very round's
completion): :meth:`Answer.ready` gives the ``BarrierReady`` and the blob once they exist.

The boundary is here so that one upload's path is one place to read and test: the server
does the I/O (streams, the one-upload-per-node rule, the ``max_uploads`` slots, the minimum
byte rate), this module the decisions, ``rounds.py`` the weights and the accumulator.
Accumulating is shielded from cancellation: a half-added upload would corrupt the round;
the effects of one whose caller went away are kept for :meth:`Uploads.pending`.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any

from lightning_drift import modelspec
from lightning_drift.aggregate import validate_upload
from lightning_drift.coordinator import effects
from lightning_drift.coordinator.boundary import UploadCheck
from lightning_drift.coordinator.effects import Effects
from lightning_drift.coordinator.rounds import Rounds
from lightning_drift.coordinator.session import Session, UploadVerdict, Verdict
from lightning_drift.coordinator.sharded import ShardedRound
from lightning_drift.dataplane.manifest import Commit
from lightning_drift.errors import SessionError
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.protocol import BarrierReady, BarrierSync, Payload
from lightning_drift.text import short_id

log = logging.getLogger(__name__)


class Admit(enum.Enum):
    """What to do with an upload's body, decided from its BarrierSync alone."""

    READ = "read"  # it counts: read it into memory, its header checked before its body
    DRAIN = "drain"  # it does not count: read it and throw it away, then answer
    REFUSE = "refuse"  # answer Error(code) at once and read nothing


class Unread(enum.Enum):
    """Why an admitted upload's body was not read to its end."""

    TOO_LARGE = "too_large"  # its declared size is over the limit
    TOO_SLOW = "too_slow"  # it arrived slower than --min-upload-rate
    BAD_HEADER = "bad_header"  # its safetensors header is not the model's
    NO_WEIGHTS = "no_weights"  # no start-up weights to a coordinator that has none


@dataclass(frozen=True)
class Ready:
    """The answer's frames: the ``BarrierReady`` and the blob that follows it."""

    frame: BarrierReady
    payload: Payload
    blob: bytes
    sha256: str


@dataclass(frozen=True)
class Answer:
    """How an upload is answered: by ``verdict`` (a ``REFUSE`` one: an ``Error`` with its
    code and reason), with the weights that answer an upload for ``upload_round``."""

    verdict: UploadVerdict
    upload_round: int
    core: Uploads

    @property
    def refused(self) -> bool:
        return self.verdict.kind is Verdict.REFUSE

    async def ready(self, base_sha256: str, joiner: str = "") -> Ready:
        """The frames that answer the upload of a node holding the weights ``base_sha256``
        (waiting for the round's weights when the upload waits for its round); ``joiner``:
        a sharded session's node that may fetch whole weights from the members."""
        return await self.core.ready(self, base_sha256, joiner)


@dataclass(frozen=True)
class Admission:
    """What :meth:`Uploads.admit` says: ``kind``; the body's size ``limit`` and what to tell
    a node that sends more (``hint``); the header ``check`` for a body read into memory;
    the ``answer`` (for ``DRAIN`` and ``REFUSE``; for ``READ``, the verdict so far)."""

    kind: Admit
    answer: Answer
    limit: int = 0
    hint: str = ""
    check: UploadCheck | None = None
    commit: bool = False  # a sharded session's change: its pieces' hashes, not a blob


@dataclass(frozen=True)
class Handled:
    """An upload handled: the answer to send, and what to carry out first."""

    answer: Answer
    effects: Effects


class Uploads:
    """The upload core of one session (see the module docstring). ``max_model_bytes``
    bounds the start-up weights (0: half of this machine's memory)."""

    def __init__(self, session: Session, rounds: Rounds, *, max_model_bytes: int = 0) -> None:
        self.session = session
        self.rounds = rounds
        self.max_model_bytes = max_model_bytes
        self._pending = Effects()

    def _answer(self, verdict: UploadVerdict, sync: BarrierSync) -> Answer:
        return Answer(verdict, sync.round, self)

    def _refused(self, sync: BarrierSync, reason: str, code: str = "bad_upload") -> Answer:
        return self._answer(UploadVerdict(Verdict.REFUSE, reason, code), sync)

    def _refusal(self, sync: BarrierSync, reason: str, code: str, fx: Effects) -> Handled:
        return Handled(self._answer(UploadVerdict(Verdict.REFUSE, reason, code), sync), fx)

    def _verdict(self, node: str, sync: BarrierSync, now: float) -> UploadVerdict:
        return self.session.upload(
            node, sync.round, now, base_round=sync.base_round, delta=sync.delta
        )

    # ---- the two questions ---------------------------------------------------------------
    def admit(self, node: str, sync: BarrierSync, now: float) -> Admission:
        """What to do with ``node``'s upload for ``sync.round``, before its body is read."""
        verdict = self._verdict(node, sync, now)
        answer = self._answer(verdict, sync)
        if verdict.kind is Verdict.REFUSE:
            return Admission(Admit.REFUSE, answer)
        limit, hint = self.rounds.max_upload(self.max_model_bytes)
        if self.rounds.sharded is not None and sync.round > 0:
            if not sync.delta:
                why = "a sharded session takes changes only, not whole weights; update the node"
                return Admission(Admit.REFUSE, self._refused(sync, why))
            return Admission(Admit.READ, answer, commit=True)
        if verdict.kind in (Verdict.INITIAL, Verdict.OPEN):
            return Admission(Admit.READ, answer, limit, hint, self.rounds.upload_check(sync))
        return Admission(Admit.DRAIN, answer, limit, hint)

    async def accept(
        self, node: str, sync: BarrierSync, blob: bytes | Commit, now: float
    ) -> Handled:
        """``node``'s upload is here (read as :meth:`admit` said): decide again, then adopt
        it as round 0, or decode and accumulate it into the open round."""
        verdict = self._verdict(node, sync, now)
        match verdict.kind:
            case Verdict.INITIAL:
                assert isinstance(blob, bytes)
                return await self._initial(node, sync, blob, verdict)
            case Verdict.LEFT_OUT:
                fx = effects.left_out(self.session, node, sync.round, verdict.reason, now)
                return Handled(self._answer(verdict, sync), fx)
            case Verdict.OPEN:
                return await self._open(node, sync, blob, now)
            case _:
                return Handled(self._answer(verdict, sync), Effects())

    def unread(self, node: str, sync: BarrierSync, why: Unread, reason: str, now: float) -> Handled:
        """An admitted upload whose body was not read (``why``, ``reason``): the node is left
        out of the round, with a strike unless it was only slow or sent no start-up weights."""
        s = self.session
        if why is Unread.TOO_SLOW:
            reason = f"upload {reason}: this coordinator's --min-upload-rate; a faster link helps"
            if sync.round > 0:
                fx = effects.reject(s, node, sync.round, reason, now, strikes=False)
            else:
                fx = Effects(events=[f"node {short_id(node)} upload dropped: {reason}"])
            return self._refusal(sync, reason, "too_slow", fx)
        if why is Unread.TOO_LARGE:
            fx = Effects()
            if sync.round > 0:
                fx = effects.reject(s, node, sync.round, reason, now, strikes=True)
            return self._refusal(sync, reason, "too_large", fx)
        strikes = why is not Unread.NO_WEIGHTS
        fx = effects.reject(s, node, sync.round, reason, now, strikes=strikes)
        return self._refusal(sync, reason, "need_weights" if not strikes else "bad_upload", fx)

    def pending(self) -> Effects:
        """The effects of accumulations whose caller went away meanwhile (then forgotten)."""
        fx, self._pending = self._pending, Effects()
        return fx

    # ---- accepting -------------------------------------------------------------------------
    async def _initial(
        self, node: str, sync: BarrierSync, blob: bytes, verdict: UploadVerdict
    ) -> Handled:
        """The first start-up weights become round 0; a later node's get the current ones."""
        try:
            event = await self._adopt(node, blob)
        except SessionError as exc:
            fx = Effects()
            if exc.code != "need_weights":
                fx = effects.reject(
                    self.session, node, 0, str(exc), self.rounds.clock(), strikes=True
                )
            return self._refusal(sync, str(exc), exc.code, fx)
        if event is None:
            current = UploadVerdict(Verdict.CURRENT, "start-up sync: global weights")
            return Handled(self._answer(current, sync), Effects())
        return Handled(self._answer(verdict, sync), Effects(events=[event]))

    async def _adopt(self, node: str, blob: bytes) -> str | None:
        """Adopt ``blob`` as round 0: the event to log, or None if another node's came first.

        They must be the model the nodes announced (the session's pinned fingerprint); its
        header was checked before the body was read, this checks the decoded tensors."""
        s = self.session
        async with self.rounds.lock:
            if s.has_weights:
                return None
            if not blob:
                raise SessionError(
                    "this coordinator has no global weights yet: send the start-up weights",
                    code="need_weights",
                )
            sd = await asyncio.to_thread(self.rounds.decode, blob)
            await asyncio.to_thread(validate_upload, sd, sd)
            fp = modelspec.state_fingerprint(sd)
            if fp != s.model_fingerprint:
                raise SessionError(
                    "start-up weights are not the model the nodes announced (fingerprint "
                    f"{fp[:12]}…, the session's {s.model_fingerprint[:12]}…)",
                    code="bad_upload",
                )
            size = await self.rounds.write_initial(node, sd, {})
        return f"round 0: start-up weights from node {short_id(node)} ({size} bytes)"

    async def _open(
        self, node: str, sync: BarrierSync, blob: bytes | Commit, now: float
    ) -> Handled:
        """An upload for the open round: left out when its base is stale, else decoded and
        accumulated."""
        s = self.session
        stale = self.rounds.stale_base(sync)
        if stale:
            # An honest race (the node's base moved on), not a bad upload: no strike.
            fx = effects.reject(s, node, sync.round, stale, now, strikes=False)
            return Handled(self._answer(UploadVerdict(Verdict.LEFT_OUT, stale), sync), fx)
        try:
            sd = (
                blob
                if isinstance(blob, Commit)
                else await asyncio.to_thread(self.rounds.decode, blob, sync)
            )
        except SessionError as exc:
            fx = effects.reject(s, node, sync.round, str(exc), self.rounds.clock(), strikes=True)
            return self._refusal(sync, str(exc), exc.code, fx)
        # Adding into the shared sums must run to its end even if this node's connection
        # drops meanwhile (which cancels its tasks): a half-added upload would corrupt the
        # round, and the sums and the session must agree on who arrived.
        # The change's bytes, pushed to the seats in a sharded session.
        size = sum(blob.sizes) if isinstance(blob, Commit) else len(blob)
        adding = asyncio.ensure_future(self._accumulate(node, sync, sd, size))
        try:
            return await asyncio.shield(adding)
        except asyncio.CancelledError:
            adding.add_done_callback(self._keep_effects)
            raise

    def _keep_effects(self, task: asyncio.Future[Handled]) -> None:
        if not task.cancelled() and task.exception() is None:
            self._pending.add(task.result().effects)

    async def _accumulate(self, node: str, sync: BarrierSync, sd: Any, nbytes: int) -> Handled:
        s, rounds = self.session, self.rounds
        async with rounds.lock:
            # The round may have closed while the upload was decoded.
            now = rounds.clock()
            verdict = self._verdict(node, sync, now)
            if verdict.kind is Verdict.LEFT_OUT:
                fx = effects.left_out(s, node, sync.round, verdict.reason, now)
                return Handled(self._answer(verdict, sync), fx)
            if verdict.kind is not Verdict.OPEN:
                return Handled(self._answer(verdict, sync), Effects())
            assert rounds.acc is not None
            # Samples trained since the last barrier, at most the work of the node's rounds
            # since its last counted upload; 0 (nothing left in its shard) adds nothing.
            weight = s.weight_for(node, sync.samples, sync.round)
            try:
                change, why, weight = await self._add(node, sync, sd, weight)
            except SessionError as exc:
                honest = exc.code == "left_out"  # not the node's fault: no strike
                fx = effects.reject(s, node, sync.round, str(exc), now, strikes=not honest)
                if honest:
                    return Handled(
                        self._answer(UploadVerdict(Verdict.LEFT_OUT, str(exc)), sync), fx
                    )
                return self._refusal(sync, str(exc), exc.code, fx)
            decision = s.arrived(
                node,
                sync.round,
                int(weight),
                rounds.clock(),
                sync.train_seconds,
                epoch=sync.epoch,
                epoch_samples=sync.epoch_samples,
                loss=sync.loss,
                change=change,
                evidence=not why,
            )
            rounds.counted[node] = (sync, nbytes)
            fx = Effects(decision=decision)
            if why:
                fx.add(self._no_training(node, sync, why, weight, rounds.clock()))
        log.info(
            "barrier.arrived node=%s round=%d samples=%d", short_id(node), sync.round, sync.samples
        )
        return Handled(self._answer(verdict, sync), fx)

    async def _add(
        self, node: str, sync: BarrierSync, sd: Any, weight: float
    ) -> tuple[float, str, float]:
        """Add an upload to the open round: (its change's norm, why it shows no training,
        its weight). A sharded round's commit goes into the books (its norm, known once the
        round settles, is judged then); SessionError when it is refused."""
        acc = self.rounds.acc
        if isinstance(acc, ShardedRound):
            refused, fault = acc.add(node, sd, weight)
            if fault:
                raise SessionError(f"commit refused: {refused}", code="bad_upload")
            if refused:
                raise SessionError(refused, code="left_out")
            return 0.0, "", weight
        assert acc is not None
        change = await asyncio.to_thread(acc.change, sd, delta=sync.delta)
        why = self.session.evidence.judge(change, weight)
        if why and change <= 0:
            weight = 0.0  # trained nothing: it weighs nothing
        await asyncio.to_thread(acc.add, node, sd, weight, delta=sync.delta)
        return change, why, weight

    def _no_training(
        self, node: str, sync: BarrierSync, why: str, weight: float, now: float
    ) -> Effects:
        """An upload that arrived but shows no training (``evidence.py``): said in the log;
        an unchanged one (weighed 0) is a strike."""
        reason = f"node {short_id(node)} upload for round {sync.round} shows no training: {why}"
        if weight > 0:
            return Effects(events=[f"{reason}; counted, but not as work delivered"])
        fx = Effects(events=[f"{reason}; weighed 0"])
        return fx.add(effects.strike(self.session, node, reason, now))

    # ---- answering -------------------------------------------------------------------------
    async def ready(self, answer: Answer, base_sha256: str, joiner: str = "") -> Ready:
        """The frames of ``answer`` (see :meth:`Answer.ready`)."""
        s, verdict = self.session, answer.verdict
        if verdict.kind is Verdict.CURRENT:
            # A round that has just completed is published only once the state file is
            # written: wait for its weights rather than hand out older ones.
            w = await self.rounds.published(s.completed)
        elif verdict.kind.at_once:
            assert self.rounds.current is not None
            w = self.rounds.current
        else:
            w = await self.rounds.published(answer.upload_round)
        # What the node holds decides what it needs: nothing, the change, or everything.
        payload, blob, sha = w.payload_for(base_sha256)
        if payload == "weights" and joiner and self.rounds.sharded is not None:
            table = self.rounds.sharded.chunks_for(w.completed_round, w.sha256, w.blob, joiner)
            if table:  # the members hold these weights: fetched from several of them
                payload, blob, sha = "chunks", table, sha256_bytes(table)
        frame = BarrierReady(
            round=w.completed_round,
            sha256=w.sha256,
            contributed=verdict.kind.contributed,
            reason=verdict.reason,
            epoch=w.epoch,
            # A stop decided between epochs finishes the session on weights that were
            # published before it was known to be final.
            finished=w.finished or (s.finished and w.completed_round >= s.completed),
            payload=payload,
            base_round=w.base_round if payload == "delta" else -1,
        )
        return Ready(frame, payload, blob, sha)


__all__ = ["Admission", "Admit", "Answer", "Handled", "Ready", "Unread", "Uploads"]
