"""The coordinator's I/O shell: connections and streams, feeding the session and the rounds.

One task per connection reads the control stream (Join → Ping → NodeInfo → TrainConfig, then
progress, heartbeats, shard and status requests); every barrier is a new bi stream with its
own task. Frames become calls on :class:`~lightning_drift.coordinator.session.Session`, whose
decisions become frames. An upload goes from its stream to the session (its verdict), then to
:class:`~lightning_drift.coordinator.rounds.Rounds` (accumulate, or adopt), and is answered
with the weights the rounds publish; the rounds own everything from the accumulator to the
checkpoint and the published weights.

A misbehaving peer costs only its own connection: garbage gets an ``Error`` frame and the
connection is dropped; a bad upload gets an ``Error`` on its barrier stream and is excluded
from the round, never touching the global weights.

Entry point: :class:`Coordinator` (``start`` / ``run`` / ``stop`` / ``close``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lightning_drift.auth import Claims, TokenVerifier
from lightning_drift.checkpoint import CheckpointStore
from lightning_drift.coordinator.config import ServeOptions, SessionConfig
from lightning_drift.coordinator.rounds import Rounds
from lightning_drift.coordinator.session import RoundOutcome, Session, UploadVerdict, Verdict
from lightning_drift.coordinator.state import StateDir
from lightning_drift.errors import (
    AuthError,
    BlobTooLarge,
    DriftError,
    PeerLost,
    ProtocolError,
    SessionError,
)
from lightning_drift.protocol import (
    BarrierReady,
    BarrierSync,
    Bye,
    Error,
    Join,
    NodeInfo,
    Ping,
    SessionStatus,
    ShardAssignment,
    ShardRequest,
    StatusRequest,
    TrainProgress,
)
from lightning_drift.transport import Connection, Endpoint, Stream

log = logging.getLogger(__name__)


class NodeConn:
    """One node's connection and its control stream (sends serialized by a lock)."""

    def __init__(self, node: str, conn: Connection, control: Stream) -> None:
        self.node = node
        self.conn = conn
        self.control = control
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[Any]] = set()
        self.uploading = False

    async def send(self, msg: Any) -> bool:
        try:
            async with self.lock:
                await self.control.send(msg)
            return True
        except DriftError as exc:
            log.debug("send failed node=%s msg=%s error=%r", self.node[:8], type(msg).__name__, exc)
            return False


