"""Who may come in: a new connection's first stream, up to the moment its role is known.

:meth:`Gate.enter` reads the ``Join`` (within the handshake timeout; garbage or silence
closes the connection), and lets the peer in as an observer or a node when its token verifies
(a member of the session may come back on an expired one), or when it has no token and its
key is on the ``--peers`` list; and only when ``Join.node_key`` is the connection's own key.
Everyone else is refused with an ``Error(auth)``. :meth:`Gate.revoked` notices ``drift-coord
revoke`` rewriting ``tokens.json``. A node's :meth:`Gate.handshake` (Ping → NodeInfo → the
session's admission) is the same whichever side dialled.

The boundary is here because this is the trust decision about a peer (tokens, keys,
revocation), made once per connection before the session hears of it; the server serves
what comes in.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from lightning_drift.auth import Claims, TokenStore, TokenVerifier
from lightning_drift.coordinator import boundary
from lightning_drift.coordinator.config import ServeOptions
from lightning_drift.coordinator.effects import Effects
from lightning_drift.coordinator.replies import refuse
from lightning_drift.coordinator.session import Decision, Session
from lightning_drift.coordinator.state import StateDir
from lightning_drift.errors import AuthError, DriftError, PeerLost, ProtocolError
from lightning_drift.peers import PeerName
from lightning_drift.protocol import Error, Join, NodeInfo, Ping
from lightning_drift.text import short_id
from lightning_drift.transport import Connection, Stream

log = logging.getLogger(__name__)

T = TypeVar("T")


async def guarded(conn: Connection, stream: Stream, serving: Awaitable[T]) -> T | None:
    """Serve one peer's connection; what goes wrong on it ends only it (None then)."""
    try:
        return await serving
    except ProtocolError as exc:
        await refuse(conn, stream, "protocol", str(exc))
    except (PeerLost, asyncio.TimeoutError):
        pass
    except Exception as exc:  # a bug on one connection must not stop the session
        log.exception("connection.failed peer=%s", short_id(conn.remote_hex))
        await refuse(conn, stream, "internal", f"coordinator error: {exc!r}")
    return None


@dataclass(frozen=True)
class Entry:
    """A peer let in: an ``observer`` or a node (its ``name``), and the token it came with
    (``jti``, "" for a node of the --peers list)."""

    observer: bool
    name: str
    jti: str


