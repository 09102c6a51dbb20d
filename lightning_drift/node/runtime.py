"""The node runtime: the training process's side of a drift session.

It owns the iroh endpoint and one asyncio loop running in a background thread, and offers
calls to the training thread: ``start`` (join and handshake), ``shard``, ``hand_off`` (a
barrier: the upload is built, sent and answered on the network thread while the caller goes
on; it gets a future), ``barrier`` (the same, waited for), ``report``, ``request_stop``,
``status`` and ``replan`` (the latest re-plan of the epoch, if one came);
:attr:`NodeRuntime.stop` is the session's decision to stop, once it was made (told on the
control stream, or at a reconnect's handshake). When the coordinator goes away (restart,
network drop) a call reconnects with exponential backoff and is retried, so the training
thread keeps its place: a barrier upload is kept until its ``BarrierReady`` arrives and is
sent again after a reconnect. ``close`` shuts the endpoint down before the process exits
(iroh can abort a process that exits with live endpoints).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import msgspec
import nacl.signing

from lightning_drift import protocol as p
from lightning_drift.errors import (
    AuthError,
    ConfigError,
    ConnectTimeout,
    DriftError,
    PeerLost,
    ProtocolError,
    SessionError,
    SessionFinished,
)
from lightning_drift.modelspec import Table
from lightning_drift.node import waiting
from lightning_drift.node.client import CoordinatorClient, finished_error
from lightning_drift.node.listen import CoordinatorListener
from lightning_drift.node.sharded import Held, NodeDataPlane
from lightning_drift.peers import parse_peer
from lightning_drift.transport import peer_key

log = logging.getLogger(__name__)
T = TypeVar("T")

# Refusals that a retry cannot cure: the token, the session or the data are wrong.
_FATAL = (AuthError, SessionError)


@dataclass(frozen=True)
class Delivery(Generic[T]):
    """A barrier's round trip, as :meth:`NodeRuntime.hand_off` completes it: the upload as
    sent (``sync``, ``payload``), the coordinator's answer (``ready``, ``blob``) and what the
    ``receive`` callback made of the blob."""

    sync: p.BarrierSync
    payload: bytes
    ready: p.BarrierReady
    blob: bytes
    weights: T


class NodeRuntime:
    """Blocking façade over an async :class:`~lightning_drift.node.client.CoordinatorClient`.

    Create it in the training process, call :meth:`start` once (typically from the strategy's
    setup), then :meth:`shard` each epoch and :meth:`barrier` at each barrier point. Every
    call is safe to make from any one thread at a time.
    """

    def __init__(
        self,
        token: str | None,
        node_info: Callable[[], p.NodeInfo],
        *,
        name: str = "",
        mode: str | None = None,
        relay_urls: tuple[str, ...] = (),
        via: tuple[str, ...] = (),
        connect_timeout: float = 30.0,
        reconnect_timeout: float = 300.0,
        backoff_max: float = 8.0,
        peer: str | None = None,
        listen: str | None = None,
        secret: bytes | None = None,
    ) -> None:
        """How the node reaches its coordinator:

        - ``token``: dial the coordinator the token names and join with it (``peer``, if
          given, must name the same coordinator);
        - no token, ``peer``: dial that coordinator (``ID``, ``ID@HOST:PORT`` or a ticket) and
          join without a token, as a node on its ``--peers`` list;
        - ``listen`` (``host:port``) and ``peer``: wait for that coordinator to dial in.

        ``secret``: the node's 32-byte key seed; the two ways without a token need the key
        the coordinator was given (random when None, good for token joins only).
        """
        if listen is not None and (peer is None or token is not None):
            raise ConfigError(
                "a listening node waits for the coordinator named by peer, and needs no token"
            )
        if token is None and peer is None:
            raise ConfigError("a node needs a token, or the coordinator's id (peer)")
        self.token = token
        self.peer = peer
        self.listen = listen
        self._listener: CoordinatorListener | None = None
        self._node_info = node_info
        self.name = name
        self.mode = mode
        self.relay_urls = relay_urls
        self.via = via
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.backoff_max = backoff_max
        # One key for the node's whole life: a reconnect comes back as the same member.
        self.secret = bytes(secret) if secret is not None else os.urandom(32)
        self.node_key = bytes(nacl.signing.SigningKey(self.secret).verify_key).hex()
        self.config: p.TrainConfig | None = None
        # The round of the last global weights the node received and verified (``receive``
        # returned): what a reconnect's Join.resume_round names.
        self.resume_round = -1
        self.bytes_sent = 0
        self.bytes_received = 0
        self.reconnects = 0
        self._stop: p.StopDecision | None = None
        self._client: CoordinatorClient | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._closed = False
        self._replan: p.ShardAssignment | None = None  # the latest re-plan not yet taken
        self._replan_lock = threading.Lock()
        self.data: NodeDataPlane | None = None  # this node's data endpoint (sharded sessions)

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> p.TrainConfig:
        """Start the loop thread, join the session and return its ``TrainConfig``.

        A listening node waits up to ``reconnect_timeout`` for the coordinator's first dial
        (it is usually started after the node, by someone given the node's address)."""
        if self._thread is None:
            ready = threading.Event()
            self._thread = threading.Thread(
                target=self._run_loop, args=(ready,), name="drift-node", daemon=True
            )
            self._thread.start()
            ready.wait()
        # The inner waits bound joining (the dial, then the handshake within twice the
        # connect timeout); these outer bounds only catch what they miss, with a message.
        if self.listen is None:
            waited = 3 * self.connect_timeout + 30
            self._call(self._connect(first=True), timeout=waited, what="joining the session")
        else:
            waited = self.reconnect_timeout + 3 * self.connect_timeout + 30
            self._call(self._first_dial(), timeout=waited, what="waiting for the coordinator")
        assert self.config is not None
        return self.config

    async def _first_dial(self) -> None:
        deadline = time.monotonic() + self.reconnect_timeout
        while True:
            try:
                await self._connect(first=True)
                return
            except ConnectTimeout as exc:
                if time.monotonic() > deadline:
                    raise ConnectTimeout(
                        f"{exc} (waited {self.reconnect_timeout:.0f} s in all)"
                    ) from None

    def close(self, reason: str = "done") -> None:
        """Say goodbye, close the endpoint and stop the loop thread. Idempotent."""
        if self._closed or self._loop is None:
            return
        self._closed = True
        try:
            self._call(self._close_client(reason), timeout=10)
        except Exception as exc:  # closing must never raise into teardown
            log.debug("close error=%r", exc)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> NodeRuntime:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- blocking calls for the training thread ------------------------------------------------

    def shard(self, epoch: int) -> p.ShardAssignment:
        """The shard of ``epoch``; blocks until the coordinator has planned it (saying so
        every while), or refuses an epoch it will never plan (``SessionError``)."""
        assert self._loop is not None, "NodeRuntime.start() must be called first"
        asked = self._retrying(lambda c: c.shard(epoch), what=f"shard epoch={epoch}")
        fut = asyncio.run_coroutine_threadsafe(asked, self._loop)
        return waiting.result(fut, f"the coordinator's plan of epoch {epoch}")

    def barrier(self, sync: p.BarrierSync, weights: bytes) -> tuple[p.BarrierReady, bytes]:
        """Upload ``weights`` for ``sync.round`` and block until the round's global weights come.

        Survives a coordinator restart: the same upload is sent again after reconnecting.
        """
        d = self.hand_off(lambda: (sync, weights), lambda ready, blob: None).result()
        return d.ready, d.blob

    def hand_off(
        self,
        prepare: Callable[[], tuple[p.BarrierSync, bytes]],
        receive: Callable[[p.BarrierReady, bytes], T],
    ) -> Future[Delivery[T]]:
        """Hold a barrier on the network thread; returns at once with its future.

        ``prepare`` makes the BarrierSync and the payload, and ``receive`` checks and decodes
        the round's global weights; both run in a worker thread of the loop (never in the
        caller's), so heavy serialization does not stall heartbeats or the caller. The future
        holds the :class:`Delivery`, or the error that ended the barrier (``SessionError``
        for a refusal, ``SessionFinished``, ``PeerLost`` after ``reconnect_timeout``).
        Survives a coordinator restart like :meth:`barrier`.
        """
        assert self._loop is not None, "NodeRuntime.start() must be called first"

        async def run() -> Delivery[T]:
            sync, payload = await asyncio.to_thread(prepare)
            ready, blob = await self._retrying(
                lambda c: (
                    self.data.barrier(c, sync, payload) if self.data else c.barrier(sync, payload)
                ),
                what=f"barrier round={sync.round}",
            )
            self.bytes_sent += len(payload)
            self.bytes_received += len(blob)
            weights = await asyncio.to_thread(receive, ready, blob)
            if self.data is not None:  # a sharded session's members serve joiners these
                await self.data.received(ready.round)
            self.resume_round = ready.round  # only once receive has checked them
            return Delivery(sync, payload, ready, blob, weights)

        return asyncio.run_coroutine_threadsafe(run(), self._loop)

    def replan(self) -> p.ShardAssignment | None:
        """The latest re-plan of the epoch the coordinator sent since the last call, or None.
        Non-blocking: the training thread polls it between steps."""
        with self._replan_lock:
            a, self._replan = self._replan, None
        return a

    def hold(self, held: Held, table: Callable[[], Table]) -> None:
        """Where a sharded session's seats find the global weights this node holds, and
        the local model's tensor table (its plan before it holds any)."""
        if self.data is not None:
            self.data.held, self.data.table = held, table

    def _on_unasked(self, msg: p.Message) -> None:
        if isinstance(msg, p.ShardAssignment):
            self._on_replan(msg)
        elif self.data is not None:
            self.data.unasked(msg)

    def _on_replan(self, a: p.ShardAssignment) -> None:
        with self._replan_lock:
            if self._replan is None or a.revision > self._replan.revision:
                self._replan = a
        log.info("replan epoch=%d revision=%d size=%d", a.epoch, a.revision, a.size)

    def report(self, progress: p.TrainProgress) -> None:
        """Send ``TrainProgress`` without waiting; dropped silently while reconnecting."""
        if self._loop is None or self._client is None:
            return
        if self.data is not None and self.data.bytes_moved:
            progress = msgspec.structs.replace(progress, data_bytes=self.data.bytes_moved)

        async def send() -> None:
            client = self._client
            if client is None:  # lost since the call: dropped like any report while reconnecting
                return
            try:
                await client.progress(progress)
            except DriftError as exc:
                log.debug("progress dropped error=%r", exc)

        asyncio.run_coroutine_threadsafe(send(), self._loop)

    @property
    def stop(self) -> p.StopDecision | None:
        """The session's decision to stop (it finishes on ``stop.round``), or None. Cheap:
        read it after every step."""
        client = self._client
        if self._stop is None and client is not None and client.stop is not None:
            self._stop = client.stop
        return self._stop

    def request_stop(self, request: p.StopRequest) -> p.StopDecision:
        """Ask the session to stop and wait for its answer (a round trip)."""
        # A decision to stop reaches the training thread one way: the client keeps it (its
        # reader sees the answer first), and :attr:`stop` reads it from there.
        return self._call(self._retrying(lambda c: c.request_stop(request), what="stop request"))

    def status(self) -> p.SessionStatus:
        """The coordinator's current view of the session."""
        return self._call(self._retrying(lambda c: c.status(), what="status"))

    # -- internals -----------------------------------------------------------------------------

    def _run_loop(self, ready: threading.Event) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        asyncio.set_event_loop(loop)
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.close()

    def _call(self, coro: Awaitable[T], timeout: float | None = None, what: str = "") -> T:
        """Run ``coro`` on the loop and wait for it; past ``timeout`` it is cancelled and
        ``ConnectTimeout`` names ``what`` it was doing."""
        assert self._loop is not None, "NodeRuntime.start() must be called first"
        fut: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)  # type: ignore[arg-type]
        try:
            return fut.result(timeout)
        except FutureTimeout:
            fut.cancel()
            raise ConnectTimeout(
                f"{what or 'a call to the coordinator'} did not finish within {timeout:g} s; "
                "check that the coordinator runs and can be reached"
            ) from None

    async def _connect(self, first: bool) -> None:
        client = await self._new_client()
        config = client.config
        assert config is not None, "a node token's handshake ends with TrainConfig"
        self._client = client
        self.config = config
        if self.data is not None:
            self.data.joined(self.node_key, config, client.conn.remote_key, client.progress)
        if not first:
            self.reconnects += 1
        log.info(
            "joined session=%s completed_round=%s reconnect=%s",
            config.session_id,
            config.round,
            not first,
        )

    async def _new_client(self) -> CoordinatorClient:
        """One connection to the coordinator, made the way this node reaches it."""
        if self.data is None:  # bound once: members reach it at the same address
            self.data = await NodeDataPlane.bind(
                self.token, self.peer, mode=self.mode, relay_urls=self.relay_urls, via=self.via
            )
        info = msgspec.structs.replace(self._node_info(), data_peer=self.data.peer)
        dialled: dict[str, Any] = dict(
            node_info=info,
            name=self.name,
            timeout=self.connect_timeout,
            mode=self.mode,
            relay_urls=self.relay_urls,
            resume_round=self.resume_round,
            secret=self.secret,
            via=self.via,
            on_unasked=self._on_unasked,
        )
        if self.token is not None:
            expect = peer_key(parse_peer(self.peer)) if self.peer else None
            return await CoordinatorClient.connect(self.token, expect_key=expect, **dialled)
        assert self.peer is not None, "checked in __init__"
        if self.listen is None:
            return await CoordinatorClient.join_peer(self.peer, **dialled)
        if self._listener is None:  # bound once: the same address for every reconnect
            self._listener = await CoordinatorListener.bind(
                secret=self.secret,
                coordinator_key=peer_key(parse_peer(self.peer)),
                mode=self.mode or "local",
                listen=self.listen,
                relay_urls=self.relay_urls,
            )
        return await CoordinatorClient.accept(
            self._listener,
            node_info=info,
            name=self.name,
            timeout=self.connect_timeout,
            on_unasked=self._on_unasked,
        )

    async def _reconnect(self, what: str, cause: Exception) -> None:
        """Reconnect with exponential backoff until ``reconnect_timeout`` has passed."""
        old, self._client = self._client, None
        if old is not None:
            with contextlib.suppress(Exception):
                await old.close()
        deadline = time.monotonic() + self.reconnect_timeout
        delay = 0.25
        log.warning("connection lost during=%s error=%s reconnecting", what, cause)
        while True:
            if self._closed:
                raise PeerLost("the node runtime was closed while reconnecting")
            try:
                await self._connect(first=False)
                return
            except _FATAL:
                raise
            except (PeerLost, ConnectTimeout, ProtocolError, OSError) as exc:
                if time.monotonic() + delay > deadline:
                    raise PeerLost(
                        f"could not reach the coordinator again within {self.reconnect_timeout:.0f} s "
                        f"(last error: {exc}); check that it is running, then restart this node "
                        "with its checkpoint to rejoin"
                    ) from exc
                log.info("reconnect failed error=%s retry_in=%.2fs", exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, self.backoff_max)

    async def _retrying(self, op: Callable[[CoordinatorClient], Awaitable[T]], what: str) -> T:
        while True:
            if self._client is None:
                await self._reconnect(what, PeerLost("not connected"))
            client = self._client
            assert client is not None, "a reconnect either connects or raises"
            try:
                return await op(client)
            except _FATAL:
                raise
            except SessionFinished:
                raise
            except (PeerLost, ConnectTimeout) as exc:
                if self._closed:
                    raise
                finish = self._client.finish if self._client is not None else None
                if finish is not None:
                    # The coordinator said the session is over, then went away: there is
                    # nothing to reconnect to.
                    raise finished_error(finish) from exc
                await self._reconnect(what, exc)

    async def _close_client(self, reason: str) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close(reason)
        listener, self._listener = self._listener, None
        if listener is not None:
            await listener.close()
        data, self.data = self.data, None
        if data is not None:
            await data.close()
