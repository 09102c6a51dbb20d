"""``drift/0`` frames and blobs on one bidirectional stream, over any pair of stream halves.

:class:`Stream` holds what a stream carries and how: frames (4-byte length + msgspec JSON, see
``protocol.py``) read through a buffer, and blobs (a ``BlobHeader`` frame, then ``size`` bytes,
sha256 checked) sent and received in chunks, with a floor on the rate an untrusted sender must
keep. It knows nothing of iroh: ``transport.py`` (the only module that imports iroh) hands it
iroh's send and receive halves together with the iroh error types and the function that maps
them onto ours, so the framing and blob rules can be read, and tested with plain fakes,
without the binding.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import os
import secrets
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from lightning_drift import _iroh_patch, protocol
from lightning_drift.errors import BlobTooLarge, DriftError, PeerLost, ProtocolError, TooSlow
from lightning_drift.fsutil import sha256_bytes, sha256_file
from lightning_drift.protocol import BlobHeader, Message

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


def _new_bytes(n: int) -> tuple[bytes, int]:
    """A fresh, uninitialised ``bytes`` of length ``n`` and the address of its storage.

    This is how C code builds a bytes object it fills itself (PyBytes_FromStringAndSize with
    NULL); it lets a received blob land in its final ``bytes`` without a second full copy.
    The object must be filled before it is shared.
    """
    obj = _PyBytes_FromStringAndSize(None, n)
    with _iroh_patch.raw_buffer(obj) as (addr, _):
        return obj, addr


ErrorMap = Callable[[BaseException, str], DriftError]
"""Turns an error of the stream halves into one of ours; the text says what we were doing."""


def _peer_lost(exc: BaseException, doing: str) -> DriftError:
    return PeerLost(f"{doing}: {exc!r}")


class Stream:
    """``drift/0`` frames and blobs on one bidirectional stream.

    Reads go through a buffer: one FFI read usually brings a whole small frame. Reading is
    not cancel-safe (a cancelled FFI read loses what it had read), so a cancelled ``recv``
    or ``recv_blob`` poisons the stream: later reads raise ``PeerLost``. Put timeouts around
    a whole exchange and abandon the stream on timeout; never around a single read.
    """

    def __init__(
        self,
        send: Any,
        recv: Any,
        *,
        io_errors: tuple[type[BaseException], ...] = (),
        map_error: ErrorMap = _peer_lost,
    ) -> None:
        """``send``/``recv``: the stream's halves (``write_all``/``finish``; ``read``,
        ``read_exact``/``stop``). ``io_errors``: what they raise when the peer or the path
        fails; each is turned into one of ours by ``map_error`` (transport passes iroh's)."""
        self._send = send
        self._recv = recv
        self._io_errors = io_errors
        self._map = map_error
        self._buf = bytearray()
        self._send_lock = asyncio.Lock()
        self._broken: str | None = None

    # ---- sending

    async def _write(self, data: bytes | memoryview) -> None:
        try:
            # memoryviews are fine: the binding only needs the buffer protocol
            await self._send.write_all(data)  # type: ignore[arg-type]
        except self._io_errors as exc:
            raise self._map(exc, "sending") from None

    async def send_raw(self, data: bytes | memoryview) -> None:
        """Send bytes as they are: a frame already encoded (one manifest for a thousand
        members is encoded once), or, in a test, a broken or hostile peer's bytes (half a
        frame, garbage, a lying length)."""
        async with self._send_lock:
            await self._write(data)

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
        except self._io_errors as exc:
            raise self._map(exc, "finishing the stream") from None

    async def stop_reading(self, code: int = 0) -> None:
        """Tell the peer we read no more of this stream: its pending writes fail at once.

        Call it only with no read pending on this stream (the binding would block)."""
        self._broken = self._broken or "stopped reading"
        with contextlib.suppress(*self._io_errors):
            await self._recv.stop(code)

    # ---- receiving

    async def _fill(self, n: int) -> None:
        """Make the buffer hold at least ``n`` bytes."""
        while len(self._buf) < n:
            try:
                chunk = await self._recv.read(max(READ_AHEAD, n - len(self._buf)))
            except self._io_errors as exc:
                raise self._map(exc, "receiving") from None
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
        header: BlobHeader | None = None,
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

        ``header``: the blob's header when the caller has already read it with :meth:`recv`
        (to tell a blob from an ``Error`` answer, or to check the header against what it
        expects before any byte of the body is read); only the bytes are read then.
        """
        floor = _RateFloor(min_rate, grace_s)
        with self._reading():
            if header is None:
                frame = await floor.wait(self._recv_frame(), 0, "the blob header")
                read = protocol.expect(frame, BlobHeader)
                assert isinstance(read, BlobHeader)
                header = read
            self._check_blob_header(header, max_size, limit_hint)
            if into is None:
                return header, await self._recv_into_bytes(header, floor, inspect)
            return header, await self._recv_into_file(header, Path(into), floor)

    async def drain_blob(
        self, *, max_size: int = 1 << 40, min_rate: float = 0.0, grace_s: float = 30.0
    ) -> BlobHeader:
        """Read a ``BlobHeader`` and throw its bytes away (a blob the receiver has no use for),
        with the limits of :meth:`recv_blob`; memory stays one chunk."""
        floor = _RateFloor(min_rate, grace_s)
        with self._reading():
            frame = await floor.wait(self._recv_frame(), 0, "the blob header")
            header = protocol.expect(frame, BlobHeader)
            assert isinstance(header, BlobHeader)
            self._check_blob_header(header, max_size, "")
            async for _ in self._chunks(header.size, floor):
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

    async def _chunks(
        self, size: int, floor: _RateFloor | None = None, want: Callable[[], int] | None = None
    ) -> Any:
        """Yield the next ``size`` bytes of the stream in pieces of at most CHUNK bytes (and at
        most ``want()`` bytes, asked before each read: a reader checking the start of a blob
        reads no further than the check needs, so a check that can fail does)."""
        left = size
        if self._buf:
            first = self._take(min(left, len(self._buf)))
            left -= len(first)
            yield first
        while left:
            n = min(left, CHUNK, max(1, want()) if want is not None else CHUNK)
            read = self._recv.read_exact(n)
            try:
                if floor is None:
                    chunk = await read
                else:
                    chunk = await floor.wait(read, size - left + n, f"{size} bytes", size - left)
            except self._io_errors as exc:
                raise self._map(
                    exc, f"receiving a blob ({size - left} of {size} bytes read)"
                ) from None
            left -= len(chunk)
            yield chunk

    async def _recv_into_bytes(
        self, header: BlobHeader, floor: _RateFloor, inspect: Callable[[bytearray, int], int] | None
    ) -> bytes:
        h = hashlib.sha256()
        out: bytes | None = None
        addr = 0
        prefix = bytearray()
        need = 1  # bytes ``inspect`` wants before it is asked again
        off = 0

        def want() -> int:
            # Until the start checks out, only the bytes the check asked for: a sender that
            # stops after a bad header is refused for it, not waited on for the rest.
            return need - len(prefix) if out is None and inspect is not None else CHUNK

        async for chunk in self._chunks(header.size, floor, want):
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

    async def _recv_into_file(self, header: BlobHeader, path: Path, floor: _RateFloor) -> Path:
        h = hashlib.sha256()
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.part")
        try:
            with tmp.open("wb") as f:
                async for chunk in self._chunks(header.size, floor):
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


class _RateFloor:
    """A minimum average byte rate for one blob: by ``grace_s + n / min_rate`` seconds after
    it started, ``n`` bytes must have arrived. ``min_rate`` 0: no limit."""

    def __init__(self, min_rate: float, grace_s: float) -> None:
        self.min_rate = min_rate
        self.grace_s = grace_s
        self.t0 = asyncio.get_running_loop().time()

    async def wait(self, aw: Any, by: int, what: str, have: int = 0) -> Any:
        """Await ``aw`` (a read that brings the stream to ``by`` bytes) within the floor.

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


__all__ = ["CHUNK", "READ_AHEAD", "ErrorMap", "Stream"]