class Coordinator:
    """The long-running coordinator of one session.

    ``await start()`` loads (or creates) the state dir, binds the endpoint and issues the
    standing tokens; ``await run()`` serves until the session has finished (plus a grace)
    or :meth:`stop` is called; ``await close()`` closes the endpoint (always call it).
    """

    def __init__(
        self,
        config: SessionConfig,
        options: ServeOptions,
        *,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.config = config
        self.options = options
        self.clock = clock
        self.state = StateDir(options.state_dir)
        ckpt = options.checkpoint_dir or Path(options.state_dir) / "checkpoints"
        self.store = CheckpointStore(Path(ckpt), keep=options.keep)
        self.session: Session = None  # type: ignore[assignment]  # made by start()
        self.rounds: Rounds = None  # type: ignore[assignment]  # made by start()
        self.endpoint: Endpoint | None = None
        self.ticket = ""
        self.node_token = ""
        self.observer_token = ""
        self.conns: dict[str, NodeConn] = {}
        self.pending_shards: dict[str, int] = {}
        self.events: list[str] = []  # recent decisions and membership changes, for the view
        self._upload_sem = asyncio.Semaphore(options.max_uploads)
        self.fatal: str | None = None  # why the coordinator stopped on its own, if it did
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_ping = 0.0
        self.finished_at: float | None = None

    # ---- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        now = self.clock()
        self.state.ensure()
        identity = self.state.identity()
        saved = self.state.load_session()
        if saved is not None:
            self.session = Session.from_dict(saved, now=now)
            self.config = self.session.config
            log.info(
                "session.restored id=%s completed=%d epoch=%d members=%d",
                self.session.session_id,
                self.session.completed,
                self.session.epoch,
                len(self.session.members),
            )
        else:
            self.session = Session(self.config, session_id=secrets.token_hex(8), now=now)
            self.state.save_session(self.session.to_dict())
            log.info("session.new id=%s", self.session.session_id)
        self.rounds = Rounds(
            self.session,
            self.store,
            self.state,
            clock=self.clock,
            listener=self,
            spawn=self._spawn,
        )
        await self.rounds.load()
        self.verifier = TokenVerifier(
            identity.public_key, self.session.session_id, self.state.tokens().revoked()
        )
        o = self.options
        host = o.bind or ("127.0.0.1" if o.mode == "local" else "0.0.0.0")
        self.endpoint = await Endpoint.bind(
            mode=o.mode, secret=identity.seed, bind_addr=f"{host}:{o.port}", relay_urls=o.relay
        )
        self.ticket = self.endpoint.ticket()
        port = o.port
        if port == 0:  # the OS chose: store that one, so a restart binds it again
            ports = {int(a.rsplit(":", 1)[1]) for a in self.endpoint.addrs()}
            port = ports.pop() if len(ports) == 1 else 0
        # Also what `drift-coord serve` falls back to on a restart without these flags: the
        # same port, mode, bind address and relays give the same ticket, so tokens keep working.
        self.state.save_coordinator(
            {
                "ticket": self.ticket,
                "port": port,
                "bind": host,
                "mode": o.mode,
                "relay": list(o.relay),
                "checkpoint_dir": str(Path(o.checkpoint_dir).resolve())
                if o.checkpoint_dir
                else None,
                "session": self.session.session_id,
                "key": identity.public_hex,
            }
        )
        sid = self.session.session_id
        self.node_token, self.observer_token = (
            self.state.standing_token(
                identity,
                session=sid,
                ticket=self.ticket,
                role=role,
                ttl_s=o.token_ttl_s,
                now=now,
                min_left_s=min(3600.0, o.token_ttl_s / 2),
            )
            for role in ("node", "observer")
        )
        log.info(
            "coordinator.listening key=%s addrs=%s round=%d",
            identity.public_hex[:16],
            self.endpoint.addrs(),
            self.session.completed,
        )

    async def run(self) -> None:
        """Serve until the session finishes (then a grace period) or :meth:`stop`."""
        assert self.endpoint is not None, "call start() first"
        self._spawn(self._accept_loop())
        self._spawn(self._ticker())
        if self.session.finished and self.options.exit_when_done:
            # Restarted on a finished session: nodes that lost us at the very end may still
            # come back for the final weights; give them a while, then exit.
            self.finished_at = self.clock()
            self._spawn(self._stop_when_all_gone(at_least_s=min(30.0, self.options.finish_grace_s)))
        await self._stop.wait()

    def stop(self) -> None:
        self._stop.set()

    async def close(self) -> None:
        self._stop.set()
        for nc in list(self.conns.values()):
            nc.conn.close(0, "coordinator shutting down")
        for t in list(self._tasks):
            t.cancel()
        if self.endpoint is not None:
            await self.endpoint.close()

    def _spawn(self, coro) -> asyncio.Task[Any]:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._done)
        return task

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task.failed error=%r", task.exception(), exc_info=task.exception())

    def status(self) -> SessionStatus:
        current = self.rounds.current
        st = self.session.status(self.clock(), current.path if current else "")
        st.lightning_config = self.config.lightning_config
        return st

    # ---- what the rounds tell (RoundListener) ----------------------------------------------
    def event(self, text: str) -> None:
        """Log a decision or membership change and keep it for the view."""
        log.info("%s", text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-50]

    def round_completed(self, outcome: RoundOutcome) -> None:
        self._serve_pending_shards()
        if outcome.finished:
            self._finish()
        else:
            self._rebalance()

    def _rebalance(self) -> None:
        """Re-plan the rest of the epoch if the session says so, and tell the nodes."""
        before = self.session.last_rebalance
        replans = self.session.rebalance(self.clock())
        if self.session.last_rebalance != before:
            log.debug("rebalance %s", self.session.last_rebalance)
        if replans:
            self.event(self.session.last_rebalance)
            self._spawn(self._send_replans(replans))

    async def _send_replans(self, replans: list[tuple[str, ShardAssignment]]) -> None:
        # Durable before any node follows it: after a restart the coordinator must know the
        # work each node trains on (nodes that missed it get it again when they reconnect).
        await self.rounds.save_session()
        for node, assignment in replans:
            nc = self.conns.get(node)
            if nc is not None:
                await nc.send(assignment)

    def failed(self, reason: str) -> None:
        # Disk full, out of memory, ...: the round's state is now uncertain. Stop rather than
        # hang every node at this barrier; a restart on the same state dir resumes from the
        # last round whose state was saved, and nodes re-send their uploads.
        self.fatal = reason
        self.event(reason)
        for nc in list(self.conns.values()):
            nc.conn.close(2, "coordinator failed; it will be restarted")
        self._stop.set()

    # ---- connections ---------------------------------------------------------------------
    async def _accept_loop(self) -> None:
        assert self.endpoint is not None
        while True:
            conn = await self.endpoint.accept()
            if conn is None:
                return
            self._spawn(self._connection(conn))

    async def _connection(self, conn: Connection) -> None:
        t = self.options.handshake_timeout_s
        stream: Stream | None = None
        try:
            stream = await asyncio.wait_for(conn.accept_stream(), t)
            join = await asyncio.wait_for(stream.recv(), t)
        except ProtocolError as exc:
            log.info("handshake.garbage peer=%s error=%s", conn.remote_hex[:8], exc)
            if stream is None:  # no stream to answer on
                conn.close(1, "protocol")
            else:
                await _refuse(conn, stream, "protocol", str(exc))
            return
        except (asyncio.TimeoutError, DriftError) as exc:
            log.info("handshake.dropped peer=%s error=%r", conn.remote_hex[:8], exc)
            conn.close(1, "no Join")
            return
        try:
            await self._serve_peer(conn, stream, join)
        except ProtocolError as exc:
            await _refuse(conn, stream, "protocol", str(exc))
        except (PeerLost, asyncio.TimeoutError):
            pass
        except Exception as exc:  # a bug on one connection must not stop the session
            log.exception("connection.failed peer=%s", conn.remote_hex[:8])
            await _refuse(conn, stream, "internal", f"coordinator error: {exc!r}")

    async def _serve_peer(self, conn: Connection, stream: Stream, join: Any) -> None:
        if not isinstance(join, Join):
            await _refuse(conn, stream, "protocol", f"expected Join, got {type(join).__name__}")
            return
        now = self.clock()
        for jti in self.state.tokens().revoked():  # `drift-coord revoke` writes the file
            self.verifier.revoke(jti)
        try:
            claims = self.verifier.verify(join.token, now=now)
        except AuthError as exc:
            refusal = exc
            try:
                member = self._member_token(conn.remote_hex, join, now)
            except AuthError as why:  # a member: what else is wrong with its token
                refusal, member = why, None
            if member is None:
                log.info("join.refused peer=%s reason=%s", conn.remote_hex[:8], refusal)
                await _refuse(conn, stream, "auth", str(refusal))
                return
            claims = member
        if join.node_key.lower() != conn.remote_hex:
            await _refuse(
                conn,
                stream,
                "auth",
                f"Join.node_key {join.node_key[:16]}… is not the connection's key "
                f"{conn.remote_hex[:16]}…",
            )
            return
        if claims.role == "observer" or join.observe:
            await self._observer(conn, stream)
            return
        node = conn.remote_hex
        d = self.session.join(node, join.name, now)
        if not d.ok:
            await _refuse(conn, stream, d.code, d.reason)
            return
        self.event(d.reason)
        nonce = secrets.token_hex(8)
        await stream.send(Ping(session_id=self.session.session_id, nonce=nonce))
        info = await asyncio.wait_for(stream.recv(), self.options.handshake_timeout_s)
        if isinstance(info, Error):
            self.session.lost(node, f"refused handshake: {info.code}", self.clock(), left=True)
            conn.close(0, "")
            return
        if not isinstance(info, NodeInfo) or info.nonce != nonce:
            self.session.lost(node, "bad handshake", self.clock(), left=True)
            what = "NodeInfo with the Ping's nonce"
            await _refuse(conn, stream, "protocol", f"expected {what}, got {type(info).__name__}")
            return
        d = self.session.admit(node, info, self.clock())
        if not d.ok:
            self.session.lost(node, d.reason, self.clock(), left=True)
            self.event(f"node {node[:8]} refused: {d.reason}")
            await _refuse(conn, stream, d.code, d.reason)
            return
        old = self.conns.get(node)
        if old is not None:
            old.conn.close(0, "replaced by a newer connection of the same node")
        nc = NodeConn(node, conn, stream)
        self.conns[node] = nc
        reason = "connection closed"
        try:
            await stream.send(self.session.train_config())
            self.event(d.reason)
            replanned = self.session.assignments.get(node)
            if replanned is not None and replanned.revision > 0:
                # It may have missed its latest re-plan while it was away.
                await nc.send(replanned)
            self._serve_pending_shards()
            acceptor = asyncio.create_task(self._barrier_streams(nc))
            nc.tasks.add(acceptor)
            reason = await self._control(nc)
        except ProtocolError as exc:
            reason = f"protocol error: {exc}"
            await _refuse(conn, stream, "protocol", str(exc))
        except PeerLost as exc:
            reason = f"connection lost: {exc}"
        finally:
            for t in nc.tasks:
                t.cancel()
            if self.conns.get(node) is nc:
                del self.conns[node]
                self.pending_shards.pop(node, None)
                left = reason.startswith("bye")
                lost = self.session.lost(node, reason, self.clock(), left=left)
                if lost.ok:
                    self.event(lost.reason)
                self.rounds.consider(self.session.check(self.clock()))
            conn.close(0, "")

    def _member_token(self, node: str, join: Join, now: float) -> Claims | None:
        """For a member of the session: its token's claims with the expiry forgiven.

        Expiry limits who may join; it must not cut off a node in the middle of the session.
        A node whose key was admitted before (the QUIC peer key, so it proves it holds that
        key) may reconnect with a node token of this session signed by this coordinator and
        not revoked, even past its expiry. None for a node that is not a member; AuthError
        when the token is refused for another reason than its expiry.
        """
        s = self.session
        if join.observe or node not in s.admitted or node not in s.members:
            return None
        claims = self.verifier.verify(join.token, now=now, role="node", allow_expired=True)
        log.info("join.member_expired_token node=%s jti=%s", node[:8], claims.jti)
        return claims

    async def _control(self, nc: NodeConn) -> str:
        """Read the node's control stream until it ends; returns why it ended."""
        s = self.session
        while True:
            msg = await nc.control.recv()
            now = self.clock()
            s.seen(nc.node, now)
            if isinstance(msg, Ping):
                continue
            if isinstance(msg, TrainProgress):
                s.progress(nc.node, msg, now)
                self._rebalance()
            elif isinstance(msg, ShardRequest):
                await self._shard(nc, msg.epoch)
            elif isinstance(msg, StatusRequest):
                await nc.send(self.status())
            elif isinstance(msg, Bye):
                return f"bye: {msg.reason}" if msg.reason else "bye"
            elif isinstance(msg, Error):
                return f"node error {msg.code}: {msg.message}"
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} on the control stream")

    async def _observer(self, conn: Connection, stream: Stream) -> None:
        while True:
            msg = await stream.recv()
            if isinstance(msg, StatusRequest):
                await stream.send(self.status())
            elif isinstance(msg, Ping):
                continue
            elif isinstance(msg, Bye):
                conn.close(0, "")
                return
            else:
                raise ProtocolError(f"observers may send StatusRequest, not {type(msg).__name__}")

    async def _shard(self, nc: NodeConn, epoch: int) -> None:
        r = self.session.shard(nc.node, epoch, self.clock())
        if r.assignment is not None:
            self.pending_shards.pop(nc.node, None)
            # An epoch's plan and late assignments must survive a restart: nodes train on
            # them and re-send their uploads against them.
            await self.rounds.save_session()
            await nc.send(r.assignment)
        elif r.wait:
            self.pending_shards[nc.node] = epoch
            log.debug("shard.wait node=%s reason=%s", nc.node[:8], r.reason)
        elif r.code == "finished" and self.rounds.current is not None:
            await nc.send(self.rounds.finish_message())
        else:
            await nc.send(Error(code=r.code, message=r.reason))

    def _serve_pending_shards(self) -> None:
        for node, epoch in list(self.pending_shards.items()):
            nc = self.conns.get(node)
            if nc is not None:
                self._spawn(self._shard(nc, epoch))

    # ---- barriers ------------------------------------------------------------------------
    async def _barrier_streams(self, nc: NodeConn) -> None:
        while True:
            try:
                stream = await nc.conn.accept_stream()
            except DriftError:
                return
            task = asyncio.create_task(self._barrier(nc, stream))
            nc.tasks.add(task)
            task.add_done_callback(nc.tasks.discard)

    async def _barrier(self, nc: NodeConn, stream: Stream) -> None:
        node = nc.node
        try:
            sync = await stream.recv()
            if not isinstance(sync, BarrierSync):
                raise ProtocolError(f"a barrier stream starts with BarrierSync, not {sync}")
            if nc.uploading:
                raise ProtocolError("one barrier upload at a time per node")
            nc.uploading = True
            try:
                async with self._upload_sem:
                    # A peer that stops sending mid-blob must not hold an upload slot
                    # forever: past the limit the stream is abandoned (not resumed).
                    limit, hint = self.rounds.max_upload(self.options.max_model_bytes)
                    _, blob = await asyncio.wait_for(
                        stream.recv_blob(max_size=limit, limit_hint=hint),
                        self.options.upload_timeout_s,
                    )
                    assert isinstance(blob, bytes)
                    verdict = await self._take_upload(node, sync, blob)
                    del blob
            except asyncio.TimeoutError:
                raise ProtocolError(
                    f"upload not received within {self.options.upload_timeout_s:g} s"
                ) from None
            except BlobTooLarge as exc:
                # Refused from its header: stop the peer's sending at once, answer why, and
                # keep the connection (the node may have a smaller model to offer).
                await stream.stop_reading()
                if sync.round > 0:
                    self.rounds.reject(node, sync.round, str(exc))
                raise SessionError(str(exc), "too_large") from None
            finally:
                nc.uploading = False
            w = await self.rounds.answer(verdict, sync.round)
            await stream.send(
                BarrierReady(
                    round=w.completed_round,
                    sha256=w.sha256,
                    contributed=verdict.kind.contributed,
                    reason=verdict.reason,
                    epoch=w.epoch,
                    finished=w.finished,
                )
            )
            await stream.send_blob(w.blob, kind="weights", sha256=w.sha256)
            await stream.finish()
        except SessionError as exc:
            with contextlib.suppress(DriftError):
                await stream.send(Error(code=exc.code, message=str(exc)))
                await stream.finish()
        except ProtocolError as exc:
            with contextlib.suppress(DriftError):
                await stream.send(Error(code="protocol", message=str(exc)))
            nc.conn.close(1, "protocol error")
        except PeerLost:
            pass
        except Exception as exc:  # a bug must not leave the node waiting on this stream
            log.exception("barrier.failed node=%s", node[:8])
            with contextlib.suppress(DriftError):
                await stream.send(Error(code="internal", message=f"coordinator error: {exc!r}"))
                await stream.finish()

    async def _take_upload(self, node: str, sync: BarrierSync, blob: bytes) -> UploadVerdict:
        """The session's verdict on one upload, acted on by the rounds: the verdict to answer
        by. SessionError for a refusal or a bad upload."""
        base = sync.base_round if sync.delta else -1
        verdict = self.session.upload(node, sync.round, self.clock(), base_round=base)
        if verdict.kind is Verdict.REFUSE:
            raise SessionError(verdict.reason, verdict.code)
        return await self.rounds.take(node, sync, blob, verdict)

    def _finish(self) -> None:
        self.finished_at = self.clock()
        msg = self.rounds.finish_message()
        for nc in list(self.conns.values()):
            self._spawn(nc.send(msg))
        if self.options.exit_when_done:
            self._spawn(self._stop_when_all_gone())

    async def _stop_when_all_gone(self, at_least_s: float = 0.0) -> None:
        assert self.finished_at is not None
        while self.clock() - self.finished_at < self.options.finish_grace_s and (
            self.conns or self.clock() - self.finished_at < at_least_s
        ):
            await asyncio.sleep(self.options.tick_s)
        if self.conns:
            log.warning("finish.grace_over still_connected=%s", ",".join(n[:8] for n in self.conns))
        await asyncio.sleep(0.2)  # let the last frames leave
        self._stop.set()

    # ---- periodic ------------------------------------------------------------------------
    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.options.tick_s)
            now = self.clock()
            gone, d = self.session.tick(now)
            for node, reason in gone:
                self.event(f"node {node[:8]} lost: {reason}")
                nc = self.conns.pop(node, None)
                if nc is not None:
                    nc.conn.close(2, "heartbeat timeout")
            self.rounds.consider(d)
            if now - self._last_ping >= self.config.heartbeat_s:
                self._last_ping = now
                ping = Ping(session_id=self.session.session_id, nonce=f"hb{int(now)}")
                for nc in list(self.conns.values()):
                    self._spawn(nc.send(ping))


async def _refuse(conn: Connection, stream: Stream, code: str, message: str) -> None:
    """Send an Error frame, then drop the connection (a short wait lets the frame leave)."""
    with contextlib.suppress(DriftError, asyncio.TimeoutError):
        await asyncio.wait_for(stream.send(Error(code=code, message=message)), 2)
        await asyncio.wait_for(stream.finish(), 2)
    await asyncio.sleep(0.05)
    conn.close(1, code)


__all__ = ["Coordinator", "NodeConn"]
