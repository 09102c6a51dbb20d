"""The async protocol client: one connection to a coordinator, pure asyncio, no threads.

Three ways to a connection, one handshake from Ping on: :meth:`CoordinatorClient.connect`
(dial the coordinator a token names and join with the token), :meth:`~CoordinatorClient.join_peer`
(dial a coordinator named by id and join without a token, as a node on its ``--peers`` list)
and :meth:`~CoordinatorClient.accept` (a listening node: the coordinator dials in and starts
with Ping).

Use it directly from async code (tests, the barrier benchmark, ``drift-coord status``); the
training process wraps it in ``lightning_drift.node.runtime.NodeRuntime`` (a loop thread with
reconnect and backoff). One :class:`CoordinatorClient` is one connection: when it breaks,
calls raise ``PeerLost`` and the owner connects a new one (with the same ``secret``, so the
coordinator sees the same node).

Errors: ``AuthError`` (token refused, or the peer is not the key that signed it),
``SessionError`` (a refusal with a code: dataset_mismatch, bad_upload, ...), ``PeerLost``
(connection gone), ``ConnectTimeout``, and ``SessionFinished`` once the coordinator has said
``Finish``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import msgspec

from lightning_drift import __version__
from lightning_drift import protocol as p
from lightning_drift.auth import decode_token, verify_token
from lightning_drift.errors import (
    AuthError,
    DriftError,
    PeerLost,
    ProtocolError,
    SessionError,
    SessionFinished,
)
from lightning_drift.node.token import reach
from lightning_drift.peers import parse_peer
from lightning_drift.transport import (
    Connection,
    Endpoint,
    Stream,
    local_bind_for,
    peer_addrs,
    ticket_addrs,
    ticket_key,
)

if TYPE_CHECKING:
    from lightning_drift.node.listen import CoordinatorListener

log = logging.getLogger(__name__)
T = TypeVar("T")
# Seconds a request the coordinator answers at once (stop, status) may take, at least: its
# answer waits only for a state save to disk.
ANSWER_S = 30.0


def refusal(err: p.Error) -> DriftError:
    """The exception for an ``Error`` frame from the coordinator."""
    if err.code == "auth":
        return AuthError(err.message)
    if err.code == "protocol":
        return ProtocolError(f"coordinator says: {err.message}")
    return SessionError(err.message, err.code)


def finished_error(finish: p.Finish) -> SessionFinished:
    """The exception for the coordinator's ``Finish``."""
    return SessionFinished(finish.round, sha256=finish.sha256, checkpoint=finish.checkpoint)


@dataclass(frozen=True)
class _Joiner:
    """What a node says when it joins, whichever way it dialled (a token, or by id)."""

    token: str
    role: str
    node_info: p.NodeInfo | Callable[[], p.NodeInfo] | None
    name: str
    resume_round: int
    silence_s: float | None
    observe: bool
    on_unasked: Callable[[p.Message], None] | None


async def _endpoint(
    endpoint: Endpoint | None,
    mode: str,
    secret: bytes | None,
    addrs: list[str],
    relay_urls: Sequence[str],
) -> tuple[Endpoint, bool]:
    """The endpoint to dial from: the one given, or one bound now (``secret``: the node's key
    seed, random when None; in local mode bound beside ``addrs``); and whether it is ours."""
    if endpoint is not None:
        return endpoint, False
    bound = await Endpoint.bind(
        mode=mode,
        secret=secret if secret is not None else os.urandom(32),
        bind_addr=local_bind_for(addrs) if mode == "local" else None,
        relay_urls=relay_urls,
    )
    return bound, True


