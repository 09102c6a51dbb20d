"""The coordinator's I/O shell: connections and streams, feeding the session and the rounds.

One task per connection reads the control stream (Join → Ping → NodeInfo → TrainConfig, then
progress, heartbeats, shard and status requests); every barrier is a new bi stream with its
own task. Nodes dial in with a token, or without one when their key is on the ``--peers``
list; the coordinator also dials the listed nodes it has an address for (any id in internet
mode) and runs the same handshake from Ping on (:meth:`Coordinator._keep_dialing`). Frames
become calls on :class:`~lightning_drift.coordinator.session.Session`, whose decisions
become frames. An upload goes from its stream to the session (its verdict), then to
:class:`~lightning_drift.coordinator.rounds.Rounds` (accumulate, or adopt), and is answered
with the weights the rounds publish; the rounds own everything from the accumulator to the
checkpoint and the published weights.

Every frame from a node passes the trust boundary (``boundary.py``) before the session, the
rounds or a log line sees it. A misbehaving peer costs only its own connection: garbage gets
an ``Error`` frame and the connection is dropped; a bad upload gets an ``Error`` on its
barrier stream and is excluded from the round, never touching the global weights.

Admission comes before resources. An upload gets the session's verdict from its
``BarrierSync`` alone; only an upload that counts (round 0's first, or one for the open round)
is read into memory, one per node at a time, its safetensors header checked against the model
before its body is read and its buffer sized from that; an upload that does not count is read
and thrown away. Every upload must keep arriving at ``min_upload_rate`` bytes/s. Only decoding
and accumulating take one of the ``max_uploads`` slots, so a slow sender holds none.

Revocation: the ticker notices ``drift-coord revoke`` rewriting ``tokens.json`` and closes the
connections (nodes and observers) of the revoked token.

Entry point: :class:`Coordinator` (``start`` / ``run`` / ``stop`` / ``close``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning_drift.auth import Claims, TokenStore, TokenVerifier
from lightning_drift.checkpoint import CheckpointStore
from lightning_drift.coordinator import boundary
from lightning_drift.coordinator.config import ServeOptions, SessionConfig
from lightning_drift.coordinator.logs import SessionLog
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
    TooSlow,
)
from lightning_drift.peers import PeerName, parse_peer
from lightning_drift.protocol import (
    MAX_FRAME,
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
    StopDecision,
    StopRequest,
    TrainProgress,
    encode,
)
from lightning_drift.transport import Connection, Endpoint, Stream, peer_key

log = logging.getLogger(__name__)

STATUS_NODES_MAX = 256  # members listed in a SessionStatus (live ones first)
_DIAL_TIMEOUT_S = 10.0  # one dial of a --peers node
_DIAL_BACKOFF_MAX_S = 30.0  # the longest wait between two dials of a node that is not there


class NodeConn:
    """One node's connection and its control stream (sends serialized by a lock)."""

    def __init__(self, node: str, conn: Connection, control: Stream, token: str = "") -> None:
        self.node = node
        self.conn = conn
        self.control = control
        self.token = token  # the jti it joined with
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
        self.log_dir = Path(options.log_dir or Path(ckpt) / "logs")
        self.session_log: SessionLog | None = None  # made by start()
        self.session: Session = None  # type: ignore[assignment]  # made by start()
        self.rounds: Rounds = None  # type: ignore[assignment]  # made by start()
        self.endpoint: Endpoint | None = None
        self.ticket = ""
        self.node_token = ""
        self.observer_token = ""
        self.conns: dict[str, NodeConn] = {}
        self.observers: dict[int, tuple[Connection, str]] = {}  # id -> (conn, jti)
        self._uploading: set[str] = set()  # nodes with an upload being received
        self._tokens_seen: tuple[int, int] | None = None  # tokens.json (mtime_ns, size)
        self.pending_shards: dict[str, int] = {}
        self.events: list[str] = []  # recent decisions and membership changes, for the view
        self._upload_sem = asyncio.Semaphore(options.max_uploads)
        self.fatal: str | None = None  # why the coordinator stopped on its own, if it did
        self._stop = asyncio.Event()
        self._tasks: set[asyncio.Task[Any]] = set()
        self._last_ping = 0.0
        self.finished_at: float | None = None
        # The --peers list by key: nodes admitted without a token, dialled when possible.
        self.peers: dict[str, PeerName] = {}

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
        config = {k: v for k, v in asdict(self.session.config).items() if k != "lightning_config"}
        self.session_log = SessionLog(
            self.options.logger,
            self.log_dir,
            run=f"session-{self.session.session_id}",
            hparams={"session_id": self.session.session_id, **config},
        )
        self.session_log.open()
        self.rounds = Rounds(
            self.session,
            self.store,
            self.state,
            clock=self.clock,
            listener=self,
            spawn=self._spawn,
            record=self.session_log.log_round,
        )
        await self.rounds.load()
        if self.options.init is not None:
            if self.session.has_weights:
                log.warning(
                    "init.ignored path=%s reason=the session already has global weights (round %d)",
                    self.options.init,
                    self.session.completed,
                )
            else:
                await self.rounds.seed(self.options.init)
        self._tokens_seen = self._tokens_stamp()
        self.verifier = TokenVerifier(
            identity.public_key, self.session.session_id, self.state.tokens().revoked()
        )
        o = self.options
        self.peers = {}
        for text in o.peers:
            peer = parse_peer(text)
            self.peers[peer_key(peer).hex()] = peer
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
                "peers": list(o.peers),
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
                mode=o.mode,
                relays=o.relay,
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
        for key, peer in self.peers.items():
            if peer.has_address or self.options.mode == "internet":
                self._spawn(self._keep_dialing(key, peer))
            else:
                log.info("peer.waiting node=%s reason=no address in local mode", key[:8])
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
        if self.session_log is not None:
            log_, self.session_log = self.session_log, None
            status = "success" if self.session is not None and self.session.finished else "aborted"
            await asyncio.to_thread(log_.close, "failed" if self.fatal else status)

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
        """The session for observers: never over the frame limit (live members first, at
        most :data:`STATUS_NODES_MAX` of them; every string was bounded where it came in)."""
        current = self.rounds.current
        st = self.session.status(self.clock(), current.path if current else "")
        st.nodes.sort(key=lambda n: n.state in ("lost", "left", "excluded"))
        del st.nodes[STATUS_NODES_MAX:]
        st.lightning_config = self.config.lightning_config
        while len(encode(st)) > MAX_FRAME - 1024 and st.nodes:
            del st.nodes[len(st.nodes) // 2 :]
        if len(encode(st)) > MAX_FRAME - 1024:
            st.lightning_config = ""  # the operator's YAML alone is too large to show
        return st

    # ---- what the rounds tell (RoundListener) ----------------------------------------------
    def event(self, text: str) -> None:
        """Log a decision or membership change and keep it for the view."""
        text = boundary.clean_text(text, 4 * boundary.TEXT_MAX)
        log.info("%s", text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-50]

    def excluded(self, node: str, reason: str) -> None:
        """``node`` is excluded: tell it why and end its connection."""
        nc = self.conns.pop(node, None)
        self.pending_shards.pop(node, None)
        if nc is not None:
            self.event(
                f"node {node[:8]} disconnected: excluded; it joined with token {nc.token} "
                f"(`drift-coord revoke {nc.token}` keeps its holder out under any key)"
            )
            self._spawn(_refuse(nc.conn, nc.control, "excluded", reason))

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
            log.info(
                "handshake.garbage peer=%s error=%s", conn.remote_hex[:8], boundary.clean_text(exc)
            )
            if stream is None:  # no stream to answer on
                conn.close(1, "protocol")
            else:
                await _refuse(conn, stream, "protocol", str(exc))
            return
        except (asyncio.TimeoutError, DriftError) as exc:
            why = boundary.clean_text(repr(exc))
            log.info("handshake.dropped peer=%s error=%s", conn.remote_hex[:8], why)
            conn.close(1, "no Join")
            return
        await self._guarded(conn, stream, self._serve_peer(conn, stream, join))

    async def _guarded(self, conn: Connection, stream: Stream, serving: Awaitable[None]) -> None:
        """Serve one peer's connection; what goes wrong on it ends only it."""
        try:
            await serving
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
        join = boundary.join(join)
        now = self.clock()
        if not join.token:
            # No token: admitted only when the QUIC peer's key is on the --peers list.
            if conn.remote_hex not in self.peers:
                reason = (
                    f"node {conn.remote_hex[:16]}… has no token and is not on this "
                    "coordinator's --peers list; ask its operator to add this node's id "
                    "(`drift id` prints it), or join with a token"
                )
                log.info("join.refused peer=%s reason=not a listed peer", conn.remote_hex[:8])
                await _refuse(conn, stream, "auth", reason)
                return
            role, jti = "node", ""
        else:
            claims = await self._token_claims(conn, stream, join, now)
            if claims is None:
                return
            role, jti = claims.role, claims.jti
        if join.node_key.lower() != conn.remote_hex:
            await _refuse(
                conn,
                stream,
                "auth",
                f"Join.node_key {boundary.clean_text(join.node_key, 16)}… is not the "
                f"connection's key {conn.remote_hex[:16]}…",
            )
            return
        if role == "observer" or join.observe:
            self.observers[id(conn)] = (conn, jti)
            try:
                await self._observer(conn, stream)
            finally:
                self.observers.pop(id(conn), None)
            return
        await self._serve_node(conn, stream, join.name, jti)

    async def _token_claims(
        self, conn: Connection, stream: Stream, join: Join, now: float
    ) -> Claims | None:
        """The claims of a Join's token, or None after refusing it."""
        for jti in self.state.tokens().revoked():  # `drift-coord revoke` writes the file
            self.verifier.revoke(jti)
        try:
            return self.verifier.verify(join.token, now=now)
        except AuthError as exc:
            refusal = exc
            try:
                member = self._member_token(conn.remote_hex, join, now)
            except AuthError as why:  # a member: what else is wrong with its token
                refusal, member = why, None
            if member is None:
                log.info(
                    "join.refused peer=%s reason=%s",
                    conn.remote_hex[:8],
                    boundary.clean_text(refusal),
                )
                await _refuse(conn, stream, "auth", str(refusal))
            return member

    async def _serve_node(self, conn: Connection, stream: Stream, name: str, jti: str) -> None:
        """The handshake from Ping on (Ping → NodeInfo → TrainConfig), then the node's
        control stream until it ends: the same whichever side dialled. ``jti``: the token it
        joined with ("" for a node of the --peers list)."""
        node = conn.remote_hex
        d = self.session.join(node, name, self.clock(), token=jti)
        if not d.ok:
            self.event(f"node {node[:8]} refused ({d.code}, token {jti or 'none'}): {d.reason}")
            await _refuse(conn, stream, d.code, d.reason)
            return
        self.event(d.reason)
        nonce = secrets.token_hex(8)
        await stream.send(Ping(session_id=self.session.session_id, nonce=nonce))
        info = await asyncio.wait_for(stream.recv(), self.options.handshake_timeout_s)
        if isinstance(info, Error):
            code = boundary.clean_text(info.code, boundary.CODE_MAX)
            self.session.lost(node, f"refused handshake: {code}", self.clock(), left=True)
            conn.close(0, "")
            return
        if not isinstance(info, NodeInfo) or info.nonce != nonce:
            self.session.lost(node, "bad handshake", self.clock(), left=True)
            what = "NodeInfo with the Ping's nonce"
            await _refuse(conn, stream, "protocol", f"expected {what}, got {type(info).__name__}")
            return
        try:
            raw, info = info, boundary.node_info(info)
        except boundary.BadInput as exc:
            self.session.lost(node, str(exc), self.clock(), left=True)
            self.event(f"node {node[:8]} refused: {exc}")
            await _refuse(conn, stream, exc.code, str(exc))
            return
        changed = boundary.bounded(raw, info)
        if changed:
            self.event(f"node {node[:8]} NodeInfo bounded: {', '.join(changed)}")
        d = self.session.admit(node, info, self.clock())
        if not d.ok:
            self.session.lost(node, d.reason, self.clock(), left=True)
            self.event(f"node {node[:8]} refused: {d.reason}")
            await _refuse(conn, stream, d.code, d.reason)
            return
        old = self.conns.get(node)
        if old is not None:
            old.conn.close(0, "replaced by a newer connection of the same node")
        nc = NodeConn(node, conn, stream, jti)
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

    async def _keep_dialing(self, key: str, peer: PeerName) -> None:
        """Dial a node of the --peers list whenever it is not connected, until the session
        has finished; then serve it as if it had dialled (from Ping on). A node that is
        down or not listening yet is tried again, at most every 30 s."""
        assert self.endpoint is not None
        delay = 1.0
        while not self.session.finished:
            if key in self.conns:  # connected (it may have dialled in itself)
                await asyncio.sleep(self.options.tick_s)
                continue
            try:
                conn = await self.endpoint.dial_peer(peer, timeout=_DIAL_TIMEOUT_S)
            except DriftError as exc:
                log.debug("peer.dial_failed node=%s retry_in=%.0fs error=%s", key[:8], delay, exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, _DIAL_BACKOFF_MAX_S)
                continue
            delay = 1.0
            log.info("peer.dialled node=%s", key[:8])
            try:
                stream = await conn.open_stream()
            except DriftError:
                conn.close(1, "no stream")
                continue
            await self._guarded(conn, stream, self._serve_node(conn, stream, "", ""))

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
                clean = boundary.progress(msg)
                if log.isEnabledFor(logging.DEBUG) and (changed := boundary.bounded(msg, clean)):
                    log.debug("progress.bounded node=%s %s", nc.node[:8], ", ".join(changed))
                s.progress(nc.node, clean, now)
                self._rebalance()
            elif isinstance(msg, StopRequest):
                await self._stop_request(nc, boundary.stop_request(msg))
            elif isinstance(msg, ShardRequest):
                await self._shard(nc, boundary.shard_request(msg).epoch)
            elif isinstance(msg, StatusRequest):
                await nc.send(self.status())
            elif isinstance(msg, Bye):
                reason = boundary.peer_text(msg.reason)
                return f"bye: {reason}" if reason else "bye"
            elif isinstance(msg, Error):
                code = boundary.clean_text(msg.code, boundary.CODE_MAX)
                return f"node error {code}: {boundary.peer_text(msg.message)}"
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

    async def _stop_request(self, nc: NodeConn, msg: StopRequest) -> None:
        """A node asks to end the session: the session decides; everyone hears a stop, only
        the asking node hears that it was overruled."""
        v = self.session.request_stop(nc.node, msg.kind, msg.reason, self.clock())
        self.event(v.reason)
        answer = StopDecision(stop=v.stop, round=v.final_round, reason=v.reason)
        if not v.newly:
            await nc.send(answer)
            return
        # The decision must survive a restart: nodes are about to hold their final barrier.
        await self.rounds.save_session()
        for other in list(self.conns.values()):
            self._spawn(other.send(answer))
        if nc.node not in self.conns:
            await nc.send(answer)
        if v.finished_now:
            self._finish()
            self._serve_pending_shards()
        else:
            self.rounds.consider(self.session.check(self.clock()))

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
        o = self.options
        sync: BarrierSync | None = None
        try:
            # A stream that never says what it is must not linger (no read timeouts inside
            # a stream: on timeout it is abandoned).
            first = await asyncio.wait_for(stream.recv(), o.handshake_timeout_s)
            if not isinstance(first, BarrierSync):
                raise ProtocolError(
                    f"a barrier stream starts with BarrierSync, not {type(first).__name__}"
                )
            sync = boundary.barrier_sync(first)
            if changed := boundary.bounded(first, sync):
                log.info("barrier.bounded node=%s %s", node[:8], ", ".join(changed))
            verdict = self._verdict(node, sync)  # before any byte of the blob is read
            if verdict.kind in (Verdict.INITIAL, Verdict.OPEN):
                verdict = await self._receive_upload(nc, stream, sync)
            else:
                limit, _ = self.rounds.max_upload(o.max_model_bytes)
                await stream.drain_blob(
                    max_size=limit, min_rate=o.min_upload_rate, grace_s=o.upload_grace_s
                )
            w = await self.rounds.answer(verdict, sync.round)
            # What the node holds decides what it needs: nothing, the change, or everything.
            payload, out, out_sha = w.payload_for(sync.base_sha256)
            await stream.send(
                BarrierReady(
                    round=w.completed_round,
                    sha256=w.sha256,
                    contributed=verdict.kind.contributed,
                    reason=verdict.reason,
                    epoch=w.epoch,
                    # A stop decided between epochs finishes the session on weights that
                    # were published before it was known to be final.
                    finished=w.finished
                    or (self.session.finished and w.completed_round >= self.session.completed),
                    payload=payload,
                    base_round=w.base_round if payload == "delta" else -1,
                )
            )
            await stream.send_blob(out, kind=payload, sha256=out_sha)
            await stream.finish()
        except BlobTooLarge as exc:
            # Refused from its header: stop the peer's sending at once, answer why, and keep
            # the connection (the node may have a smaller model to offer).
            await stream.stop_reading()
            if sync is not None and sync.round > 0:
                self.rounds.reject(node, sync.round, str(exc))
            await _answer_error(stream, "too_large", str(exc))
        except TooSlow as exc:
            why = f"upload {exc}: this coordinator's --min-upload-rate; a faster link helps"
            if sync is not None and sync.round > 0:
                self.rounds.reject(node, sync.round, why, strike=False)
            else:
                self.event(f"node {node[:8]} upload dropped: {why}")
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(stream.stop_reading(), 2)
            await _answer_error(stream, "too_slow", why)
        except SessionError as exc:
            await stream.stop_reading()
            await _answer_error(stream, exc.code, str(exc))
        except (ProtocolError, asyncio.TimeoutError) as exc:
            why = str(exc) or "no BarrierSync on a barrier stream in time"
            self.event(f"node {node[:8]} dropped: protocol error on a barrier stream: {why}")
            await _refuse(nc.conn, stream, "protocol", why)
        except PeerLost:
            pass
        except Exception as exc:  # a bug must not leave the node waiting on this stream
            log.exception("barrier.failed node=%s", node[:8])
            await _answer_error(stream, "internal", f"coordinator error: {exc!r}")

    def _verdict(self, node: str, sync: BarrierSync) -> UploadVerdict:
        """The session's verdict on an upload from its BarrierSync alone; SessionError for a
        refusal."""
        verdict = self.session.upload(
            node, sync.round, self.clock(), base_round=sync.base_round, delta=sync.delta
        )
        if verdict.kind is Verdict.REFUSE:
            raise SessionError(verdict.reason, verdict.code)
        return verdict

    async def _receive_upload(
        self, nc: NodeConn, stream: Stream, sync: BarrierSync
    ) -> UploadVerdict:
        """Read an upload that counts and hand it to the rounds: one at a time per node, its
        header checked before its body, at the minimum byte rate; decoding and accumulating
        in one of the ``max_uploads`` slots."""
        node = nc.node
        o = self.options
        if node in self._uploading:
            raise ProtocolError("one barrier upload at a time per node")
        self._uploading.add(node)
        try:
            limit, hint = self.rounds.max_upload(o.max_model_bytes)
            _, blob = await stream.recv_blob(
                max_size=limit,
                limit_hint=hint,
                inspect=self.rounds.upload_check(sync),
                min_rate=o.min_upload_rate,
                grace_s=o.upload_grace_s,
            )
            assert isinstance(blob, bytes)
        except SessionError as exc:
            # Refused from its first bytes: the node is left out (and gets a strike, unless
            # it only sent no start-up weights to a coordinator that has none).
            await stream.stop_reading()
            self.rounds.reject(node, sync.round, str(exc), strike=exc.code != "need_weights")
            raise
        finally:
            self._uploading.discard(node)
        async with self._upload_sem:
            verdict = await self._take_upload(node, sync, blob)
        del blob
        return verdict

    async def _take_upload(self, node: str, sync: BarrierSync, blob: bytes) -> UploadVerdict:
        """The session's verdict on one upload now that it is here (the round may have moved
        on while it arrived), acted on by the rounds: the verdict to answer by. SessionError
        for a refusal or a bad upload."""
        return await self.rounds.take(node, sync, blob, self._verdict(node, sync))

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
            stamp = self._tokens_stamp()
            if stamp != self._tokens_seen:
                self._tokens_seen = stamp
                self._revocations()
            if now - self._last_ping >= self.config.heartbeat_s:
                self._last_ping = now
                ping = Ping(session_id=self.session.session_id, nonce=f"hb{int(now)}")
                for nc in list(self.conns.values()):
                    self._spawn(nc.send(ping))

    def _tokens_stamp(self) -> tuple[int, int] | None:
        """What tells that ``tokens.json`` changed (``drift-coord revoke`` rewrites it)."""
        try:
            st = TokenStore.file(self.state.path).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size

    def _revocations(self) -> None:
        """Re-read the revoked tokens and close every open connection that joined with one."""
        try:
            revoked = self.state.tokens().revoked()
        except AuthError as exc:
            log.warning("tokens.unreadable error=%s", exc)
            return
        for jti in revoked:
            self.verifier.revoke(jti)
        why = "token revoked: ask the coordinator for a new one"
        for nc in list(self.conns.values()):
            if nc.token in revoked:
                self.event(f"node {nc.node[:8]} disconnected: its token {nc.token} was revoked")
                self._spawn(_refuse(nc.conn, nc.control, "auth", why))
        for key, (conn, jti) in list(self.observers.items()):
            if jti in revoked:
                self.observers.pop(key, None)
                log.info("observer.revoked peer=%s jti=%s", conn.remote_hex[:8], jti)
                conn.close(1, "auth")


async def _answer_error(stream: Stream, code: str, message: str) -> None:
    """Answer a barrier stream with an Error and end it (the connection stays)."""
    with contextlib.suppress(DriftError):
        await stream.send(Error(code=code, message=message))
        await stream.finish()


async def _refuse(conn: Connection, stream: Stream, code: str, message: str) -> None:
    """Send an Error frame, then drop the connection (a short wait lets the frame leave)."""
    with contextlib.suppress(DriftError, asyncio.TimeoutError):
        await asyncio.wait_for(stream.send(Error(code=code, message=message)), 2)
        await asyncio.wait_for(stream.finish(), 2)
    await asyncio.sleep(0.05)
    conn.close(1, code)


__all__ = ["Coordinator", "NodeConn"]
