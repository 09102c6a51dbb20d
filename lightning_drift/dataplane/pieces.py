"""Moving pieces of the sharded data plane between members: the I/O, and no decision.

A member's encoded change is cut into pieces (``plan.py``); each piece goes to the members that
aggregate its shard, and each shard's result piece is fetched by every member. This module
moves those bytes and nothing else:

- :class:`~lightning_drift.dataplane.store.PieceStore` (``store.py``) holds pieces in
  memory, keyed by (upload round, shard, kind, sha256), within a byte cap (older rounds make
  room for newer ones).
- :class:`PieceServer` answers ``PiecePut`` and ``PieceGet`` streams on a member's data-plane
  endpoint. Only keys it was told to :meth:`~PieceServer.allow` get in; which pieces it takes,
  and at what size, it asks its ``expect`` callback before reading any byte of a body.
- :class:`PieceClient` pushes pieces to members and fetches them, one connection per member.

Who aggregates what, and which pieces to expect, is decided elsewhere and handed in. Every
wait is bounded: a frame by a timeout, a body by a minimum byte rate after a grace period
(``streams``), a connection by QUIC itself; a member holds at most a few connections open.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from typing import Any

from lightning_drift.dataplane.store import STORE_BYTES, PieceKey, PieceStore
from lightning_drift.errors import DriftError, PeerLost, PieceRefused, ProtocolError, TooSlow
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.peers import PeerName, parse_peer
from lightning_drift.protocol import (
    BlobHeader,
    Error,
    PieceAck,
    PieceGet,
    PieceKind,
    PiecePut,
    _Msg,
    expect,
)
from lightning_drift.streams import Stream
from lightning_drift.text import clean_text, is_hex64, short_id
from lightning_drift.transport import Connection, Endpoint, peer_key

log = logging.getLogger(__name__)

MAX_CONNS_PER_PEER = 4  # connections one member may hold open to another's server
MIN_BYTES_S = 16 << 10  # bytes/s a piece's sender must keep after the grace period (as uploads)
GRACE_S = 30.0  # seconds a piece's transfer may take before the rate floor applies
ANSWER_S = 30.0  # seconds to wait for a frame that should come at once (a request, an answer)
CONNECT_S = 15.0  # seconds to wait for a connection to a member
_REASON_CHARS = 300  # of a peer's reason, shown in an error

Expect = Callable[[bytes, int, int, PieceKind], int | str]
"""``expect(peer_key, upload_round, shard, kind)``: the exact size of a piece the server takes
from that peer, or the reason it does not."""

OnPiece = Callable[[bytes, int, int, PieceKind, str, bytes], None]
"""``on_piece(peer_key, upload_round, shard, kind, sha256, data)``: a piece was taken and
stored; called before the sender is told so."""


def _bad_fields(msg: PiecePut | PieceGet) -> str:
    """Why a piece's name cannot be right ("" when it can)."""
    if msg.round < 0 or msg.shard < 0 or msg.size < 0:
        return f"round {msg.round}, shard {msg.shard} and size {msg.size} must not be negative"
    if not is_hex64(msg.sha256):
        return "sha256 must be 64 lowercase hex characters"
    return ""


def _bound(fixed_s: float, size: int, min_rate: float) -> float:
    """Seconds a transfer of ``size`` bytes may take: ``fixed_s`` plus size at the floor."""
    return fixed_s + (size / min_rate if min_rate > 0 else 0.0)


# --------------------------------------------------------------------------------------------
# The store


# --------------------------------------------------------------------------------------------
# The server


