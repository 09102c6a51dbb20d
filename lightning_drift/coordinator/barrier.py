"""One barrier stream's I/O: read its ``BarrierSync``, ask the upload core, read (or drain)
the body, ask again, carry out the effects, answer.

Every barrier is a new bi stream from a node, served by :meth:`BarrierStreams.serve` in its
own task. The decisions are the upload core's (``uploads.py``); this shell holds what is
about bytes and tasks: a stream that never says what it is is dropped after the handshake
timeout; only an upload that counts is read into memory, one per node at a time
(:attr:`BarrierStreams.uploading`), its header checked before its body and its buffer sized
from that; every upload must keep arriving at ``min_upload_rate`` bytes/s; only decoding and
accumulating take one of the ``max_uploads`` slots, so a slow sender holds none.

The boundary is here so that the server keeps the connections and the session's control
stream, and one upload's path (admit → read → accept → answer) reads top to bottom in one
place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable

from lightning_drift.coordinator import boundary
from lightning_drift.coordinator.config import ServeOptions
from lightning_drift.coordinator.effects import Effects
from lightning_drift.coordinator.replies import answer_error, refuse
from lightning_drift.coordinator.uploads import (
    Admission,
    Admit,
    Answer,
    Handled,
    Ready,
    Unread,
    Uploads,
)
from lightning_drift.dataplane.manifest import Commit
from lightning_drift.errors import BlobTooLarge, PeerLost, ProtocolError, SessionError, TooSlow
from lightning_drift.protocol import BarrierSync, PieceCommit
from lightning_drift.text import short_id
from lightning_drift.transport import Connection, Stream

log = logging.getLogger(__name__)


class BarrierStreams:
    """The barrier streams of every node (see the module docstring). ``carry_out`` is the
    server's: it carries out the effects the upload core returns."""

    def __init__(
        self,
        uploads: Uploads,
        options: ServeOptions,
        *,
        clock: Callable[[], float],
        carry_out: Callable[[Effects], None],
    ) -> None:
        self.uploads = uploads
        self.options = options
        self.clock = clock
        self.carry_out = carry_out
        self._uploading: set[str] = set()  # nodes with an upload being received
        self._slots = asyncio.Semaphore(options.max_uploads)

    @property
    def uploading(self) -> frozenset[str]:
        """The nodes whose upload is being received now."""
        return frozenset(self._uploading)

    @staticmethod
    async def _answer(stream: Stream, ready: Ready) -> None:
        await stream.send(ready.frame)
        await stream.send_blob(ready.blob, kind=ready.payload, sha256=ready.sha256)
        await stream.finish()

    async def serve(self, node: str, conn: Connection, stream: Stream) -> None:
        """One barrier stream of ``node`` (on ``conn``), from its BarrierSync to its answer;
        what goes wrong on it is answered on it (a protocol error drops the connection)."""
        sync: BarrierSync | None = None
        try:
            sync = await self._sync(node, stream)
            answer = await self._exchange(node, stream, sync)
            if answer.refused:
                await stream.stop_reading()
                await answer_error(stream, answer.verdict.code, answer.verdict.reason)
                return
            ready = await answer.ready(sync.base_sha256, "" if sync.whole else node)
            o = self.options
            # The answer is read at --min-upload-rate too, or the connection is dropped: a
            # node that reads nothing would hold this stream's task for ever.
            answer_s = o.upload_grace_s + len(ready.blob) / o.min_upload_rate
            try:
                await asyncio.wait_for(self._answer(stream, ready), answer_s)
            except asyncio.TimeoutError:
                why = (
                    f"node {short_id(node)} did not read round {ready.frame.round}'s answer within "
                    f"{answer_s:.0f}s (--min-upload-rate); dropping its connection"
                )
                self.carry_out(Effects(events=[why]))
                conn.close(2, "the node did not read its barrier's answer")
        except BlobTooLarge as exc:
            # Refused from its header: stop the peer's sending at once, answer why, and keep
            # the connection (the node may have a smaller model to offer).
            await stream.stop_reading()
            await self._unread(node, stream, sync, Unread.TOO_LARGE, str(exc))
        except TooSlow as exc:
            answer = self._carry(self._not_read(node, sync, Unread.TOO_SLOW, str(exc)))
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stream.stop_reading(), 2)
            await answer_error(stream, answer.verdict.code, answer.verdict.reason)
        except SessionError as exc:
            await stream.stop_reading()
            await answer_error(stream, exc.code, str(exc))
        except (ProtocolError, asyncio.TimeoutError) as exc:
            why = str(exc) or "no BarrierSync on a barrier stream in time"
            self.carry_out(
                Effects(
                    events=[
                        f"node {short_id(node)} dropped: protocol error on a barrier stream: {why}"
                    ]
                )
            )
            await refuse(conn, stream, "protocol", why)
        except PeerLost:
            pass
        except Exception as exc:  # a bug must not leave the node waiting on this stream
            log.exception("barrier.failed node=%s", short_id(node))
            await answer_error(stream, "internal", f"coordinator error: {exc!r}")

    async def _sync(self, node: str, stream: Stream) -> BarrierSync:
        """The stream's BarrierSync, through the trust boundary. A stream that never says
        what it is must not linger (no read timeouts inside a stream: on timeout it is
        abandoned)."""
        first = await asyncio.wait_for(stream.recv(), self.options.handshake_timeout_s)
        if not isinstance(first, BarrierSync):
            raise ProtocolError(
                f"a barrier stream starts with BarrierSync, not {type(first).__name__}"
            )
        sync = boundary.barrier_sync(first)
        if changed := boundary.bounded(first, sync):
            log.info("barrier.bounded node=%s %s", short_id(node), ", ".join(changed))
        return sync

    async def _exchange(self, node: str, stream: Stream, sync: BarrierSync) -> Answer:
        """Admit the upload (before any byte of its body is read), then read or drain its
        body as the admission says, and accept what was read: the answer to send."""
        o = self.options
        admission = self.uploads.admit(node, sync, self.clock())
        if admission.commit:
            return await self._commit(node, stream, sync)
        if admission.kind is Admit.READ:
            return await self._receive(node, stream, sync, admission)
        if admission.kind is Admit.DRAIN:
            await stream.drain_blob(
                max_size=admission.limit, min_rate=o.min_upload_rate, grace_s=o.upload_grace_s
            )
        return admission.answer

    async def _receive(
        self, node: str, stream: Stream, sync: BarrierSync, admission: Admission
    ) -> Answer:
        """Read an upload that counts and have it accepted: one at a time per node, its
        header checked before its body, at the minimum byte rate; decoding and accumulating
        in one of the ``max_uploads`` slots."""
        o = self.options
        if node in self._uploading:
            raise ProtocolError("one barrier upload at a time per node")
        self._uploading.add(node)
        try:
            _, blob = await stream.recv_blob(
                max_size=admission.limit,
                limit_hint=admission.hint,
                inspect=admission.check,
                min_rate=o.min_upload_rate,
                grace_s=o.upload_grace_s,
            )
            assert isinstance(blob, bytes)
        except SessionError as exc:
            # Refused from its first bytes: the node is left out (and gets a strike, unless
            # it only sent no start-up weights to a coordinator that has none).
            await stream.stop_reading()
            why = Unread.NO_WEIGHTS if exc.code == "need_weights" else Unread.BAD_HEADER
            return self._carry(self._not_read(node, sync, why, str(exc)))
        finally:
            self._uploading.discard(node)
        async with self._slots:
            handled = await self.uploads.accept(node, sync, blob, self.clock())
        del blob
        return self._carry(handled)

    async def _commit(self, node: str, stream: Stream, sync: BarrierSync) -> Answer:
        """A sharded session's upload: the hashes of the change's pieces (``PieceCommit``),
        which the node pushed to the shards' seats; a frame, checked by the books."""
        msg = await asyncio.wait_for(stream.recv(), self.options.handshake_timeout_s)
        if not isinstance(msg, PieceCommit):
            raise ProtocolError(f"a sharded upload is a PieceCommit, not {type(msg).__name__}")
        commit = Commit(round=msg.round, base=msg.base, pieces=msg.pieces, sizes=msg.sizes)
        async with self._slots:
            return self._carry(await self.uploads.accept(node, sync, commit, self.clock()))

    def _not_read(self, node: str, sync: BarrierSync | None, why: Unread, reason: str) -> Handled:
        assert sync is not None  # the body comes after the BarrierSync
        return self.uploads.unread(node, sync, why, reason, self.clock())

    async def _unread(
        self, node: str, stream: Stream, sync: BarrierSync | None, why: Unread, reason: str
    ) -> None:
        answer = self._carry(self._not_read(node, sync, why, reason))
        await answer_error(stream, answer.verdict.code, answer.verdict.reason)

    def _carry(self, handled: Handled) -> Answer:
        """Carry out ``handled``'s effects (before its answer may wait for them)."""
        self.carry_out(handled.effects)
        return handled.answer


__all__ = ["BarrierStreams"]