class Gate:
    """The door of one coordinator (see the module docstring); :meth:`open` once the
    session, the token verifier and the --peers list exist."""

    def __init__(self, state: StateDir, options: ServeOptions, clock: Callable[[], float]):
        self.state = state
        self.options = options
        self.clock = clock
        self.verifier: TokenVerifier = None  # type: ignore[assignment]  # set by open()
        self.session: Session = None  # type: ignore[assignment]  # set by open()
        self.peers: dict[str, PeerName] = {}
        self._seen = self._stamp()  # tokens.json as last read

    def open(self, verifier: TokenVerifier, session: Session, peers: dict[str, PeerName]) -> None:
        self.verifier, self.session, self.peers = verifier, session, peers
        self._seen = self._stamp()

    async def enter(self, conn: Connection) -> tuple[Stream, Entry] | None:
        """The first stream of ``conn`` and who came in on it; None after refusing it."""
        t = self.options.handshake_timeout_s
        stream: Stream | None = None
        try:
            stream = await asyncio.wait_for(conn.accept_stream(), t)
            join = await asyncio.wait_for(stream.recv(), t)
        except ProtocolError as exc:
            log.info(
                "handshake.garbage peer=%s error=%s",
                short_id(conn.remote_hex),
                boundary.clean_text(exc),
            )
            if stream is None:  # no stream to answer on
                conn.close(1, "protocol")
            else:
                await refuse(conn, stream, "protocol", str(exc))
            return None
        except (asyncio.TimeoutError, DriftError) as exc:
            why = boundary.clean_text(repr(exc))
            log.info("handshake.dropped peer=%s error=%s", short_id(conn.remote_hex), why)
            conn.close(1, "no Join")
            return None
        entry = await guarded(conn, stream, self._entry(conn, stream, join))
        return None if entry is None else (stream, entry)

    async def _entry(self, conn: Connection, stream: Stream, join: Any) -> Entry | None:
        if not isinstance(join, Join):
            await refuse(conn, stream, "protocol", f"expected Join, got {type(join).__name__}")
            return None
        join = boundary.join(join)
        if not join.token:
            # No token: admitted only when the QUIC peer's key is on the --peers list.
            if conn.remote_hex not in self.peers:
                reason = (
                    f"node {conn.remote_hex[:16]}… has no token and is not on this "
                    "coordinator's --peers list; ask its operator to add this node's id "
                    "(`drift id` prints it), or join with a token"
                )
                log.info("join.refused peer=%s reason=not a listed peer", short_id(conn.remote_hex))
                await refuse(conn, stream, "auth", reason)
                return None
            role, jti = "node", ""
        else:
            claims = await self._token_claims(conn, stream, join, self.clock())
            if claims is None:
                return None
            role, jti = claims.role, claims.jti
        if join.node_key.lower() != conn.remote_hex:
            await refuse(
                conn,
                stream,
                "auth",
                f"Join.node_key {boundary.clean_text(join.node_key, 16)}… is not the "
                f"connection's key {conn.remote_hex[:16]}…",
            )
            return None
        return Entry(role == "observer" or join.observe, join.name, jti)

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
                    short_id(conn.remote_hex),
                    boundary.clean_text(refusal),
                )
                await refuse(conn, stream, "auth", str(refusal))
            return member

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
        log.info("join.member_expired_token node=%s jti=%s", short_id(node), claims.jti)
        return claims

    # ---- a member's handshake ------------------------------------------------------------
    async def handshake(
        self, conn: Connection, stream: Stream, name: str, jti: str, fx: Effects
    ) -> Decision | None:
        """A node joins the session: Join (already read, or the coordinator dialled it) →
        Ping → NodeInfo → admitted. The session's admission, or None after refusing it;
        the events to log go to ``fx`` (also when the handshake fails half way)."""
        node, now = conn.remote_hex, self.clock
        d = self.session.join(node, name, now(), token=jti)
        if not d.ok:
            fx.events.append(
                f"node {short_id(node)} refused ({d.code}, token {jti or 'none'}): {d.reason}"
            )
            await refuse(conn, stream, d.code, d.reason)
            return None
        fx.events.append(d.reason)
        nonce = secrets.token_hex(8)
        await stream.send(Ping(session_id=self.session.session_id, nonce=nonce))
        info = await asyncio.wait_for(stream.recv(), self.options.handshake_timeout_s)
        if isinstance(info, Error):
            code = boundary.clean_text(info.code, boundary.CODE_MAX)
            self.session.lost(node, f"refused handshake: {code}", now(), left=True)
            conn.close(0, "")
            return None
        if not isinstance(info, NodeInfo) or info.nonce != nonce:
            self.session.lost(node, "bad handshake", now(), left=True)
            what = "NodeInfo with the Ping's nonce"
            await refuse(conn, stream, "protocol", f"expected {what}, got {type(info).__name__}")
            return None
        try:
            raw, info = info, boundary.node_info(info)
        except boundary.BadInput as exc:
            self.session.lost(node, str(exc), now(), left=True)
            fx.events.append(f"node {short_id(node)} refused: {exc}")
            await refuse(conn, stream, exc.code, str(exc))
            return None
        changed = boundary.bounded(raw, info)
        if changed:
            fx.events.append(f"node {short_id(node)} NodeInfo bounded: {', '.join(changed)}")
        d = self.session.admit(node, info, now())
        if not d.ok:
            self.session.lost(node, d.reason, now(), left=True)
            fx.events.append(f"node {short_id(node)} refused: {d.reason}")
            await refuse(conn, stream, d.code, d.reason)
            return None
        return d

    # ---- revocation ----------------------------------------------------------------------
    def revoked(self) -> set[str] | None:
        """Every revoked token, when ``tokens.json`` changed since the last look (the
        verifier refuses them from now on); None when it did not, or cannot be read."""
        stamp = self._stamp()
        if stamp == self._seen:
            return None
        self._seen = stamp
        try:
            revoked = set(self.state.tokens().revoked())
        except AuthError as exc:
            log.warning("tokens.unreadable error=%s", exc)
            return None
        for jti in revoked:
            self.verifier.revoke(jti)
        return revoked

    def _stamp(self) -> tuple[int, int] | None:
        """What tells that ``tokens.json`` changed (``drift-coord revoke`` rewrites it)."""
        try:
            st = TokenStore.file(self.state.path).stat()
        except OSError:
            return None
        return st.st_mtime_ns, st.st_size


__all__ = ["Entry", "Gate", "guarded"]