class PieceServer:
    """Takes and gives pieces on a member's data-plane endpoint (which stays the caller's).

    Make it on the event loop that serves; it accepts at once. A connection from a key not in
    the allowed set is closed at once (close code 1, with the reason); :meth:`allow` replaces
    the set and cuts off connections of keys it no longer holds. Each connection and each
    stream runs in its own task with its own error handling, so a bad peer costs only its own
    streams. Counters: ``bytes_in`` (piece bytes received whole and verified), ``bytes_out``
    (piece bytes sent), and the same per peer key in ``bytes_in_by_peer`` and
    ``bytes_out_by_peer``.

    The endpoint's connections all come here (an endpoint has one accept queue): give the
    server an endpoint of its own, not the one a node waits for its coordinator on."""

    def __init__(
        self,
        endpoint: Endpoint,
        store: PieceStore,
        expect: Expect,
        on_piece: OnPiece | None = None,
        *,
        allowed: Iterable[bytes] = (),
        answer_timeout_s: float = ANSWER_S,
        min_rate: float = MIN_BYTES_S,
        grace_s: float = GRACE_S,
        hold_s: float = 0.0,
    ) -> None:
        self.endpoint = endpoint
        self.store = store
        self.hold_s = hold_s  # how long a fetch of a piece not held yet may wait for it
        self.expect = expect
        self.on_piece = on_piece
        self.answer_timeout_s = answer_timeout_s
        self.min_rate = min_rate
        self.grace_s = grace_s
        self.bytes_in = 0
        self.bytes_out = 0
        self.bytes_in_by_peer: dict[bytes, int] = {}
        self.bytes_out_by_peer: dict[bytes, int] = {}
        self._allowed: frozenset[bytes] = frozenset(bytes(k) for k in allowed)
        self._conns: dict[bytes, set[Connection]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False
        self._accept_task = asyncio.create_task(self._accept())

    def allow(self, keys: Iterable[bytes]) -> None:
        """Let exactly these endpoint keys in from now on; cut off connections of any other."""
        self._allowed = frozenset(bytes(k) for k in keys)
        for key, conns in list(self._conns.items()):
            if key not in self._allowed:
                log.info("piece peer cut off peer=%s", short_id(key.hex()))
                for conn in list(conns):
                    conn.close(1, "cut off: this member no longer takes pieces from you")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _accept(self) -> None:
        while not self._closed:
            conn = await self.endpoint.accept()
            if conn is None:  # the endpoint was closed
                return
            if conn.remote_key not in self._allowed:
                log.warning("piece connection refused peer=%s reason=not_allowed", _who(conn))
                conn.close(1, "not allowed: this member takes pieces only from its session")
                continue
            held = self._conns.setdefault(conn.remote_key, set())
            if len(held) >= MAX_CONNS_PER_PEER:
                log.warning("piece connection refused peer=%s reason=too_many", _who(conn))
                conn.close(1, f"too many connections: a member keeps at most {MAX_CONNS_PER_PEER}")
                continue
            held.add(conn)
            self._spawn(self._serve(conn))

    async def _serve(self, conn: Connection) -> None:
        """One connection: a task per stream, until the connection ends. An idle connection
        waits here until its peer closes it, :meth:`allow` cuts it off, or QUIC notices a
        silent peer."""
        try:
            while not self._closed:
                try:
                    stream = await conn.accept_stream()
                except PeerLost:
                    return
                self._spawn(self._stream(conn, stream))
        finally:
            conns = self._conns.get(conn.remote_key, set())
            conns.discard(conn)
            if not conns:
                self._conns.pop(conn.remote_key, None)

    async def _stream(self, conn: Connection, stream: Stream) -> None:
        who = _who(conn)
        try:
            try:
                first = await asyncio.wait_for(stream.recv(), self.answer_timeout_s)
            except asyncio.TimeoutError:
                log.info("piece stream dropped peer=%s reason=no_request", who)
                return
            if isinstance(first, PiecePut):
                await self._take(conn, stream, first)
            elif isinstance(first, PieceGet):
                await self._give(conn, stream, first)
            else:
                raise ProtocolError(f"expected PiecePut or PieceGet, got {type(first).__name__}")
        except ProtocolError as exc:
            log.warning("piece protocol error peer=%s error=%s", who, exc)
            with contextlib.suppress(DriftError, asyncio.TimeoutError):
                await self._answer(stream, Error(code="protocol", message=str(exc)))
            conn.close(2, "protocol error")
        except (DriftError, asyncio.TimeoutError) as exc:
            log.info("piece stream ended peer=%s error=%r", who, exc)
        except Exception:
            log.exception("piece stream failed peer=%s", who)

    async def _answer(self, stream: Stream, msg: _Msg) -> None:
        await asyncio.wait_for(stream.send(msg), self.answer_timeout_s)
        with contextlib.suppress(DriftError):
            await stream.finish()

    async def _refuse(
        self, conn: Connection, stream: Stream, put: PiecePut, reason: str, *, stop: bool = True
    ) -> None:
        """Answer ``PieceAck(ok=False)``; with ``stop`` (no read pending on the stream: the
        binding would block) also stop reading, so the sender's writes fail at once."""
        log.info(
            "piece refused peer=%s round=%d shard=%d kind=%s size=%d reason=%s",
            _who(conn),
            put.round,
            put.shard,
            put.kind,
            put.size,
            clean_text(reason, _REASON_CHARS),
        )
        await self._answer(stream, PieceAck(ok=False, reason=reason))
        if stop:
            await stream.stop_reading()

    def _expected(self, peer: bytes, put: PiecePut) -> int | str:
        """The size the piece must have, or why it is refused; every check before the body."""
        if problem := _bad_fields(put):
            return f"bad_input: {problem}"
        try:
            expected = self.expect(peer, put.round, put.shard, put.kind)
        except Exception:
            log.exception("piece expect failed peer=%s round=%d", short_id(peer.hex()), put.round)
            return "internal: the member could not decide about the piece"
        if isinstance(expected, str):
            return expected
        if put.size != expected:
            return f"size: {put.size} bytes declared, {expected} expected"
        if not self.store.room_for(put.round, put.size):
            return "store_full: no room for the piece; try again after the round completes"
        return expected

    async def _take(self, conn: Connection, stream: Stream, put: PiecePut) -> None:
        peer = conn.remote_key
        expected = self._expected(peer, put)
        if isinstance(expected, str):
            return await self._refuse(conn, stream, put, expected)
        frame = await asyncio.wait_for(stream.recv(), self.answer_timeout_s)
        header = expect(frame, BlobHeader)
        assert isinstance(header, BlobHeader)
        if header.size != put.size or header.sha256 != put.sha256:
            return await self._refuse(conn, stream, put, "the blob is not the piece PiecePut names")
        try:
            _, data = await stream.recv_blob(
                header=header, max_size=expected, min_rate=self.min_rate, grace_s=self.grace_s
            )
        except (TooSlow, ProtocolError) as exc:  # corrupt or too slow: refuse, keep the peer
            # After TooSlow a cancelled read may still be pending: do not stop reading then.
            stop = not isinstance(exc, TooSlow)
            with contextlib.suppress(DriftError, asyncio.TimeoutError):
                await self._refuse(conn, stream, put, f"bad_piece: {exc}", stop=stop)
            return
        assert isinstance(data, bytes)
        self.bytes_in += len(data)
        self.bytes_in_by_peer[peer] = self.bytes_in_by_peer.get(peer, 0) + len(data)
        if peer not in self._allowed:  # cut off while its piece arrived
            return
        try:
            self.store.put(put.round, put.shard, put.kind, put.sha256, data)
        except PieceRefused as exc:
            return await self._refuse(conn, stream, put, f"store_full: {exc}")
        if self.on_piece is not None:
            try:
                self.on_piece(peer, put.round, put.shard, put.kind, put.sha256, data)
            except Exception:
                log.exception("piece on_piece failed peer=%s round=%d", _who(conn), put.round)
                self.store.discard(put.round, put.shard, put.kind, put.sha256)
                await self._answer(stream, PieceAck(ok=False, reason="internal: not taken"))
                return
        log.debug("piece taken peer=%s round=%d shard=%d", _who(conn), put.round, put.shard)
        await self._answer(stream, PieceAck(ok=True))

    async def _give(self, conn: Connection, stream: Stream, get: PieceGet) -> None:
        problem = _bad_fields(get)
        data = None
        if not problem:
            data = await self.store.arrival(
                get.round,
                get.shard,
                get.kind,
                get.sha256,
                self.hold_s,
            )
        if data is None or len(data) != get.size:
            message = problem or (
                f"this member does not hold piece round={get.round} shard={get.shard} "
                f"kind={get.kind} of {get.size} bytes with that sha256"
            )
            return await self._answer(stream, Error(code="no_piece", message=message))
        bound = _bound(self.answer_timeout_s + self.grace_s, len(data), self.min_rate)
        await asyncio.wait_for(stream.send_blob(data, kind="piece", sha256=get.sha256), bound)
        with contextlib.suppress(DriftError):
            await stream.finish()
        peer = conn.remote_key
        self.bytes_out += len(data)
        self.bytes_out_by_peer[peer] = self.bytes_out_by_peer.get(peer, 0) + len(data)

    async def close(self) -> None:
        """Stop accepting, close every piece connection, end every task. Idempotent; the
        endpoint stays open (it is the caller's)."""
        if self._closed:
            return
        self._closed = True
        self._accept_task.cancel()
        for conns in list(self._conns.values()):
            for conn in list(conns):
                conn.close(0, "the member stops serving pieces")
        tasks = [self._accept_task, *self._tasks]
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks, timeout=5)


