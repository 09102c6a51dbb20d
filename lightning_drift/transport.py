"""QUIC over iroh: endpoints, connections and framed streams. The only module that imports iroh.

- :class:`Endpoint` binds in ``local`` mode (no relays, explicit bind address: tests, LANs,
  network namespaces) or ``internet`` mode (n0 preset: relays, hole punching; optional own
  relay URLs). It dials a ticket or a peer named by id (``lightning_drift.peers``) and
  accepts ``drift/0`` connections.
- :class:`Connection` opens and accepts bidirectional streams.
- :class:`Stream` (defined in ``lightning_drift.streams``, which knows nothing of iroh) carries
  ``drift/0`` frames and blobs; this module hands it iroh's stream halves and error mapping.

iroh errors are mapped by ``IrohError.kind()`` (never by their text, which holds build paths)
onto ``PeerLost``, ``ConnectTimeout``, ``ProtocolError`` and ``AuthError``.

Importing this module also fixes the binding's write path, unless ``DRIFT_IROH_PATCH=0``
(see ``lightning_drift._iroh_patch``; the outcome is :data:`WRITE_PATH`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import iroh

from lightning_drift import _iroh_patch
from lightning_drift.errors import (
    AuthError,
    ConfigError,
    ConnectTimeout,
    DriftError,
    PeerLost,
    ProtocolError,
)
from lightning_drift.peers import PeerName
from lightning_drift.protocol import ALPN
from lightning_drift.streams import CHUNK, Stream

log = logging.getLogger(__name__)

# "patched", "already", "disabled: ..." or "refused: <reason>": what the binding's write path
# is in this process (see _iroh_patch; DRIFT_IROH_PATCH=0 leaves it stock).
WRITE_PATH = _iroh_patch.apply()
log.debug("write_path status=%s iroh=%s", WRITE_PATH, _iroh_patch.iroh_version())


# --------------------------------------------------------------------------------------------
# Error mapping


_K = iroh.IrohErrorKind


def _map(exc: BaseException, doing: str, *, dialing: bool = False) -> DriftError:
    """Turn an IrohError into one of ours, by kind. ``doing`` says what we were doing."""
    if not isinstance(exc, iroh.IrohError):
        return PeerLost(f"{doing}: {exc!r}")
    kind = exc.kind()
    name = getattr(kind, "name", str(kind))
    if kind in (_K.KEY_PARSING, _K.TICKET_PARSING):
        return AuthError(f"{doing}: the ticket or key is not valid ({name}); check the token")
    if kind == _K.ALPN:
        return ProtocolError(f"{doing}: the peer does not speak {ALPN.decode()} ({name})")
    if kind in (_K.BIND, _K.RELAY) and not dialing:
        return ConfigError(f"{doing} failed ({name}); check the bind address and relay URLs")
    if dialing and kind in (_K.CONNECT, _K.TIMEOUT, _K.RELAY, _K.INTERNAL, _K.BIND):
        return ConnectTimeout(
            f"{doing}: no connection ({name}): the peer is unreachable, refused the handshake "
            f"(wrong key or not a {ALPN.decode()} peer) or is not accepting; check the ticket"
        )
    if kind == _K.INVALID_INPUT:
        return ProtocolError(f"{doing}: invalid input ({name})")
    # CONNECTION, CLOSED, STREAM, TIMEOUT, INTERNAL, ...: the peer or the path is gone
    return PeerLost(f"{doing}: the connection or stream ended ({name})")


def ticket_key(ticket: str) -> bytes:
    """The 32-byte endpoint key named in an EndpointTicket string; AuthError if unparsable."""
    return _parse_ticket(ticket).endpoint_addr().id().to_bytes()


def ticket_addrs(ticket: str) -> list[str]:
    """The direct ``host:port`` addresses an EndpointTicket string names."""
    return [str(a) for a in _parse_ticket(ticket).endpoint_addr().direct_addresses()]


def peer_key(peer: PeerName) -> bytes:
    """The 32-byte key of a peer named by id, ``id@host:port`` or ticket (AuthError when a
    ticket does not parse)."""
    return ticket_key(peer.ticket) if peer.ticket else bytes.fromhex(peer.key_hex)


def peer_addrs(peer: PeerName) -> list[str]:
    """The direct ``host:port`` addresses a peer name gives (none for a bare id)."""
    return ticket_addrs(peer.ticket) if peer.ticket else ([peer.addr] if peer.addr else [])


def local_bind_for(addrs: Sequence[str]) -> str:
    """Where a local-mode dialer binds: loopback when every target is on loopback (tests, one
    machine), else all interfaces (a LAN peer is not reachable from a loopback socket)."""
    hosts = [a.rsplit(":", 1)[0].strip("[]") for a in addrs]
    if hosts and all(h.startswith("127.") or h in ("::1", "localhost") for h in hosts):
        return "127.0.0.1:0"
    return "0.0.0.0:0"


def _parse_ticket(ticket: str) -> iroh.EndpointTicket:
    if not isinstance(ticket, str) or not ticket.strip():
        raise AuthError("malformed ticket: empty")
    try:
        return iroh.EndpointTicket.from_string(ticket.strip())
    except iroh.IrohError as exc:
        raise AuthError(
            f"malformed ticket {ticket[:24]!r}… ({exc.kind().name}); copy the whole ticket"
        ) from None


# --------------------------------------------------------------------------------------------
# Endpoint, Connection, Stream


class Endpoint:
    """This process's iroh endpoint. Close it (``await close()``) before the process exits."""

    def __init__(self, ep: iroh.Endpoint, mode: str) -> None:
        self._ep_or_none: iroh.Endpoint | None = ep  # None once closed
        self.mode = mode
        self.key: bytes = ep.id().to_bytes()
        self.key_hex = self.key.hex()
        self._incoming: asyncio.Queue[Connection | None] = asyncio.Queue()
        self._accept_task: asyncio.Task[None] | None = None
        self._handshakes: set[asyncio.Task[None]] = set()
        self._closed = False

    @classmethod
    async def bind(
        cls,
        *,
        mode: str = "local",
        secret: bytes | None = None,
        bind_addr: str | None = "127.0.0.1:0",
        relay_urls: Sequence[str] = (),
    ) -> Endpoint:
        """Bind an endpoint. ``secret`` is the 32-byte key seed (random when None).

        ``local``: no relays, no discovery, bound to ``bind_addr`` (loopback by default).
        ``internet``: relays and hole punching (n0 preset); ``relay_urls`` to use your own.
        """
        relay: iroh.RelayMode | None
        if mode == "local":
            preset, relay = iroh.preset_minimal(), iroh.RelayMode.disabled()
            bind_addr = bind_addr or "127.0.0.1:0"
        elif mode == "internet":
            preset = iroh.preset_n0()
            relay = iroh.RelayMode.custom_from_urls(list(relay_urls)) if relay_urls else None
        else:
            raise ConfigError(f"transport mode must be 'local' or 'internet', got {mode!r}")
        if secret is not None and len(secret) != 32:
            raise ConfigError(f"an endpoint secret is 32 bytes, got {len(secret)}")
        opts = iroh.EndpointOptions(
            preset=preset,
            bind_addr=bind_addr,
            secret_key=bytes(secret) if secret is not None else None,
            alpns=[ALPN],
            relay_mode=relay,
        )
        try:
            ep = await iroh.Endpoint.bind(opts)
        except iroh.IrohError as exc:
            raise _map(exc, f"binding a {mode} endpoint at {bind_addr}") from None
        self = cls(ep, mode)
        log.info("endpoint bound mode=%s key=%s addrs=%s", mode, self.key_hex[:16], self.addrs())
        return self

    @property
    def _ep(self) -> iroh.Endpoint:
        if self._ep_or_none is None:
            raise DriftError(f"endpoint {self.key_hex[:16]}… is closed; bind a new one")
        return self._ep_or_none

    def addrs(self) -> list[str]:
        return list(self._ep.addr().direct_addresses())

    def ticket(self) -> str:
        """An EndpointTicket with this endpoint's current addresses (and relay, if any)."""
        return str(iroh.EndpointTicket.from_addr(self._ep.addr()))

    async def dial(
        self,
        ticket: str,
        *,
        timeout: float = 15.0,
        expect_key: bytes | None = None,
        alpn: bytes = ALPN,
        via: Sequence[str] = (),
    ) -> Connection:
        """Connect to the endpoint a ticket names, within ``timeout`` seconds.

        ``ConnectTimeout`` when no connection is made in time (or the handshake is refused);
        ``AuthError`` when the peer reached is not ``expect_key`` (default: the ticket's key).
        ``alpn`` exists for tests of refusal; peers speak ``drift/0``. ``via`` replaces the
        ticket's addresses (``host:port``: a forwarded port, a proxy, a changed IP); the peer
        must still hold the ticket's key.
        """
        addr = _parse_ticket(ticket).endpoint_addr()
        if via:
            addr = iroh.EndpointAddr(addr.id(), None, [str(a) for a in via])
        want = bytes(expect_key) if expect_key is not None else addr.id().to_bytes()
        return await self._connect(
            addr,
            want,
            timeout,
            alpn,
            unreachable="check that the coordinator runs and the address in the token is reachable",
            wrong_key="the ticket does not belong to the coordinator that signed the token",
        )

    async def dial_peer(
        self, peer: PeerName, *, timeout: float = 15.0, via: Sequence[str] = ()
    ) -> Connection:
        """Connect to a peer named by id (``ID``, ``ID@HOST:PORT`` or a ticket).

        In internet mode a bare id is found through iroh's discovery; in local mode it has no
        address and ConfigError says how to give one. ``via`` replaces the name's addresses.
        The peer reached must hold the named key (QUIC checks it; AuthError otherwise)."""
        key = peer_key(peer)
        direct = [str(a) for a in via] or peer_addrs(peer)
        relay = None
        if peer.ticket and not via:
            relay = _parse_ticket(peer.ticket).endpoint_addr().relay_url()
        if not direct and relay is None and self.mode == "local":
            raise ConfigError(
                f"peer {key.hex()[:16]}… has no address, and local mode has no discovery: "
                "give ID@HOST:PORT or the peer's ticket (or use internet mode)"
            )
        addr = iroh.EndpointAddr(iroh.EndpointId.from_bytes(key), relay, direct)
        return await self._connect(
            addr,
            key,
            timeout,
            ALPN,
            unreachable="check that the peer runs and listens, and that its address is right",
            wrong_key="another key holds that address",
        )

    async def _connect(
        self,
        addr: iroh.EndpointAddr,
        want: bytes,
        timeout: float,
        alpn: bytes,
        *,
        unreachable: str,
        wrong_key: str,
    ) -> Connection:
        who = want.hex()[:16]
        try:
            raw = await asyncio.wait_for(self._ep.connect(addr, alpn), timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(
                f"no connection to {who}… at {list(addr.direct_addresses())} within "
                f"{timeout:g} s; {unreachable}"
            ) from None
        except iroh.IrohError as exc:
            raise _map(exc, f"dialing {who}…", dialing=True) from None
        conn = Connection(raw)
        if conn.remote_key != want:
            conn.close(1, "unexpected key")
            raise AuthError(f"reached {conn.remote_hex[:16]}…, expected {who}…: {wrong_key}")
        log.debug("dialed remote=%s", conn.remote_hex[:16])
        return conn

    async def accept(self) -> Connection | None:
        """The next incoming ``drift/0`` connection; None once the endpoint is closed.

        The first call starts accepting. Handshakes run concurrently, so a slow or hostile
        dialer does not hold up the others; other ALPNs are refused in the TLS handshake.
        """
        if self._closed:
            return None
        if self._accept_task is None:
            self._accept_task = asyncio.create_task(self._accept_loop())
        conn = await self._incoming.get()
        if conn is None:
            self._incoming.put_nowait(None)  # wake any other waiter too
        return conn

    async def _accept_loop(self) -> None:
        try:
            while not self._closed:
                try:
                    incoming = await self._ep.accept_next()
                except iroh.IrohError as exc:
                    log.warning("accept_next failed kind=%s", exc.kind().name)
                    break
                if incoming is None:
                    break
                task = asyncio.create_task(self._handshake(incoming))
                self._handshakes.add(task)
                task.add_done_callback(self._handshakes.discard)
        finally:
            self._incoming.put_nowait(None)

    async def _handshake(self, incoming: Any) -> None:
        try:
            accepting = await incoming.accept()
            alpn = await accepting.alpn()
            raw = await accepting.connect()
        except iroh.IrohError as exc:
            log.info("incoming refused kind=%s", exc.kind().name)
            return
        if alpn != ALPN:  # the endpoint only offers drift/0; this is a second line
            raw.close(1, b"unsupported protocol")
            log.info("incoming refused alpn=%r", alpn)
            return
        conn = Connection(raw)
        log.debug("accepted remote=%s", conn.remote_hex[:16])
        await self._incoming.put(conn)

    async def close(self) -> None:
        """Stop accepting and close every connection of this endpoint. Idempotent."""
        if self._closed:
            return
        self._closed = True
        for task in list(self._handshakes):
            task.cancel()
        try:
            await asyncio.wait_for(self._ep.close(), 10)
        except (iroh.IrohError, asyncio.TimeoutError) as exc:
            log.warning("endpoint close incomplete error=%r", exc)
        if self._accept_task is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._accept_task, 5)
        self._incoming.put_nowait(None)
        # The binding frees the UDP socket only when its endpoint object is dropped, not on
        # close(): let go of it now, so the port can be bound again at once (a restart on
        # the same port) however long this wrapper lives on.
        self._ep_or_none = None
        log.debug("endpoint closed key=%s", self.key_hex[:16])


