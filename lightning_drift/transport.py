"""QUIC over iroh: endpoints, connections and framed streams. The only module that imports iroh.

- :class:`Endpoint` binds in ``local`` mode (no relays, explicit bind address: tests, LANs,
  network namespaces) or ``internet`` mode (n0 preset: relays, hole punching; optional own
  relay URLs). It dials a ticket or a peer named by id (``lightning_drift.peers``) and
  accepts ``drift/0`` connections.
- :class:`Connection` opens and accepts bidirectional streams.
- :class:`Stream` carries ``drift/0`` frames (4-byte length + msgspec JSON, see
  ``protocol.py``) and raw blobs (a ``BlobHeader`` frame, then ``size`` bytes, sha256 checked).

iroh errors are mapped by ``IrohError.kind()`` (never by their text, which holds build paths)
onto ``PeerLost``, ``ConnectTimeout``, ``ProtocolError`` and ``AuthError``.

Importing this module also fixes the binding's write path, unless ``DRIFT_IROH_PATCH=0``
(see ``lightning_drift._iroh_patch``; the outcome is :data:`WRITE_PATH`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import secrets
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import iroh

from lightning_drift import _iroh_patch, protocol
from lightning_drift.errors import (
    AuthError,
    BlobTooLarge,
    ConfigError,
    ConnectTimeout,
    DriftError,
    PeerLost,
    ProtocolError,
    TooSlow,
)
from lightning_drift.fsutil import sha256_bytes, sha256_file
from lightning_drift.peers import PeerName
from lightning_drift.protocol import ALPN, BlobHeader, Message

log = logging.getLogger(__name__)

CHUNK = 1 << 20  # blob bytes per write_all / read_exact: keeps memory flat, < 2 GiB FFI limit
# Throughput ceiling (iroh 1.2.0, loopback, 2 cores): ~110-150 MB/s. Past the Python write fix,
# the binding's compiled side still moves every byte one at a time (uniffi_core 0.31.2's generic
# Vec<u8> Lift::try_read on write_all, ~2.7 CPU-ms per MiB, and Lower on read, ~2 CPU-ms per MiB);
# with QUIC itself (~2.5 CPU-ms per MiB per side) a transfer costs ~12-14 CPU-ms per MiB in all.
# Chunk size (256 KiB-4 MiB), read vs read_exact and more streams do not change that cost.
READ_AHEAD = 64 << 10  # bytes asked for per read when filling the frame buffer
_HASH_IN_THREAD = 8 << 20  # hash blobs larger than this off the event loop

_PyBytes_FromStringAndSize = ctypes.PYFUNCTYPE(ctypes.py_object, ctypes.c_void_p, ctypes.c_ssize_t)(
    ("PyBytes_FromStringAndSize", ctypes.pythonapi)
)

# "patched", "already", "disabled: ..." or "refused: <reason>": what the binding's write path
# is in this process (see _iroh_patch; DRIFT_IROH_PATCH=0 leaves it stock).
WRITE_PATH = _iroh_patch.apply()
log.debug("write_path status=%s iroh=%s", WRITE_PATH, _iroh_patch.iroh_version())


def _new_bytes(n: int) -> tuple[bytes, int]:
    """A fresh, uninitialised ``bytes`` of length ``n`` and the address of its storage.

    This is how C code builds a bytes object it fills itself (PyBytes_FromStringAndSize with
    NULL); it lets a received blob land in its final ``bytes`` without a second full copy.
    The object must be filled before it is shared.
    """
    obj = _PyBytes_FromStringAndSize(None, n)
    with _iroh_patch.raw_buffer(obj) as (addr, _):
        return obj, addr


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
        return Stream(bi.send(), bi.recv())

    async def accept_stream(self) -> Stream:
        """The next stream the peer opens; ``PeerLost`` when the connection is gone."""
        try:
            bi = await self._raw.accept_bi()
        except iroh.IrohError as exc:
            raise _map(exc, "accepting a stream") from None
        return Stream(bi.send(), bi.recv())

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


class Stream:
    """``drift/0`` frames and blobs on one bidirectional stream.

    Reads go through a buffer: one FFI read usually brings a whole small frame. Reading is
    not cancel-safe (a cancelled FFI read loses what it had read), so a cancelled ``recv``
    or ``recv_blob`` poisons the stream: later reads raise ``PeerLost``. Put timeouts around
    a whole exchange and abandon the stream on timeout; never around a single read.
    """

    def __init__(self, send: iroh.SendStream, recv: iroh.RecvStream) -> None:
        self._send = send
        self._recv = recv
        self._buf = bytearray()
        self._send_lock = asyncio.Lock()
        self._broken: str | None = None

    # ---- sending

    async def _write(self, data: bytes | memoryview) -> None:
        try:
            # memoryviews are fine: the binding only needs the buffer protocol
            await self._send.write_all(data)  # type: ignore[arg-type]
        except iroh.IrohError as exc:
            raise _map(exc, "sending") from None

    async def send(self, msg: protocol._Msg) -> None:
        """Send one frame. Concurrent senders are serialised (frames never interleave)."""
        frame = protocol.encode_frame(msg)
        async with self._send_lock:
            await self._write(frame)

    async def send_blob(
        self,
        data: bytes | bytearray | memoryview | Path,
        *,
        kind: str = "weights",
        dtype: str = "",
        meta: dict[str, str] | None = None,
        sha256: str | None = None,
    ) -> BlobHeader:
        """Send a ``BlobHeader`` frame (size, sha256), then the bytes in 1 MiB writes.

        ``data`` may be a file path: it is read twice (hash, then send) in chunks, never whole.
        ``sha256``: the hex digest of ``data`` when the caller already knows it (the same
        global weights go to every node); it is not checked here, the receiver checks it.
        """
        if isinstance(data, (str, Path)):
            path = Path(data)
            size = path.stat().st_size
            if sha256 is not None:
                digest = sha256
            else:
                digest = await asyncio.to_thread(sha256_file, path, CHUNK)
            header = BlobHeader(
                size=size, sha256=digest, kind=kind, dtype=dtype, meta=dict(meta or {})
            )
            async with self._send_lock:
                await self._write(protocol.encode_frame(header))
                with path.open("rb") as f:
                    sent = 0
                    while chunk := f.read(CHUNK):
                        await self._write(chunk)
                        sent += len(chunk)
                if sent != size:
                    raise DriftError(f"{path} changed while it was sent ({sent} of {size} bytes)")
            return header
        view = memoryview(data).cast("B")
        if sha256 is not None:
            digest = sha256
        elif view.nbytes > _HASH_IN_THREAD:
            digest = await asyncio.to_thread(sha256_bytes, view)
        else:
            digest = sha256_bytes(view)
        header = BlobHeader(
            size=view.nbytes, sha256=digest, kind=kind, dtype=dtype, meta=dict(meta or {})
        )
        async with self._send_lock:
            await self._write(protocol.encode_frame(header))
            for off in range(0, view.nbytes, CHUNK):
                await self._write(view[off : off + CHUNK])
        return header

    async def finish(self) -> None:
        """End our sending side; the peer reads EOF after the last byte."""
        try:
            await self._send.finish()
        except iroh.IrohError as exc:
            raise _map(exc, "finishing the stream") from None

    async def stop_reading(self, code: int = 0) -> None:
        """Tell the peer we read no more of this stream: its pending writes fail at once.

        Call it only with no read pending on this stream (the binding would block)."""
        self._broken = self._broken or "stopped reading"
        with contextlib.suppress(iroh.IrohError):
            await self._recv.stop(code)

    # ---- receiving

    async def _fill(self, n: int) -> None:
        """Make the buffer hold at least ``n`` bytes."""
        while len(self._buf) < n:
            try:
                chunk = await self._recv.read(max(READ_AHEAD, n - len(self._buf)))
            except iroh.IrohError as exc:
                raise _map(exc, "receiving") from None
            if not chunk:
                if self._buf:
                    raise PeerLost(
                        f"the peer ended the stream inside a frame ({len(self._buf)} bytes "
                        "of an unfinished frame)"
                    )
                raise PeerLost("the peer ended the stream")
            self._buf += chunk

    def _take(self, n: int) -> bytes:
        out = bytes(self._buf[:n])
        del self._buf[:n]
        return out

    @contextlib.contextmanager
    def _reading(self) -> Iterator[None]:
        if self._broken:
            raise PeerLost(f"stream unusable: {self._broken}; open a new stream")
        try:
            yield
        except asyncio.CancelledError:
            self._broken = "a read on it was cancelled"
            raise
        except (ProtocolError, TooSlow) as exc:
            self._broken = f"{exc}"
            raise

    async def recv(self) -> Message:
        """The next message. ``ProtocolError`` for a bad frame (the length is checked before
        the body is read); ``PeerLost`` when the peer is gone or ended the stream."""
        with self._reading():
            return await self._recv_frame()

    async def _recv_frame(self) -> Message:
        await self._fill(protocol.HEADER.size)
        n = protocol.frame_length(bytes(self._buf[: protocol.HEADER.size]))
        await self._fill(protocol.HEADER.size + n)
        del self._buf[: protocol.HEADER.size]
        return protocol.decode(self._take(n))

    async def recv_blob(
        self,
        *,
        into: Path | None = None,
        max_size: int = 1 << 40,
        limit_hint: str = "",
        inspect: Callable[[bytearray, int], int] | None = None,
        min_rate: float = 0.0,
        grace_s: float = 30.0,
    ) -> tuple[BlobHeader, bytes | Path]:
        """Read a ``BlobHeader`` frame and its bytes: into memory, or into the file ``into``.

        The file appears only complete and verified (written to a temporary name, fsynced,
        renamed). ``ProtocolError`` when the next frame is not a blob header, the size exceeds
        ``max_size`` (refused before any byte is read; ``limit_hint`` is added to the message),
        or the sha256 does not match.

        For an untrusted sender: ``inspect`` is called with the bytes received so far (and the
        declared size) until it returns 0 ("the start checks out"; a positive number is how many bytes it needs, an
        exception refuses the blob); until then memory grows with what has arrived, and only
        then is the whole declared size allocated. With ``min_rate`` (bytes/s), the header and
        the bytes must keep arriving at that average rate, counted from the call after a
        ``grace_s`` start: a slower sender gets :class:`TooSlow` and the stream is abandoned.
        """
        pace = _Pace(min_rate, grace_s)
        with self._reading():
            frame = await pace.wait(self._recv_frame(), 0, "the blob header")
            header = protocol.expect(frame, BlobHeader)
            assert isinstance(header, BlobHeader)
            self._check_blob_header(header, max_size, limit_hint)
            if into is None:
                return header, await self._recv_into_bytes(header, pace, inspect)
            return header, await self._recv_into_file(header, Path(into), pace)

    async def drain_blob(
        self, *, max_size: int = 1 << 40, min_rate: float = 0.0, grace_s: float = 30.0
    ) -> BlobHeader:
        """Read a ``BlobHeader`` and throw its bytes away (a blob the receiver has no use for),
        with the limits of :meth:`recv_blob`; memory stays one chunk."""
        pace = _Pace(min_rate, grace_s)
        with self._reading():
            frame = await pace.wait(self._recv_frame(), 0, "the blob header")
            header = protocol.expect(frame, BlobHeader)
            assert isinstance(header, BlobHeader)
            self._check_blob_header(header, max_size, "")
            async for _ in self._chunks(header.size, pace):
                pass
            return header

    @staticmethod
    def _check_blob_header(header: BlobHeader, max_size: int, limit_hint: str) -> None:
        if header.size < 0 or header.size > max_size:
            raise BlobTooLarge(
                f"blob of {header.size} bytes refused: the limit is {max_size} bytes"
                + (f" ({limit_hint})" if limit_hint else ""),
                header.size,
                max_size,
            )
        if len(header.sha256) != 64:
            raise ProtocolError(f"blob header sha256 {header.sha256[:80]!r} is not 64 hex")

    async def _chunks(self, size: int, pace: _Pace | None = None) -> Any:
        """Yield the next ``size`` bytes of the stream in pieces of at most CHUNK bytes."""
        left = size
        if self._buf:
            first = self._take(min(left, len(self._buf)))
            left -= len(first)
            yield first
        while left:
            n = min(left, CHUNK)
            read = self._recv.read_exact(n)
            try:
                if pace is None:
                    chunk = await read
                else:
                    chunk = await pace.wait(read, size - left + n, f"{size} bytes", size - left)
            except iroh.IrohError as exc:
                raise _map(exc, f"receiving a blob ({size - left} of {size} bytes read)") from None
            left -= len(chunk)
            yield chunk

    async def _recv_into_bytes(
        self, header: BlobHeader, pace: _Pace, inspect: Callable[[bytearray, int], int] | None
    ) -> bytes:
        h = hashlib.sha256()
        out: bytes | None = None
        addr = 0
        prefix = bytearray()
        need = 1  # bytes ``inspect`` wants before it is asked again
        off = 0
        async for chunk in self._chunks(header.size, pace):
            h.update(chunk)
            if out is None and inspect is not None:
                # Untrusted: keep what arrived until its start checks out, then allocate.
                prefix += chunk
                if len(prefix) < need or (need := inspect(prefix, header.size)) > 0:
                    continue
                chunk, prefix = bytes(prefix), bytearray()
            if out is None:
                out, addr = _new_bytes(header.size)
            ctypes.memmove(addr + off, chunk, len(chunk))
            off += len(chunk)
        if out is None:  # an empty blob, or one whose start never checked out
            if inspect is not None and inspect(prefix, header.size) > 0:
                raise ProtocolError("blob ended before its start could be checked")
            out = bytes(prefix)
        _check_digest(h.hexdigest(), header)
        return out

    async def _recv_into_file(self, header: BlobHeader, path: Path, pace: _Pace) -> Path:
        h = hashlib.sha256()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            with tmp.open("wb") as f:
                async for chunk in self._chunks(header.size, pace):
                    h.update(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            _check_digest(h.hexdigest(), header)
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                tmp.unlink()
            raise
        return path


class _Pace:
    """A minimum average byte rate for one blob: by ``grace_s + n / min_rate`` seconds after
    it started, ``n`` bytes must have arrived. ``min_rate`` 0: no limit."""

    def __init__(self, min_rate: float, grace_s: float) -> None:
        self.min_rate = min_rate
        self.grace_s = grace_s
        self.t0 = asyncio.get_running_loop().time()

    async def wait(self, aw: Any, by: int, what: str, have: int = 0) -> Any:
        """Await ``aw`` (a read that brings the stream to ``by`` bytes) within the pace.

        On timeout the read is cancelled, which breaks the stream (see :class:`Stream`)."""
        if self.min_rate <= 0:
            return await aw
        loop = asyncio.get_running_loop()
        left = self.t0 + self.grace_s + by / self.min_rate - loop.time()
        try:
            return await asyncio.wait_for(aw, max(0.0, left))
        except asyncio.TimeoutError:
            took = loop.time() - self.t0
            raise TooSlow(
                f"too slow: {have} bytes of {what} in {took:.0f}s, below the minimum of "
                f"{self.min_rate:g} bytes/s (after a {self.grace_s:g}s start)"
            ) from None


def _check_digest(got: str, header: BlobHeader) -> None:
    if got != header.sha256.lower():
        raise ProtocolError(
            f"blob checksum mismatch: header says {header.sha256[:16]}…, the {header.size} "
            f"bytes received hash to {got[:16]}…; the transfer was corrupted, send it again"
        )


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
