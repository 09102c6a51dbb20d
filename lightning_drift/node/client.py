"""The async protocol client: one connection to a coordinator, pure asyncio, no threads.

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
from collections.abc import Callable, Sequence
from typing import Any

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
from lightning_drift.transport import (
    Connection,
    Endpoint,
    Stream,
    local_bind_for,
    ticket_addrs,
    ticket_key,
)

log = logging.getLogger(__name__)


def refusal(err: p.Error) -> DriftError:
    """The exception for an ``Error`` frame from the coordinator."""
    if err.code == "auth":
        return AuthError(err.message)
    if err.code == "protocol":
        return ProtocolError(f"coordinator says: {err.message}")
    return SessionError(err.message, err.code)


def finished(finish: p.Finish) -> SessionFinished:
    """The exception for the coordinator's ``Finish``."""
    return SessionFinished(finish.round, sha256=finish.sha256, checkpoint=finish.checkpoint)


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
        self.error: DriftError | None = None  # why the control stream ended
        self._send_lock = asyncio.Lock()
        self._shards: dict[int, asyncio.Future[p.ShardAssignment]] = {}
        self._statuses: list[asyncio.Future[p.SessionStatus]] = []
        self._tasks: list[asyncio.Task[Any]] = []
        self._closed = False
        self._last_rx = 0.0
        self.silence_s: float | None = None
        # Called (on the loop) with every re-plan of the epoch being trained: an assignment
        # that comes unasked with a revision above 0.
        self.on_replan: Callable[[p.ShardAssignment], None] | None = None

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
        mode: str = "local",
        relay_urls: Sequence[str] = (),
        endpoint: Endpoint | None = None,
        secret: bytes | None = None,
        held_round: int = -1,
        silence_s: float | None = None,
        observe: bool = False,
        via: Sequence[str] = (),
        on_replan: Callable[[p.ShardAssignment], None] | None = None,
    ) -> CoordinatorClient:
        """Dial the coordinator named in ``token``, join, and finish the handshake.

        The token is checked first against the key in its own ticket (a forged or corrupted
        token never leaves this machine), and the QUIC peer must be that key. A node token
        needs ``node_info`` (a NodeInfo or a function making one; its nonce is filled in);
        an observer token needs nothing more. ``endpoint`` lets many clients share one
        process's endpoints; otherwise one is bound (``secret``: the node's 32-byte key seed,
        random when None) and closed by :meth:`close`. ``held_round``: the round whose
        global weights the node holds (-1: none), told to the coordinator as
        ``Join.resume_round``. ``silence_s``: how long without any
        message from the coordinator before the connection counts as lost (default
        ``3 × TrainConfig.heartbeat_s``, at least 3 s). ``observe``: status only, with any
        valid token (no membership, no NodeInfo); observer tokens always connect this way.
        ``via``: dial these ``host:port`` addresses instead of the ticket's (a forwarded
        port, a proxy); the coordinator must still hold the key the token names.
        ``on_replan``: called with each re-plan of the epoch being trained (an unasked
        ShardAssignment with ``revision`` > 0), from the first message on.
        """
        claims, _, _ = decode_token(token)
        key = ticket_key(claims.coordinator)
        # Expiry is the coordinator's call: it still admits a member of the session whose
        # token expired while it trained (new nodes get the "expired" reason from it).
        verify_token(token, key, now=time.time(), allow_expired=True)
        own = endpoint is None
        if endpoint is None:
            endpoint = await Endpoint.bind(
                mode=mode,
                secret=secret if secret is not None else os.urandom(32),
                bind_addr=local_bind_for(list(via) or ticket_addrs(claims.coordinator))
                if mode == "local"
                else None,
                relay_urls=relay_urls,
            )
        try:
            return await asyncio.wait_for(
                cls._handshake(
                    endpoint,
                    own,
                    token,
                    claims.role,
                    key,
                    claims.coordinator,
                    node_info,
                    name,
                    timeout,
                    held_round,
                    silence_s,
                    observe,
                    tuple(via),
                    on_replan,
                ),
                timeout * 2,
            )
        except asyncio.TimeoutError:
            if own:
                await endpoint.close()
            raise PeerLost(
                f"the coordinator did not finish the handshake within {timeout * 2:g}s"
            ) from None
        except BaseException:
            if own:
                await endpoint.close()
            raise

    @classmethod
    async def _handshake(
        cls,
        endpoint: Endpoint,
        own: bool,
        token: str,
        role: str,
        key: bytes,
        ticket: str,
        node_info: p.NodeInfo | Callable[[], p.NodeInfo] | None,
        name: str,
        timeout: float,
        held_round: int,
        silence_s: float | None = None,
        observe: bool = False,
        via: tuple[str, ...] = (),
        on_replan: Callable[[p.ShardAssignment], None] | None = None,
    ) -> CoordinatorClient:
        conn = await endpoint.dial(ticket, timeout=timeout, expect_key=key, via=via)
        try:
            control = await conn.open_stream()
            await control.send(
                p.Join(
                    token=token,
                    node_key=endpoint.key_hex,
                    drift_version=__version__,
                    name=name,
                    resume_round=held_round,
                    observe=observe,
                )
            )
            self = cls(endpoint, own, conn, control)
            self.role = "observer" if observe else role
            self.on_replan = on_replan
            self.silence_s = silence_s
            if self.role == "node":
                if node_info is None:
                    raise ValueError("a node token needs node_info (NodeInfo or a factory)")
                first = await control.recv()
                if isinstance(first, p.Error):
                    raise refusal(first)
                ping = p.expect(first, p.Ping)
                info = node_info() if callable(node_info) else node_info
                assert isinstance(ping, p.Ping)
                await control.send(msgspec.structs.replace(info, nonce=ping.nonce))
                cfg = await control.recv()
                if isinstance(cfg, p.Error):
                    raise refusal(cfg)
                self.config = p.expect(cfg, p.TrainConfig)  # type: ignore[assignment]
                self._tasks.append(asyncio.create_task(self._heartbeat()))
            self._tasks.append(asyncio.create_task(self._reader()))
            return self
        except BaseException:
            conn.close(0, "")
            raise

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
                    fut = self._shards.pop(msg.epoch, None)
                    asked_before = any(e <= msg.epoch for e in self._shards)
                    if fut is None and not asked_before and msg.revision > 0:
                        # Unasked: the coordinator re-planned the epoch being trained.
                        if self.on_replan is not None:
                            self.on_replan(msg)
                        continue
                    if fut is None:  # answered for a later epoch than asked (late/rejoin)
                        fut = next(iter(self._shards.values()), None)
                        if fut is not None:
                            self._shards = {e: f for e, f in self._shards.items() if f is not fut}
                    if fut is not None and not fut.done():
                        fut.set_result(msg)
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
                    done = finished(msg)
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

    def _fail(self, exc: DriftError) -> None:
        if self.error is None or isinstance(self.error, PeerLost):
            self.error = exc
        futs: list[asyncio.Future[Any]] = [*self._shards.values(), *self._statuses]
        for fut in futs:
            if not fut.done():
                fut.set_exception(exc)
        self._shards.clear()
        self._statuses.clear()

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
            raise finished(self.finish)
        fut = self._shards.get(epoch)
        if fut is None:
            fut = asyncio.get_running_loop().create_future()
            self._shards[epoch] = fut
            await self._send(p.ShardRequest(epoch=epoch))
        return await asyncio.shield(fut)

    async def progress(self, msg: p.TrainProgress) -> None:
        await self._send(msg)

    async def status(self) -> p.SessionStatus:
        fut: asyncio.Future[p.SessionStatus] = asyncio.get_running_loop().create_future()
        self._statuses.append(fut)
        await self._send(p.StatusRequest())
        return await fut

    async def barrier(
        self, sync: p.BarrierSync, weights: bytes | bytearray | memoryview
    ) -> tuple[p.BarrierReady, bytes]:
        """Upload ``weights`` for ``sync.round`` on a new stream; wait for the round's result.

        Returns ``BarrierReady`` and the global weights (safetensors bytes, sha256 checked).
        ``SessionError(code=...)`` when the coordinator refused the upload (e.g. bad_upload).
        """
        if self.error is not None and not isinstance(self.error, SessionError):
            raise self.error
        stream = await self.conn.open_stream()
        await stream.send(sync)
        try:
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
        if header.sha256 != ready.sha256:
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


__all__ = ["CoordinatorClient", "finished", "refusal"]