def _who(conn: Connection) -> str:
    return short_id(conn.remote_hex)


# --------------------------------------------------------------------------------------------
# The client


class PieceClient:
    """Pushes pieces to members and fetches them, over the node's own data-plane endpoint.

    One connection per member, dialled when first needed; a connection found lost is dialled
    again once. Failures raise: ``PieceRefused`` (the member refused the piece or does not
    hold it), ``ProtocolError`` (a wrong or corrupt answer), ``PeerLost`` (the connection
    ended, or no answer in time), ``ConnectTimeout``/``AuthError`` (no connection to that key).
    Counters: ``bytes_out`` (piece bytes pushed), ``bytes_in`` (piece bytes fetched), and the
    same per member key in ``bytes_out_by_peer`` and ``bytes_in_by_peer``."""

    def __init__(
        self,
        endpoint: Endpoint,
        *,
        connect_timeout_s: float = CONNECT_S,
        answer_timeout_s: float = ANSWER_S,
        min_rate: float = MIN_BYTES_S,
        grace_s: float = GRACE_S,
    ) -> None:
        self.endpoint = endpoint
        self.connect_timeout_s = connect_timeout_s
        self.answer_timeout_s = answer_timeout_s
        self.min_rate = min_rate
        self.grace_s = grace_s
        self.bytes_out = 0
        self.bytes_in = 0
        self.bytes_out_by_peer: dict[bytes, int] = {}
        self.bytes_in_by_peer: dict[bytes, int] = {}
        self._conns: dict[bytes, Connection] = {}
        self._dialing: dict[bytes, asyncio.Lock] = {}

    async def push(
        self, peer: PeerName | str, upload_round: int, shard: int, kind: PieceKind, data: bytes
    ) -> None:
        """Give ``peer`` this piece; returns once it has stored it.

        Bounded by ``answer_timeout_s + grace_s + len(data) / min_rate`` per try."""
        sha256 = sha256_bytes(data)
        put = PiecePut(round=upload_round, shard=shard, kind=kind, sha256=sha256, size=len(data))
        what = f"pushing piece round={upload_round} shard={shard} kind={kind}"

        async def exchange(conn: Connection, who: str) -> None:
            stream = await conn.open_stream()
            await stream.send(put)
            try:
                await stream.send_blob(data, kind="piece", sha256=sha256)
                await stream.finish()
            except PeerLost as exc:
                # The member may have refused the piece from its PiecePut and stopped
                # reading: its answer says why, which beats "the stream ended".
                try:
                    answer = await stream.recv()
                except DriftError:
                    raise exc from None
            else:
                answer = await stream.recv()
            if isinstance(answer, Error):
                raise _refusal(what, who, answer.code, answer.message)
            ack = expect(answer, PieceAck)
            assert isinstance(ack, PieceAck)
            if not ack.ok:
                raise _refusal(what, who, "refused", ack.reason)

        key = await self._run(peer, what, len(data), exchange)
        self.bytes_out += len(data)
        self.bytes_out_by_peer[key] = self.bytes_out_by_peer.get(key, 0) + len(data)

    async def fetch(
        self,
        peer: PeerName | str,
        upload_round: int,
        shard: int,
        kind: PieceKind,
        sha256: str,
        size: int,
    ) -> bytes:
        """The piece's bytes from ``peer``, sha256 checked. A blob of another size or digest
        is refused before any of it is read. Bounded as :meth:`push` is."""
        get = PieceGet(round=upload_round, shard=shard, kind=kind, sha256=sha256, size=size)
        what = f"fetching piece round={upload_round} shard={shard} kind={kind}"
        got: list[bytes] = []

        async def exchange(conn: Connection, who: str) -> None:
            stream = await conn.open_stream()
            await stream.send(get)
            with contextlib.suppress(DriftError):
                await stream.finish()
            answer = await stream.recv()
            if isinstance(answer, Error):
                raise _refusal(what, who, answer.code, answer.message)
            header = expect(answer, BlobHeader)
            assert isinstance(header, BlobHeader)
            if header.size != size or header.sha256 != sha256:
                await stream.stop_reading()
                raise ProtocolError(
                    f"{what}: {who} offered {header.size} bytes with sha256 "
                    f"{clean_text(header.sha256, 16)}…, not the piece asked for ({size} bytes, "
                    f"{sha256[:16]}…); refused before reading it"
                )
            try:
                _, data = await stream.recv_blob(
                    header=header, max_size=size, min_rate=self.min_rate, grace_s=self.grace_s
                )
            except ProtocolError as exc:
                raise ProtocolError(f"{what}: from {who}: {exc}") from None
            assert isinstance(data, bytes)
            got.append(data)

        key = await self._run(peer, what, size, exchange)
        self.bytes_in += size
        self.bytes_in_by_peer[key] = self.bytes_in_by_peer.get(key, 0) + size
        return got[0]

    async def _run(
        self,
        peer: PeerName | str,
        what: str,
        size: int,
        exchange: Callable[[Connection, str], Awaitable[None]],
    ) -> bytes:
        """Run ``exchange`` on a new stream to ``peer`` within its bound; dial again once
        when a connection used before turns out lost. Returns the peer's key."""
        name = peer if isinstance(peer, PeerName) else parse_peer(peer)
        key = peer_key(name)
        who = short_id(key.hex())
        bound = _bound(self.answer_timeout_s + self.grace_s, size, self.min_rate)
        for attempt in (1, 2):
            conn, fresh = await self._connection(name, key)
            try:
                await asyncio.wait_for(exchange(conn, who), bound)
                return key
            except asyncio.TimeoutError:
                self._drop(key, conn, "no answer in time")
                raise PeerLost(
                    f"{what}: {who} did not answer within {bound:.0f} s (the piece and its "
                    "answer, at the minimum byte rate); check that the member runs"
                ) from None
            except PeerLost as exc:
                closed = conn.close_reason()  # the member's reason, before we close it too
                self._drop(key, conn, "lost")
                if fresh or attempt == 2 or isinstance(exc, TooSlow):
                    hint = f"; {clean_text(closed, _REASON_CHARS)}" if closed else ""
                    raise PeerLost(f"{what}: {exc}{hint}") from None
                log.info("piece connection lost peer=%s redialling=1 error=%s", who, exc)
        raise AssertionError("unreachable")

    async def _connection(self, name: PeerName, key: bytes) -> tuple[Connection, bool]:
        """The connection to ``key`` and whether it was dialled just now."""
        async with self._dialing.setdefault(key, asyncio.Lock()):
            conn = self._conns.get(key)
            if conn is not None and conn.close_reason() is None:
                return conn, False
            conn = await self.endpoint.dial_peer(name, timeout=self.connect_timeout_s)
            self._conns[key] = conn
            return conn, True

    def _drop(self, key: bytes, conn: Connection, reason: str) -> None:
        if self._conns.get(key) is conn:
            del self._conns[key]
        conn.close(0, reason)

    async def close(self) -> None:
        """Close every connection this client dialled (the endpoint stays the caller's)."""
        for key, conn in list(self._conns.items()):
            self._drop(key, conn, "done")


def _refusal(what: str, who: str, code: str, message: str) -> PieceRefused:
    why = clean_text(message, _REASON_CHARS)
    return PieceRefused(f"{what}: {who} refused: {why}", clean_text(code, 40) or "refused")


__all__ = ["ANSWER_S", "CONNECT_S", "GRACE_S", "MAX_CONNS_PER_PEER", "MIN_BYTES_S", "STORE_BYTES"]
__all__ += ["Expect", "OnPiece", "PieceClient", "PieceKey", "PieceServer", "PieceStore"]