def _stream(bi: iroh.BiStream) -> Stream:
    """A :class:`Stream` over iroh's halves of ``bi``, with iroh's errors mapped by kind."""
    return Stream(bi.send(), bi.recv(), io_errors=(iroh.IrohError,), map_error=_map)


class Connection:
    """One QUIC connection to an authenticated peer (``remote_key`` is its Ed25519 key)."""

    def __init__(self, raw: iroh.Connection) -> None:
        self._raw = raw
        self.remote_key: bytes = raw.remote_id().to_bytes()
        self.remote_hex = self.remote_key.hex()

    async def open_stream(self) -> Stream:
        """A new bidirectional stream. The peer sees it once we send on it."""
        try:
            bi = await self._raw.open_bi()
        except iroh.IrohError as exc:
            raise _map(exc, "opening a stream") from None
        return _stream(bi)

    async def accept_stream(self) -> Stream:
        """The next stream the peer opens; ``PeerLost`` when the connection is gone."""
        try:
            bi = await self._raw.accept_bi()
        except iroh.IrohError as exc:
            raise _map(exc, "accepting a stream") from None
        return _stream(bi)

    def close(self, code: int = 0, reason: str = "") -> None:
        """Close now; the peer sees ``code`` and ``reason`` within a round trip."""
        with contextlib.suppress(iroh.IrohError):
            self._raw.close(code, reason.encode()[:512])

    async def closed(self) -> str:
        """Wait until the connection ends; returns the cause as text (for logs)."""
        return await self._raw.closed()

    def close_reason(self) -> str | None:
        return self._raw.close_reason()

    def rtt(self) -> float | None:
        """Round-trip time in seconds, when known."""
        ms = self._raw.rtt()
        return None if ms is None else ms / 1000.0


__all__ = [
    "CHUNK",
    "WRITE_PATH",
    "Connection",
    "Endpoint",
    "Stream",
    "local_bind_for",
    "peer_addrs",
    "peer_key",
    "ticket_addrs",
    "ticket_key",
]
