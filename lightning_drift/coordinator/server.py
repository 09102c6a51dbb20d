"""The coordinator's I/O shell: it holds the connections and carries out decisions.

One task per connection: the gate (``gate.py``) lets a peer in (token, ``--peers`` list, the
handshake: Join → Ping → NodeInfo → TrainConfig), then the node's control stream is read here
(progress, heartbeats, shard, stop and status requests); every barrier is a new bi stream,
served by ``barrier.py``, which asks the upload core (``uploads.py``) twice per upload. The
coordinator also dials the listed nodes it can reach (``dialing.py``). Frames become calls on
the :class:`~lightning_drift.coordinator.session.Session`; the session, the rounds
(``rounds.py``) and the upload core never call back into the server: they return
:class:`~.effects.Effects`, which :meth:`Coordinator.carry_out` carries out (log, end a
banned node's connection, complete a round, send re-plans, finish, stop on a failure).

Every frame from a node passes the trust boundary (``boundary.py``) first. A misbehaving peer
costs only its own connection: garbage gets an ``Error`` frame and the connection is dropped;
a bad upload gets an ``Error`` on its barrier stream and is left out of the round. The ticker
notices ``drift-coord revoke`` and closes the connections of a revoked token.

Entry point: :class:`Coordinator` (``start`` / ``run`` / ``shutdown`` / ``close``).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from lightning_drift.auth import Identity, TokenVerifier
from lightning_drift.checkpoint import CheckpointStore
from lightning_drift.coordinator import boundary, effects, observers
from lightning_drift.coordinator.barrier import BarrierStreams
from lightning_drift.coordinator.config import ServeOptions, SessionConfig
from lightning_drift.coordinator.conns import End, Ended, NodeConn
from lightning_drift.coordinator.dialing import keep_dialing
from lightning_drift.coordinator.effects import Effects
from lightning_drift.coordinator.gate import Gate, guarded
from lightning_drift.coordinator.logs import SessionLog
from lightning_drift.coordinator.replies import refuse
from lightning_drift.coordinator.rounds import Rounds
from lightning_drift.coordinator.session import GONE, RoundDecision, Session
from lightning_drift.coordinator.sharded import DataPlane
from lightning_drift.coordinator.state import StateDir, coordinator_record
from lightning_drift.coordinator.uploads import Uploads
from lightning_drift.errors import DriftError, PeerLost, ProtocolError
from lightning_drift.peers import PeerName, parse_peer
from lightning_drift.protocol import (
    Bye,
    Error,
    Message,
    Ping,
    SessionStatus,
    ShardAssignment,
    ShardReport,
    ShardRequest,
    StatusRequest,
    StopRequest,
    TrainProgress,
)
from lightning_drift.text import short_id
from lightning_drift.transport import Connection, Endpoint, Stream, peer_key

log = logging.getLogger(__name__)

STATUS_NODES_MAX = 256  # members listed in a SessionStatus (live ones first)
_GONE_STATES = frozenset(state.value for state in GONE)  # as a SessionStatus names them


class Coordinator:
    """The long-running coordinator of one session.

    ``await start()`` loads (or creates) the state dir, binds the endpoint and issues the
    standing tokens; ``await run()`` serves until the session has finished (plus a grace)
    or :meth:`shutdown` is called; ``await close()`` closes the endpoint (always call it).
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
        self.uploads: Uploads = None  # type: ignore[assignment]  # made by start()
        self.barriers: BarrierStreams = None  # type: ignore[assignment]  # made by start()
        self.endpoint: Endpoint | None = None
        self.ticket = ""
        self.node_token = ""
        self.observer_token = ""
        self.conns: dict[str, NodeConn] = {}
        self.observers: dict[int, tuple[Connection, str]] = {}  # id -> (conn, jti)
        self.gate = Gate(self.state, options, lambda: self.clock())  # (a test may swap it)
        self.pending_shards: dict[str, int] = {}
        self.events: list[str] = []  # recent decisions and membership changes, for the view
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
        self._open_session(now)
        await self._open_rounds(identity)
        verifier = TokenVerifier(
            identity.public_key, self.session.session_id, self.state.tokens().revoked()
        )
        o = self.options
        self.peers = {peer_key(peer).hex(): peer for peer in map(parse_peer, o.peers)}
        self.gate.open(verifier, self.session, self.peers)
        host = o.bind or ("127.0.0.1" if o.mode == "local" else "0.0.0.0")
        self.endpoint = await Endpoint.bind(
            mode=o.mode, secret=identity.seed, bind_addr=f"{host}:{o.port}", relay_urls=o.relay
        )
        self.ticket = self.endpoint.ticket()
        if self.rounds.sharded is not None:
            self.rounds.sharded.endpoint = self.endpoint
        self.state.save_coordinator(
            coordinator_record(
                o, self.endpoint.addrs(), self.ticket, host, identity.public_hex,
                self.session.session_id,
            )
        )  # fmt: skip
        self.node_token, self.observer_token = (
            self.state.standing_token(
                identity,
                session=self.session.session_id,
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

    def _open_session(self, now: float) -> None:
        """The session of the state dir (restored), or a new one; and its log."""
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
            max_nodes=self.session.config.max_nodes,
        )
        self.session_log.open()

    async def _open_rounds(self, identity: Identity) -> None:
        """The rounds (the global weights: restored, or seeded by ``--init``), the upload core,
        the barrier streams, and a sharded session's data plane."""
        assert self.session_log is not None
        self.rounds = Rounds(
            self.session,
            self.store,
            self.state,
            clock=self.clock,
            record=self.session_log.log_round,
        )
        self.uploads = Uploads(
            self.session, self.rounds, max_model_bytes=self.options.max_model_bytes
        )
        self.barriers = BarrierStreams(
            self.uploads, self.options, clock=self.clock, carry_out=self.carry_out
        )
        if self.config.data_plane == "sharded":
            self.rounds.sharded = DataPlane(
                self.session.config, self.session.session_id, identity, clock=self.clock,
                send=self._send_to, members=lambda: list(self.conns),
            )  # fmt: skip
        await self.rounds.load()
        if self.options.init is not None:
            if self.session.has_weights:
                log.warning(
                    "init.ignored path=%s reason=the session already has global weights (round %d)",
                    self.options.init,
                    self.session.completed,
                )
            else:
                self.event(await self.rounds.seed(self.options.init))

    async def run(self) -> None:
        """Serve until the session finishes (then a grace period) or :meth:`shutdown`."""
        assert self.endpoint is not None, "call start() first"
        # Every deadline and heartbeat decision is the ticker's, every new connection the
        # accept loop's: without either the session would wait for ever, so their end is fatal.
        for vital in (self._accept_loop(), self._ticker()):
            self._spawn(vital).add_done_callback(self._vital_ended)
        for key, peer in self.peers.items():
            if peer.has_address or self.options.mode == "internet":
                self._spawn(
                    keep_dialing(
                        self.endpoint,
                        key,
                        peer,
                        done=lambda: self.session.finished,
                        connected=self.conns.__contains__,
                        serve=lambda conn, stream: guarded(  # served from Ping on
                            conn, stream, self._serve_node(conn, stream, "", "")
                        ),
                        tick_s=self.options.tick_s,
                    )
                )
            else:
                log.info("peer.waiting node=%s reason=no address in local mode", short_id(key))
        if self.session.finished and self.options.exit_when_done:
            # Restarted on a finished session: nodes that lost us at the very end may still
            # come back for the final weights; give them a while, then exit.
            self.finished_at = self.clock()
            self._spawn(self._stop_when_all_gone(at_least_s=min(30.0, self.options.finish_grace_s)))
        await self._stop.wait()

    def shutdown(self) -> None:
        """Stop serving: :meth:`run` returns (the session itself is not stopped)."""
        self._stop.set()

    async def close(self) -> None:
        self._stop.set()
        for nc in list(self.conns.values()):
            nc.conn.close(0, "coordinator shutting down")
        for t in list(self._tasks):
            t.cancel()
        if self.rounds is not None and self.rounds.sharded is not None:
            await self.rounds.sharded.close()
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

    def _vital_ended(self, task: asyncio.Task[Any]) -> None:
        if task.cancelled() or self._stop.is_set():
            return
        error = task.exception()
        name = getattr(task.get_coro(), "__name__", "a task").lstrip("_").replace("_", " ")
        self._failed(
            f"internal error: the {name} stopped ({error!r}); restart the coordinator on its "
            "state dir: nodes reconnect and re-send their uploads"
        )

    def _done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("task.failed error=%r", task.exception(), exc_info=task.exception())

    def status(self) -> SessionStatus:
        """The session for observers: never over the frame limit (live members first, at
        most :data:`STATUS_NODES_MAX` of them; every string was bounded where it came in)."""
        current = self.rounds.current
        st = self.session.status(self.clock(), current.path if current else "")
        st.nodes.sort(key=lambda n: n.state in _GONE_STATES)
        del st.nodes[STATUS_NODES_MAX:]
        st.lightning_config = self.config.lightning_config
        if self.rounds.sharded is not None:
            self.rounds.sharded.show(st)
        return observers.fitted(st)

    @property
    def uploading(self) -> frozenset[str]:
        """The nodes whose upload is being received now (one at a time per node)."""
        return self.barriers.uploading if self.barriers is not None else frozenset()

    # ---- carrying out what the session, the rounds and the upload core decided ----------
    def carry_out(self, fx: Effects) -> None:
        """Carry out ``fx`` in its order (see :class:`~.effects.Effects`)."""
        for text in fx.events:
            self.event(text)
        for node, reason in fx.banned:
            self._banned(node, reason)
        if fx.told is not None:
            told = effects.stop_decision(fx.told)
            for nc in list(self.conns.values()):
                self._spawn(nc.send(told))
        if fx.completed is not None or fx.finished:
            self._serve_pending_shards()
            if fx.finished or (fx.completed is not None and fx.completed.finished):
                self._finish()
        if fx.replans:
            self._spawn(self._send_replans(fx.replans))
        if fx.failed:
            self._failed(fx.failed)
        elif fx.decision is not None and self.rounds.consider(fx.decision):
            self.event(fx.decision.reason)
            self._spawn(self._complete(fx.decision))

    def _send_to(self, node: str, msg: Message) -> None:
        if (nc := self.conns.get(node)) is not None:
            self._spawn(nc.send(msg))

    async def _complete(self, decision: RoundDecision) -> None:
        self.carry_out(await self.rounds.complete(decision))

    def event(self, text: str) -> None:
        """Log a decision or membership change and keep it for the view."""
        text = boundary.clean_text(text, 4 * boundary.TEXT_MAX)
        log.info("%s", text)
        self.events.append(f"{time.strftime('%H:%M:%S')} {text}")
        del self.events[:-50]

    def _gone(self, node: str) -> NodeConn | None:
        """``node`` is served no more: its connection (to end); its seats are handed on."""
        if self.rounds.sharded is not None:
            self.rounds.sharded.left(node)
        return self.conns.pop(node, None)

    def _banned(self, node: str, reason: str) -> None:
        """``node`` is banned: tell it why and end its connection."""
        nc = self._gone(node)
        self.pending_shards.pop(node, None)
        if nc is not None:
            self.event(
                f"node {short_id(node)} disconnected: excluded; it joined with token {nc.token} "
                f"(`drift-coord revoke {nc.token}` keeps its holder out under any key)"
            )
            self._spawn(refuse(nc.conn, nc.control, "excluded", reason))

    async def _send_replans(self, replans: list[tuple[str, ShardAssignment]]) -> None:
        # Durable before any node follows it: after a restart the coordinator must know the
        # work each node trains on (nodes that missed it get it again when they reconnect).
        await self.rounds.save_session()
        for node, assignment in replans:
            nc = self.conns.get(node)
            if nc is not None:
                await nc.send(assignment)

    def _failed(self, reason: str) -> None:
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
            self._spawn(self.serve_connection(conn))

    async def serve_connection(self, conn: Connection) -> None:
        """Serve one accepted connection, from its Join to its end (what goes wrong on it
        ends only it)."""
        entered = await self.gate.enter(conn)
        if entered is None:
            return
        stream, entry = entered
        if not entry.observer:
            await guarded(conn, stream, self._serve_node(conn, stream, entry.name, entry.jti))
            return
        self.observers[id(conn)] = (conn, entry.jti)
        try:
            serving = observers.serve(conn, stream, self.status, self.config.heartbeat_timeout)
            await guarded(conn, stream, serving)
        finally:
            self.observers.pop(id(conn), None)

    async def _serve_node(self, conn: Connection, stream: Stream, name: str, jti: str) -> None:
        """The handshake from Ping on (Ping → NodeInfo → TrainConfig), then the node's
        control stream until it ends: the same whichever side dialled. ``jti``: the token it
        joined with ("" for a node of the --peers list)."""
        node = conn.remote_hex
        fx = Effects()
        try:
            d = await self.gate.handshake(conn, stream, name, jti, fx)
        finally:
            self.carry_out(fx)
        if d is None:
            return
        old = self.conns.get(node)
        if old is not None:
            old.conn.close(0, "replaced by a newer connection of the same node")
        nc = NodeConn(node, conn, stream, jti, send_timeout=self.config.heartbeat_timeout)
        self.conns[node] = nc
        ended = Ended(End.CLOSED, "connection closed")
        try:
            await stream.send(self.session.train_config())
            self.event(d.reason)
            if (dp := self.rounds.sharded) is not None and (
                why := dp.join(node, self.session.members[node].data_peer)
            ):
                raise ProtocolError(f"this session's data plane is sharded, and {why}")
            replanned = self.session.assignments.get(node)
            if replanned is not None and replanned.revision > 0:
                # It may have missed its latest re-plan while it was away.
                await nc.send(replanned)
            self._serve_pending_shards()
            acceptor = asyncio.create_task(self._barrier_streams(nc))
            nc.tasks.add(acceptor)
            ended = await self._control(nc)
        except ProtocolError as exc:
            ended = Ended(End.PROTOCOL, f"protocol error: {exc}")
            await refuse(conn, stream, "protocol", str(exc))
        except PeerLost as exc:
            ended = Ended(End.LOST, f"connection lost: {exc}")
        finally:
            for t in nc.tasks:
                t.cancel()
            if self.conns.get(node) is nc:
                self._gone(node)
                self.pending_shards.pop(node, None)
                lost = self.session.lost(node, ended.reason, self.clock(), left=ended.left)
                if lost.ok:
                    self.event(lost.reason)
                self.carry_out(Effects(decision=self.session.check(self.clock())))
            conn.close(0, "")

    async def _control(self, nc: NodeConn) -> Ended:
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
                    log.debug("progress.bounded node=%s %s", short_id(nc.node), ", ".join(changed))
                s.progress(nc.node, clean, now)
                self.carry_out(effects.replan(s, now))
            elif isinstance(msg, StopRequest):
                await self._stop_request(nc, boundary.stop_request(msg))
            elif isinstance(msg, ShardRequest):
                await self._shard(nc, boundary.shard_request(msg).epoch)
            elif isinstance(msg, ShardReport) and self.rounds.sharded is not None:
                self.rounds.sharded.report(nc.node, msg)
            elif isinstance(msg, StatusRequest):
                await nc.send(self.status())
            elif isinstance(msg, Bye):
                reason = boundary.peer_text(msg.reason)
                return Ended(End.BYE, f"bye: {reason}" if reason else "bye")
            elif isinstance(msg, Error):
                code = boundary.clean_text(msg.code, boundary.CODE_MAX)
                why = f"node error {code}: {boundary.peer_text(msg.message)}"
                return Ended(End.NODE_ERROR, why)
            else:
                raise ProtocolError(f"unexpected {type(msg).__name__} on the control stream")

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
            log.debug("shard.wait node=%s reason=%s", short_id(nc.node), r.reason)
        elif r.code == "finished" and self.rounds.current is not None:
            await nc.send(self.rounds.finish_message())
        else:
            await nc.send(Error(code=r.code, message=r.reason))

    async def _stop_request(self, nc: NodeConn, msg: StopRequest) -> None:
        """A node asks to end the session: the session decides (``effects.stop_request``);
        everyone hears a stop, only the asking node that it was overruled or is to leave."""
        v = self.session.request_stop(nc.node, msg.kind, msg.reason, self.clock())
        if v.newly:  # durable before any node holds its final barrier for it
            await self.rounds.save_session()
        if not v.newly or self.conns.get(nc.node) is not nc:
            await nc.send(effects.stop_decision(v))
        self.carry_out(effects.stop_request(self.session, v, self.clock()))

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
            task = asyncio.create_task(self.barriers.serve(nc.node, nc.conn, stream))
            nc.tasks.add(task)
            task.add_done_callback(nc.tasks.discard)

    def _finish(self) -> None:
        self.finished_at = self.clock()
        self.rounds.release_waiters()
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
            log.warning(
                "finish.grace_over still_connected=%s", ",".join(short_id(n) for n in self.conns)
            )
        await asyncio.sleep(0.2)  # let the last frames leave
        self._stop.set()

    # ---- periodic ------------------------------------------------------------------------
    async def _ticker(self) -> None:
        while True:
            await asyncio.sleep(self.options.tick_s)
            now = self.clock()
            gone, d = self.session.tick(now)
            for node, reason in gone:
                self.event(f"node {short_id(node)} lost: {reason}")
                nc = self._gone(node)
                if nc is not None:
                    nc.conn.close(2, "lost: " + reason[:80])
            self.carry_out(self.uploads.pending())
            self.carry_out(Effects(decision=d))
            revoked = self.gate.revoked()
            if revoked:
                self._revocations(revoked)
            if now - self._last_ping >= self.config.heartbeat_s:
                self._last_ping = now
                ping = Ping(session_id=self.session.session_id, nonce=f"hb{int(now)}")
                for nc in list(self.conns.values()):
                    self._spawn(nc.send(ping))

    def _revocations(self, revoked: set[str]) -> None:
        """Close every open connection that joined with a ``revoked`` token."""
        why = "token revoked: ask the coordinator for a new one"
        for nc in list(self.conns.values()):
            if nc.token in revoked:
                self.event(
                    f"node {short_id(nc.node)} disconnected: its token {nc.token} was revoked"
                )
                self._spawn(refuse(nc.conn, nc.control, "auth", why))
        for key, (conn, jti) in list(self.observers.items()):
            if jti in revoked:
                self.observers.pop(key, None)
                log.info("observer.revoked peer=%s jti=%s", short_id(conn.remote_hex), jti)
                conn.close(1, "auth")


__all__ = ["Coordinator", "End", "Ended", "NodeConn"]
