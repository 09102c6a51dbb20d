"""Pieces a member holds in memory, within a byte cap: what it took, computed or fetched, to
serve to others (``pieces.py`` moves them). No I/O."""

from __future__ import annotations

import asyncio
import contextlib

from lightning_drift.errors import PieceRefused
from lightning_drift.protocol import PieceKind

MAX_AWAITED = 4096  # pieces waited for at once; requests beyond it are answered at once
STORE_BYTES = 1 << 30  # a store's default cap: 1 GiB of pieces

PieceKey = tuple[int, int, PieceKind, str]
"""(upload round, shard, kind, sha256): one piece, as the store and the wire name it."""


class PieceStore:
    """Pieces in memory, at most ``max_bytes`` of them.

    A piece that does not fit pushes out pieces of older rounds, oldest round first (in the
    order they came within a round); pieces of its own round and newer ones are never pushed
    out for it: then it is refused (``PieceRefused``, code ``store_full``), since they are
    still needed. The store does not hash what it is given: the server and the client check a
    piece's sha256 on the way in."""

    def __init__(self, max_bytes: int = STORE_BYTES) -> None:
        self.max_bytes = max_bytes
        self._pieces: dict[PieceKey, bytes] = {}
        self._nbytes = 0
        self._awaited: dict[PieceKey, asyncio.Event] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of pieces held now."""
        return self._nbytes

    def __len__(self) -> int:
        return len(self._pieces)

    def room_for(self, upload_round: int, size: int) -> bool:
        """Whether a piece of ``size`` bytes for ``upload_round`` would be taken (pushing out
        older rounds if needed); the server asks before it reads the piece."""
        older = sum(len(v) for k, v in self._pieces.items() if k[0] < upload_round)
        return self._nbytes - older + size <= self.max_bytes

    def put(self, upload_round: int, shard: int, kind: PieceKind, sha256: str, data: bytes) -> None:
        """Hold ``data`` as this piece (replacing one of the same name)."""
        key: PieceKey = (upload_round, shard, kind, sha256)
        held = len(self._pieces.get(key, b""))  # a piece of the same name is replaced
        if not self.room_for(upload_round, len(data) - held):
            raise PieceRefused(
                f"no room for piece round={upload_round} shard={shard} kind={kind} of "
                f"{len(data)} bytes: the store holds {self._nbytes} of {self.max_bytes} bytes "
                "in this round and newer ones; raise its cap or forget finished rounds",
                "store_full",
            )
        self.discard(*key)
        older = sorted((k for k in self._pieces if k[0] < upload_round), key=lambda k: k[0])
        for old in older:
            if self._nbytes + len(data) <= self.max_bytes:
                break
            self.discard(*old)
        self._pieces[key] = bytes(data)
        self._nbytes += len(data)
        came = self._awaited.pop(key, None)
        if came is not None:
            came.set()

    async def arrival(
        self, upload_round: int, shard: int, kind: PieceKind, sha256: str, timeout_s: float
    ) -> bytes | None:
        """The piece once held, waiting up to ``timeout_s`` for it to be put (a member down a
        fetch tree asks before its parent has it); None if it does not come in time."""
        key: PieceKey = (upload_round, shard, kind, sha256)
        awaited = key in self._awaited or len(self._awaited) < MAX_AWAITED
        if key not in self._pieces and timeout_s > 0 and awaited:
            # One event per piece, shared by every waiter and dropped by put() or by
            # forget_before(): a waiter that times out leaves it to the others.
            came = self._awaited.setdefault(key, asyncio.Event())
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(came.wait(), timeout_s)
        return self._pieces.get(key)

    def get(self, upload_round: int, shard: int, kind: PieceKind, sha256: str) -> bytes | None:
        """The piece's bytes, or None when it is not held."""
        return self._pieces.get((upload_round, shard, kind, sha256))

    def has(self, upload_round: int, shard: int, kind: PieceKind, sha256: str) -> bool:
        return (upload_round, shard, kind, sha256) in self._pieces

    def discard(self, upload_round: int, shard: int, kind: PieceKind, sha256: str) -> None:
        """Drop the piece if it is held."""
        data = self._pieces.pop((upload_round, shard, kind, sha256), None)
        if data is not None:
            self._nbytes -= len(data)

    def forget_before(self, upload_round: int) -> int:
        """Drop every piece of a round before ``upload_round``; returns the bytes freed."""
        freed = 0
        for key in [k for k in self._pieces if k[0] < upload_round]:
            freed += len(self._pieces.pop(key))
        for key in [k for k in self._awaited if k[0] < upload_round]:
            self._awaited.pop(key).set()  # nobody will put it now: its waiters go
        self._nbytes -= freed
        return freed


__all__ = ["MAX_AWAITED", "STORE_BYTES", "PieceKey", "PieceStore"]