class CoordinatorClient:
    """A joined node (or an observer) talking to one coordinator over one connection."""

    def __init__(
        self, endpoint: Endpoint, own_endpoint: bool, conn: Connection, control: Stream
    ) -> None:
        self.endpoint = endpoint
        self._own_endpoint = own_endpoint
        self.conn = conn
        self.control = control
        self.config: p.TrainConfig | None = None  # None for observers
        self.role = "node"
        self.finish: p.Finish | None = None
        self.stop: p.StopDecision | None = None  # the session's decision to stop, once made
        self.error: DriftError | None = None  # why the control stream ended
        self._send_lock = asyncio.Lock()
        self._shards: dict[int, asyncio.Future[p.ShardAssignment]] = {}
        self._statuses: list[asyncio.Future[p.SessionStatus]] = []
        self._stop_answers: list[asyncio.Future[p.StopDecision]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._closed = False
        self._last_rx = 0.0
        self.silence_s: float | None = None
        # Called (on the loop) with what comes unasked: a re-plan of the epoch being trained
        # (an assignment with a revision above 0), a sharded session's Directory and orders.
        # Given when connecting, so that it is set before the reader starts.
        self.on_unasked: Callable[[p.Message], None] | None = None

    @property
    def node_key(self) -> str:
        return self.endpoint.key_hex

    # ---- connecting ---------------------------------------------------------------------
    @classmethod
    async def connect(
        cls,
        token: str,
        *,
        node_info: p.NodeInfo | Callable[[], p.NodeInfo] | None = None,
        name: str = "",
        timeout: float = 15.0,
        mode: str | None = None,
        relay_urls: Sequence[str] = (),
        endpoint: Endpoint | None = None,
        secret: bytes | None = None,
        resume_round: int = -1,
        silence_s: float | None = None,
        observe: bool = False,
        via: Sequence[str] = (),
        expect_key: bytes | None = None,
        on_unasked: Callable[[p.Message], None] | None = None,
    ) -> CoordinatorClient:
        """Dial the coordinator named in ``token``, join, and finish the handshake.

        The token is checked first against the key in its own ticket (a forged or corrupted
        token never leaves this machine), and the QUIC peer must be that key. A node token
        needs ``node_info`` (a NodeInfo or a function making one; its nonce is filled in);
        an observer token needs nothing more. ``endpoint`` lets many clients share one
        process's endpoints; otherwise one is bound (``secret``: the node's 32-byte key seed,
        random when None) and closed by :meth:`close`. ``resume_round``: the round whose
        global weights the node holds (-1: none), told to the coordinator as
        ``Join.resume_round``. ``silence_s``: how long without any
        message from the coordinator before the connection counts as lost (default
        ``3 × TrainConfig.heartbeat_s``, at least 3 s). ``mode`` and ``relay_urls``: how to
        reach the coordinator; by default what the token says (``local`` for a token that
        says nothing). ``observe``: status only, with any
        valid token (no membership, no NodeInfo); observer tokens always connect this way.
        ``via``: dial these ``host:port`` addresses instead of the ticket's (a forwarded
        port, a proxy); the coordinator must still hold the key the token names.
        ``expect_key``: refuse (AuthError) a token that names another coordinator than this
        key (``drift train --token T --peer ID``). ``on_unasked``: called on the loop with what
        comes unasked: every re-plan of the epoch being trained, a Directory, a ShardOrder.
        """
        claims, _, _ = decode_token(token)
        key = ticket_key(claims.coordinator)
        if expect_key is not None and key != bytes(expect_key):
            raise AuthError(
                f"the token names coordinator {key.hex()[:16]}…, not the peer "
                f"{bytes(expect_key).hex()[:16]}… this node was told to join"
            )
        # Expiry is the coordinator's call: it still admits a member of the session whose
        # token expired while it trained (new nodes get the "expired" reason from it).
        verify_token(token, key, now=time.time(), allow_expired=True)
        mode, relay_urls = reach(claims, mode, relay_urls)
        joiner = _Joiner(
            token, claims.role, node_info, name, resume_round, silence_s, observe, on_unasked
        )
        addrs = list(via) or ticket_addrs(claims.coordinator)
        endpoint, own = await _endpoint(endpoint, mode, secret, addrs, relay_urls)

        def dial(ep: Endpoint) -> Awaitable[Connection]:
            return ep.dial(claims.coordinator, timeout=timeout, expect_key=key, via=tuple(via))

        return await cls._dial_and_join(dial, endpoint, own, joiner, timeout)

    @classmethod
    async def join_peer(
        cls,
        coordinator: str,
        *,
        node_info: p.NodeInfo | Callable[[], p.NodeInfo] | None = None,
        name: str = "",
        timeout: float = 15.0,
        mode: str | None = None,
        relay_urls: Sequence[str] = (),
        endpoint: Endpoint | None = None,
        secret: bytes | None = None,
        resume_round: int = -1,
        silence_s: float | None = None,
        observe: bool = False,
        via: Sequence[str] = (),
        on_unasked: Callable[[p.Message], None] | None = None,
    ) -> CoordinatorClient:
        """Join without a token: dial the coordinator named by id and join as a node of its
        ``--peers`` list (the coordinator checks this node's key, so ``secret`` must be the
        key it was given: see ``Identity.load_or_create_file``).

        ``coordinator``: ``ID`` (internet mode: found by discovery), ``ID@HOST:PORT`` or a
        ticket. ``mode`` defaults to local. Otherwise as :meth:`connect`."""
        peer = parse_peer(coordinator)
        mode = mode or "local"
        joiner = _Joiner("", "node", node_info, name, resume_round, silence_s, observe, on_unasked)
        addrs = list(via) or peer_addrs(peer)
        endpoint, own = await _endpoint(endpoint, mode, secret, addrs, relay_urls)

        def dial(ep: Endpoint) -> Awaitable[Connection]:
            return ep.dial_peer(peer, timeout=timeout, via=via)

        return await cls._dial_and_join(dial, endpoint, own, joiner, timeout)

    @classmethod
    async def accept(
        cls,
        listener: CoordinatorListener,
        *,
        node_info: p.NodeInfo | Callable[[], p.NodeInfo],
        name: str = "",
        timeout: float = 15.0,
        silence_s: float | None = None,
        on_unasked: Callable[[p.Message], None] | None = None,
    ) -> CoordinatorClient:
        """Wait (up to ``timeout`` seconds) for the coordinator to dial this listening node,
        then finish the handshake it starts with Ping. The listener keeps its endpoint."""
        conn = await listener.next(timeout)

        async def handshake() -> CoordinatorClient:
            control = await conn.accept_stream()
            self = cls(listener.endpoint, False, conn, control)
            self.silence_s = silence_s
            self.on_unasked = on_unasked
            await self._from_ping(node_info, name)
            self._tasks.append(asyncio.create_task(self._reader()))
            return self

        try:
            return await cls._bounded(handshake(), None, timeout)
        except BaseException:
            conn.close(0, "")
            raise

    @staticmethod
    async def _bounded(
        handshake: Awaitable[CoordinatorClient], endpoint: Endpoint | None, timeout: float
    ) -> CoordinatorClient:
        """``handshake`` within ``2 × timeout``; ``endpoint`` (one we bound) is closed when
        it fails."""
        try:
            return await asyncio.wait_for(handshake, timeout * 2)
        except asyncio.TimeoutError:
            if endpoint is not None:
                await endpoint.close()
            raise PeerLost(
                f"the coordinator did not finish the handshake within {timeout * 2:g}s"
            ) from None
        except BaseException:
            if endpoint is not None:
                await endpoint.close()
            raise

    @classmethod
    async def _dial_and_join(
        cls,
        dial: Callable[[Endpoint], Awaitable[Connection]],
        endpoint: Endpoint,
        own: bool,
        joiner: _Joiner,
        timeout: float,
    ) -> CoordinatorClient:
        """Dial the coordinator (``dial``), then join as ``joiner`` says, all within
        ``2 × timeout``; an endpoint we bound (``own``) is closed when that fails."""

        async def handshake() -> CoordinatorClient:
            return await cls._joined(endpoint, own, await dial(endpoint), joiner)

        return await cls._bounded(handshake(), endpoint if own else None, timeout)

    @classmethod
    async def _joined(
        cls, endpoint: Endpoint, own: bool, conn: Connection, joiner: _Joiner
    ) -> CoordinatorClient:
        """Open the control stream on a connection we dialled, send Join, finish the
        handshake."""
        j = joiner
        try:
            control = await conn.open_stream()
            await control.send(
                p.Join(
                    token=j.token,
                    node_key=endpoint.key_hex,
                    drift_version=__version__,
                    name=j.name,
                    resume_round=j.resume_round,
                    observe=j.observe,
                )
            )
            self = cls(endpoint, own, conn, control)
            self.role = "observer" if j.observe else j.role
            self.silence_s = j.silence_s
            self.on_unasked = j.on_unasked
            if self.role == "node":
                if j.node_info is None:
                    raise ValueError("a node token needs node_info (NodeInfo or a factory)")
                await self._from_ping(j.node_info, j.name)
            self._tasks.append(asyncio.create_task(self._reader()))
            return self
        except BaseException:
            conn.close(0, "")
            raise

    async def _from_ping(self, node_info: p.NodeInfo | Callable[[], p.NodeInfo], name: str) -> None:
        """The node's side of the handshake from Ping on (whoever dialled): answer Ping with
        NodeInfo, take TrainConfig, start the heartbeat."""
        first = await self.control.recv()
        if isinstance(first, p.Error):
            raise refusal(first)
        ping = p.expect(first, p.Ping)
        info = node_info() if callable(node_info) else node_info
        assert isinstance(ping, p.Ping)
        await self.control.send(
            msgspec.structs.replace(info, nonce=ping.nonce, name=info.name or name)
        )
        cfg = await self.control.recv()
        if isinstance(cfg, p.Error):
            raise refusal(cfg)
        self.config = p.expect(cfg, p.TrainConfig)  # type: ignore[assignment]
        if self.config is not None and self.config.stop_round >= 0:
            # Decided while this node was away: it is told at the handshake.
            self.stop = p.StopDecision(
                stop=True,
                round=self.config.stop_round,
                reason="the session decided to stop while this node was away",
            )
        self._tasks.append(asyncio.create_task(self._heartbeat()))

    # ---- background ---------------------------------------------------------------------
    async def _send(self, msg: p.Message) -> None:
        if self.error is not None:
            raise self.error
        async with self._send_lock:
            await self.control.send(msg)

    async def _reader(self) -> None:
        try:
            while True:
                msg = await self.control.recv()
                self._last_rx = asyncio.get_running_loop().time()
                if isinstance(msg, p.Ping):
                    # Answering lets the coordinator see us alive even if our own pings lag.
                    with contextlib.suppress(DriftError):
                        await self._send(p.Ping(session_id=msg.session_id, nonce=msg.nonce))
                elif isinstance(msg, p.ShardAssignment):
                    self._on_shard(msg)
                elif isinstance(msg, (p.Directory, p.ShardOrder)) and self.on_unasked is not None:
                    self.on_unasked(msg)  # a sharded session's data plane
                elif isinstance(msg, p.StopDecision):
                    if msg.stop:
                        self.stop = msg
                    # A decision to stop answers every request in flight; an overruling
                    # answers the oldest (requests are answered in order).
                    waiting = self._stop_answers if msg.stop else self._stop_answers[:1]
                    for fut3 in waiting:
                        if not fut3.done():
                            fut3.set_result(msg)
                    del self._stop_answers[: len(waiting)]
                elif isinstance(msg, p.SessionStatus):
                    if self._statuses:
                        fut2 = self._statuses.pop(0)
                        if not fut2.done():
                            fut2.set_result(msg)
                elif isinstance(msg, p.Finish):
                    # The session is over, but this node may still owe its last barrier (a
                    # straggler left behind at the final deadline): that goes on its own
                    # stream and is answered with the final weights, so barriers and
                    # heartbeats go on. Only a wait for another epoch's shard ends here.
                    self.finish = msg
                    done = finished_error(msg)
                    for fut in self._shards.values():
                        if not fut.done():
                            fut.set_exception(done)
                    self._shards.clear()
                elif isinstance(msg, p.Error):
                    self._fail(refusal(msg))
                    return
                elif isinstance(msg, p.Bye):
                    self._fail(PeerLost(f"the coordinator said goodbye: {msg.reason}"))
                    return
                else:
                    log.debug("client.ignored msg=%s", type(msg).__name__)
        except DriftError as exc:
            self._fail(exc if isinstance(exc, PeerLost) else PeerLost(str(exc)))
        except asyncio.CancelledError:
            self._fail(PeerLost("client closed"))
            raise

    def _on_shard(self, msg: p.ShardAssignment) -> None:
        """An assignment: the answer to a shard request, or (unasked, revision above 0) a
        re-plan of the epoch being trained, handed to ``on_unasked``."""
        fut = self._shards.pop(msg.epoch, None)
        asked_before = any(e <= msg.epoch for e in self._shards)
        if fut is None and not asked_before and msg.revision > 0:
            if self.on_unasked is not None:
                self.on_unasked(msg)
            return
        if fut is None:  # answered for a later epoch than asked (late/rejoin)
            fut = next(iter(self._shards.values()), None)
            if fut is not None:
                self._shards = {e: f for e, f in self._shards.items() if f is not fut}
        if fut is not None and not fut.done():
            fut.set_result(msg)

    def _fail(self, exc: DriftError) -> None:
        if self.error is None or isinstance(self.error, PeerLost):
            self.error = exc
        futs: list[asyncio.Future[Any]] = [
            *self._shards.values(),
            *self._statuses,
            *self._stop_answers,
        ]
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)
        self._shards.clear()
        self._statuses.clear()
        self._stop_answers.clear()

    async def _heartbeat(self) -> None:
        """Ping every ``heartbeat_s``; declare the coordinator lost after ``silence_s`` of
        silence (it pings every ``heartbeat_s`` too). QUIC alone would take ~35 s."""
        assert self.config is not None
        every = max(0.2, self.config.heartbeat_s)
        silence = self.silence_s or max(3.0 * every, 3.0)
        sid = self.config.session_id
        loop = asyncio.get_running_loop()
        self._last_rx = loop.time()
        while True:
            woke_due = loop.time() + every
            await asyncio.sleep(every)
            if loop.time() - woke_due > every:
                # Our own loop was stalled (a long import, a busy CPU): the silence may be
                # ours, not the coordinator's. Give it a fresh window.
                self._last_rx = loop.time()
            quiet = loop.time() - self._last_rx
            if quiet > silence:
                self._fail(PeerLost(f"no message from the coordinator for {quiet:.1f}s"))
                self.conn.close(2, "coordinator silent")
                return
            try:
                await self._send(p.Ping(session_id=sid, nonce=secrets.token_hex(4)))
            except DriftError:
                return

    # ---- requests -----------------------------------------------------------------------
    async def shard(self, epoch: int) -> p.ShardAssignment:
        """The assignment for ``epoch``; waits while the coordinator has not planned it."""
        if self.finish is not None:
            raise finished_error(self.finish)
        fut = self._shards.get(epoch)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._shards[epoch] = fut
            await self._send(p.ShardRequest(epoch=epoch))
        return await asyncio.shield(fut)

    async def progress(self, msg: p.TrainProgress | p.ShardReport) -> None:
        await self._send(msg)

    async def request_stop(self, request: p.StopRequest) -> p.StopDecision:
        """Ask the session to stop; its answer (stop on a round, leave, or overruled; why)."""
        if self.stop is not None:
            return self.stop
        fut: asyncio.Future[p.StopDecision] = asyncio.get_running_loop().create_future()
        self._stop_answers.append(fut)
        await self._send(request)
        return await self._answer(fut, "a stop request")

    async def status(self) -> p.SessionStatus:
        fut: asyncio.Future[p.SessionStatus] = asyncio.get_running_loop().create_future()
        self._statuses.append(fut)
        await self._send(p.StatusRequest())
        return await self._answer(fut, "a status request")

    @property
    def answer_s(self) -> float:
        """How long a request the coordinator answers at once (stop, status) may take:
        several heartbeats, at least :data:`ANSWER_S`."""
        every = self.config.heartbeat_s if self.config is not None else 0.0
        return max(ANSWER_S, 6.0 * every)

    async def _answer(self, fut: asyncio.Future[T], what: str) -> T:
        """``fut``'s answer, or ``PeerLost`` after :attr:`answer_s` (a node reconnects then)."""
        try:
            return await asyncio.wait_for(asyncio.shield(fut), self.answer_s)
        except asyncio.TimeoutError:
            raise PeerLost(
                f"the coordinator did not answer {what} within {self.answer_s:g} s"
            ) from None

    async def barrier(
        self, sync: p.BarrierSync, weights: bytes | bytearray | memoryview | p.PieceCommit
    ) -> tuple[p.BarrierReady, bytes]:
        """Upload ``weights`` for ``sync.round`` on a new stream; wait for the round's result.
        (In a sharded session the upload is the ``PieceCommit`` of its pieces.)

        Returns ``BarrierReady`` and the blob that follows it: what it holds is
        ``BarrierReady.payload`` (the global weights, sha256 checked, or a change from the
        weights ``sync.base_sha256`` names, a sharded round's signed manifest, or nothing).
        ``SessionError(code=...)`` when the coordinator refused the upload (e.g. bad_upload).
        """
        if self.error is not None and not isinstance(self.error, SessionError):
            raise self.error
        stream = await self.conn.open_stream()
        await stream.send(sync)
        try:
            if isinstance(weights, p.PieceCommit):
                await stream.send(weights)
            else:
                await stream.send_blob(weights, kind="delta" if sync.delta else "weights")
        except DriftError as exc:
            # The coordinator may have refused the upload from its header and stopped reading
            # it: its Error on this stream says why, which beats "the stream ended".
            try:
                msg = await asyncio.wait_for(stream.recv(), 5.0)
            except (DriftError, asyncio.TimeoutError):
                raise exc from None
            if isinstance(msg, p.Error):
                raise refusal(msg) from None
            raise
        msg = await stream.recv()
        if isinstance(msg, p.Error):
            raise refusal(msg)
        ready = p.expect(msg, p.BarrierReady)
        header, blob = await stream.recv_blob()
        assert isinstance(ready, p.BarrierReady) and isinstance(blob, bytes)
        # The blob's own sha256 is checked by the transport; whole weights must also be the
        # ones BarrierReady names (a change is checked once it is applied, by the caller).
        if ready.payload == "weights" and header.sha256 != ready.sha256:
            raise ProtocolError(
                f"BarrierReady names sha256 {ready.sha256[:16]}… but the blob is "
                f"{header.sha256[:16]}…"
            )
        return ready, blob

    async def close(self, reason: str = "done") -> None:
        """Say Bye (best effort), stop the background tasks, close what we own. Idempotent."""
        if self._closed:
            return
        self._closed = True
        if self.error is None:
            with contextlib.suppress(DriftError, asyncio.TimeoutError):
                await asyncio.wait_for(self._send(p.Bye(reason=reason)), 2)
                await asyncio.sleep(0.02)  # let the frame leave before the close
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(BaseException):
                await t
        self.conn.close(0, reason)
        if self._own_endpoint:
            await self.endpoint.close()


__all__ = ["CoordinatorClient", "finished_error", "refusal"]
