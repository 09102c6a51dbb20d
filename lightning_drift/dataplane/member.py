"""A member's part in a sharded round: push its change's pieces, compute the shards it is
asked for, fetch the round's result. I/O over ``pieces.py``; every decision comes in.

In a round a member

1. **pushes** (:meth:`Member.push_change`): cuts its encoded change by the plan, keeps every
   piece (a replacement computer or a referee fetches them from it until the round's manifest),
   and pushes piece ``j`` to shard ``j``'s seats (the epoch's primary and mirror,
   ``owners.py``); it returns the :class:`~lightning_drift.dataplane.manifest.Commit` it
   sends the coordinator;
2. **computes** (:meth:`Member.compute`) each shard it is ordered to: the pieces of the
   order's reduction list, from its store or, when one did not come, from its contributor;
   then :func:`~lightning_drift.dataplane.reduce.reduce_shard` in a thread. The result piece
   is kept to be served; the report goes to the coordinator;
3. **fetches** (:meth:`Member.fetch_result`) every result piece it does not hold, verified
   against the signed manifest, down a tree: for each shard the members are ranked (by the
   round's draw); the first two are the shard's seats, and the member at place ``p`` fetches
   from the one at place ``(p - 2) // 2``, so no member serves more than two others a shard
   (three, for a lone seat), falling back to the seats when its parent does not answer or
   serves slower than :data:`TREE_BYTES_S`.

A node that **joins** needs the global weights whole. Every member holds them, bit for bit
the same, so the joiner fetches them from several at once (:meth:`Member.fetch_weights`): the
safetensors bytes cut into chunks (:func:`weight_chunks`), each checked against the sha256 in
the table the coordinator hands it (:func:`chunk_table`), each from one member and from the
next when that one fails. The holders keep the chunks (:meth:`Member.hold_weights`).

Who is a seat, what is in an order, and whether the manifest is genuine are the caller's
(the coordinator's signature is checked before this module sees a manifest).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from lightning_drift.dataplane.books import Report
from lightning_drift.dataplane.manifest import Commit, Manifest, ShardEntry
from lightning_drift.dataplane.owners import Owners, ranking
from lightning_drift.dataplane.pieces import PieceClient, PieceServer, PieceStore
from lightning_drift.dataplane.plan import ShardPlan
from lightning_drift.dataplane.reduce import (
    OuterRule,
    Piece,
    ShardResult,
    ShardState,
    read_state,
    reduce_shard,
    state_bytes,
)
from lightning_drift.errors import (
    AuthError,
    ConnectTimeout,
    DriftError,
    PeerLost,
    PieceRefused,
    ProtocolError,
)
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.peers import PeerName
from lightning_drift.protocol import PieceKind
from lightning_drift.text import short_id
from lightning_drift.transport import Endpoint

log = logging.getLogger(__name__)

CHANGE: PieceKind = "change"
RESULT: PieceKind = "result"
STATE: PieceKind = "state"
TREE_BYTES_S = 1 << 20  # the least a fetch-tree parent must serve per second
WEIGHTS: PieceKind = "weights"
MAX_CHUNKS = 1024  # chunks the weights may be cut into (a table of 1,024 is about 70 KB)
WEIGHT_FETCHES = 8  # chunk fetches a joiner keeps in flight at once


def fetch_tree(
    members: Sequence[str], seats: Sequence[str], seed: bytes, shard: int
) -> dict[str, str]:
    """Each member's parent for a shard's result piece (the seats have none): the seats
    first, then the other members by their draw for the round (``seed``); the member at
    place ``p`` fetches from place ``(p - 2) // 2``."""
    rest = [m for m in ranking(members, seed, shard) if m not in seats]
    order = [s for s in seats if s] + rest
    return {m: order[(p - 2) // 2] for p, m in enumerate(order) if p >= 2}


def weight_chunks(blob: bytes, count: int) -> list[bytes]:
    """The weights' bytes (``aggregate.to_bytes`` of the global weights) cut into ``count``
    consecutive ranges whose sizes differ by at most one byte; fewer, of one byte each, when
    the blob is shorter than ``count`` (one empty chunk for an empty blob). Every holder cuts
    the same bytes the same way, so a chunk's sha256 names it across members."""
    if not 1 <= count <= MAX_CHUNKS:
        raise ValueError(f"the weights are cut into 1 to {MAX_CHUNKS} chunks, not {count}")
    n = max(1, min(count, len(blob)))
    cuts = [len(blob) * i // n for i in range(n + 1)]
    return [blob[a:b] for a, b in zip(cuts, cuts[1:], strict=False)]


def chunk_count(size: int) -> int:
    """How many chunks every member cuts weights of ``size`` bytes into: about 64 KiB each,
    at least 8 (a joiner fetches from several members even for a small model), at most
    :data:`MAX_CHUNKS`."""
    return min(MAX_CHUNKS, max(8, size >> 16))


def chunk_table(blob: bytes, count: int) -> list[tuple[str, int]]:
    """The sha256 (hex) and size of each of :func:`weight_chunks`' chunks: what the
    coordinator, which holds the checkpoint's bytes, hands a joiner to check them by."""
    return [(sha256_bytes(c), len(c)) for c in weight_chunks(blob, count)]


@dataclass(frozen=True)
class Computed:
    """A shard computed: the result, and the sha256 and size of the state it carries on; or,
    when a piece could not be obtained, nothing computed and whose pieces were missing."""

    result: ShardResult
    state: str
    state_size: int
    missing: tuple[str, ...] = ()  # contributors whose pieces it could not obtain

    def report(self, attempt: int = 0) -> Report:
        """What a computer reports of it (the books' side of a ``ShardReport``)."""
        res = self.result
        return Report(
            res.index, res.sha, len(res.piece or b""), res.sums, res.norms2, res.bad,
            self.state, self.state_size, self.missing, attempt,
        )  # fmt: skip


@dataclass
class Member:
    """One member's data plane on its own endpoint (see the module docstring).

    ``peers`` maps every member's node id to the name its data endpoint is dialled by;
    ``gone`` holds the members the coordinator said are lost (never dialled again)."""

    node: str
    endpoint: Endpoint
    plan: ShardPlan
    peers: dict[str, PeerName | str]
    store: PieceStore = field(default_factory=PieceStore)
    seats: list[Owners] = field(default_factory=list)  # the epoch's seats of every shard
    gone: set[str] = field(default_factory=set)  # members the coordinator says are lost
    open_round: int = 0  # the round whose change pieces this member takes
    _senders: set[tuple[int, int, bytes]] = field(default_factory=set)
    wait_s: float = 20.0  # how long a parent holds a fetch for a result piece it awaits
    push_wait_s: float = 5.0  # how long a commit waits for its pushes
    _pushing: set[asyncio.Future[None]] = field(default_factory=set)  # pushes still going
    server: PieceServer | None = None
    client: PieceClient | None = None

    async def start(self, keys: Mapping[str, bytes]) -> None:
        """Serve pieces to the members ``keys`` names (node id -> data endpoint key)."""
        self.client = PieceClient(self.endpoint)
        self.server = PieceServer(
            self.endpoint,
            self.store,
            self._expect,
            self._taken,
            allowed=keys.values(),
            hold_s=self.wait_s,
        )

    def _expect(self, peer: bytes, upload_round: int, shard: int, kind: PieceKind) -> int | str:
        # A hostile member must not fill this store: only the open round (or the next, from
        # a member ahead of this one), and one piece per sender and shard in a round.
        if kind != CHANGE:
            return f"{kind} pieces are fetched, never pushed"
        if upload_round not in (self.open_round, self.open_round + 1):
            return f"round {upload_round} is not open here (round {self.open_round} is)"
        if (upload_round, shard, peer) in self._senders:
            return f"a piece of shard {shard} of round {upload_round} came from this member already"
        if not 0 <= shard < self.plan.count:
            return f"shard {shard} is not one of the plan's {self.plan.count}"
        if not self.seats or not self.seats[shard].holds(self.node):
            return f"this member does not aggregate shard {shard}"
        return self.plan.shards[shard].size

    def _taken(
        self, peer: bytes, upload_round: int, shard: int, kind: PieceKind, sha: str, data: bytes
    ) -> None:
        self._senders.add((upload_round, shard, peer))

    def _keep(self, upload_round: int, shard: int, kind: PieceKind, sha: str, data: bytes) -> None:
        """Hold a piece to serve it; a full store is logged, never fatal to the round."""
        try:
            self.store.put(upload_round, shard, kind, sha, data)
        except PieceRefused as exc:
            log.warning("dataplane.store_full node=%s why=%s", short_id(self.node), exc)

    def open(self, upload_round: int) -> None:
        """The round now open here: change pieces of older rounds are no longer taken."""
        self.open_round = upload_round
        self._senders = {k for k in self._senders if k[0] >= upload_round}

    # ---- 1. push --------------------------------------------------------------------------

    async def push_change(self, upload_round: int, base: str, payload: bytes) -> Commit:
        """Cut, keep and push this member's change (see the module docstring)."""
        if upload_round > self.open_round:
            self.open(upload_round)
        pieces = await asyncio.to_thread(self.plan.pieces, payload)
        hashes = [sha256_bytes(p) for p in pieces]
        for j, (piece, sha) in enumerate(zip(pieces, hashes, strict=True)):
            self._keep(upload_round, j, CHANGE, sha, piece)
        sends = {
            asyncio.ensure_future(
                self._client.push(self.peers[seat], upload_round, j, CHANGE, pieces[j])
            )
            for j, owners in enumerate(self.seats)
            for seat in (owners.primary, owners.mirror)
            if seat and seat != self.node and seat not in self.gone and seat in self.peers
        }
        for task in sends:
            self._pushing.add(task)
            task.add_done_callback(self._pushed)
        # A seat that died before the coordinator said so must not hold the commit for a
        # connect timeout: past push_wait_s the commit goes, the pushes go on, and a seat a
        # piece did not reach fetches it from here.
        if sends:
            await asyncio.wait(sends, timeout=self.push_wait_s)
        return Commit(round=upload_round, base=base, pieces=hashes, sizes=[len(p) for p in pieces])

    def _pushed(self, task: asyncio.Future[None]) -> None:
        self._pushing.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A seat that does not take the piece is the round's to handle: its replacement
            # fetches the piece from here.
            log.warning(
                "dataplane.push_failed node=%s why=%s", short_id(self.node), task.exception()
            )

    # ---- 2. compute -----------------------------------------------------------------------

    async def compute(
        self,
        upload_round: int,
        shard: int,
        reduction: Sequence[tuple[str, float, str]],
        base: Mapping[str, torch.Tensor],
        fixed: frozenset[str],
        state: ShardState,
        rule: OuterRule,
    ) -> Computed:
        """Shard ``shard``'s round over ``reduction`` ((node, weight, piece sha256), in
        order); the result piece and the shard's next state are kept to be served."""
        size = self.plan.shards[shard].size
        pieces: list[Piece] = []
        missing: list[str] = []
        for node, weight, sha in reduction:
            data = self.store.get(upload_round, shard, CHANGE, sha)
            if data is None:  # kept once fetched: it may be asked of this member (an audit)
                data = await self._piece_from_holders(upload_round, shard, node, sha, size)
                if not data:
                    missing.append(node)
            pieces.append(Piece(node, weight, data))
        if missing:  # nothing to compute: the report says so and is no vote
            empty = ShardResult(shard, None, "", {}, {}, 0.0, state)
            return Computed(empty, "", 0, tuple(missing))
        result = await asyncio.to_thread(
            reduce_shard, self.plan, shard, base, fixed, pieces, state, rule, upload_round
        )
        if result.piece is None:
            return Computed(result, "", 0)
        self._keep(upload_round, shard, RESULT, result.sha, result.piece)
        kept = await asyncio.to_thread(state_bytes, result.state)
        if not kept:
            return Computed(result, "", 0)
        sha = sha256_bytes(kept)
        self._keep(upload_round, shard, STATE, sha, kept)
        return Computed(result, sha, len(kept))

    async def fetch_state(self, upload_round: int, entry: ShardEntry) -> ShardState:
        """What shard ``entry.index`` carried out of ``upload_round`` (its manifest's entry),
        for a member that takes the shard over: by hash, from the seats that computed it."""
        if not entry.state:
            return ShardState()
        data = self.store.get(upload_round, entry.index, STATE, entry.state)
        why: Exception | None = None
        if data is None:
            data, why = await self._first_served(
                [entry.primary, entry.mirror], upload_round, entry.index, STATE,
                entry.state, entry.state_size,
            )  # fmt: skip
        if data is None:
            raise ProtocolError(
                f"no seat served shard {entry.index}'s state of round {upload_round}: {why}; "
                "the shard must start again from the last checkpoint"
            )
        return await asyncio.to_thread(read_state, self.plan, entry.index, data)

    async def _piece_from_holders(
        self, upload_round: int, shard: int, node: str, sha: str, size: int
    ) -> bytes:
        """A change piece that did not come here (this member replaces a lost seat, or the
        contributor pushed by an older seating): from its contributor, which keeps it until
        the manifest, else from the shard's seats, which it was pushed to; b"" when nobody
        serves it. (A seat holds a fetch of a piece it awaits, so it is not asked first.)"""
        owners = self.seats[shard] if self.seats else None
        holders = [s for s in (owners.primary, owners.mirror) if s] if owners else []
        data, why = await self._first_served(
            [node, *holders], upload_round, shard, CHANGE, sha, size
        )
        if data is None:
            log.warning(
                "dataplane.piece_missing node=%s contributor=%s why=%s",
                short_id(self.node), short_id(node), why,
            )  # fmt: skip
        return data or b""

    async def _first_served(
        self,
        sources: Sequence[str],
        upload_round: int,
        shard: int,
        kind: PieceKind,
        sha: str,
        size: int,
        *,
        patience_s: float | None = None,
    ) -> tuple[bytes | None, Exception | None]:
        """(the piece from the first of ``sources`` that serves it, kept here; or None and the
        last error). Lost members, ones not in ``peers`` and this one are never asked;
        ``patience_s`` bounds each source but the last (a fetch-tree parent that trickles its
        bytes is passed over)."""
        asked = [
            s
            for s in dict.fromkeys(sources)
            if s and s not in self.gone and s != self.node and s in self.peers
        ]
        last: Exception | None = None
        for i, source in enumerate(asked):
            bound = patience_s if i < len(asked) - 1 else None
            fetch = self._client.fetch(self.peers[source], upload_round, shard, kind, sha, size)
            try:
                data = await asyncio.wait_for(fetch, bound)
            except (DriftError, TimeoutError) as exc:
                last = exc
                continue
            self._keep(upload_round, shard, kind, sha, data)
            return data, None
        return None, last

    # ---- 3. fetch -------------------------------------------------------------------------

    async def fetch_result(
        self, manifest: Manifest, members: Sequence[str], seed: bytes
    ) -> list[bytes]:
        """Every result piece of ``manifest`` (signature already checked), in shard order."""
        return list(
            await asyncio.gather(
                *(self._fetch_one(manifest, members, seed, e.index) for e in manifest.shards)
            )
        )

    async def _fetch_one(
        self, manifest: Manifest, members: Sequence[str], seed: bytes, shard: int
    ) -> bytes:
        entry = manifest.shards[shard]
        upload_round = manifest.round
        held = self.store.get(upload_round, shard, RESULT, entry.result)
        if held is not None:
            return held
        seats = [s for s in (entry.primary, entry.mirror) if s]
        parent = fetch_tree(members, seats, seed, shard).get(self.node)
        # A parent that trickles its bytes must not hold a child for long: past its hold and
        # a floor of TREE_BYTES_S, the child goes to the seats.
        patience = self.wait_s + entry.size / TREE_BYTES_S + 10.0
        data, why = await self._first_served(
            [parent, *seats] if parent else seats, upload_round, shard, RESULT,
            entry.result, entry.size, patience_s=patience,
        )  # fmt: skip
        if data is None:
            raise ProtocolError(
                f"no member served shard {shard}'s result of round {upload_round}: {why}"
            )
        return data

    # ---- a joiner ------------------------------------------------------------------------

    def hold_weights(self, base_round: int, blob: bytes, count: int) -> list[tuple[str, int]]:
        """Keep the global weights of ``base_round`` (their bytes, ``blob``) as ``count``
        chunks to serve joiners (kind ``"weights"``, shard = chunk index); returns their
        table. They are never pushed: a joiner fetches them. Like every piece they leave the
        store with their round (``PieceStore.forget_before``) or when newer rounds need room."""
        chunks = weight_chunks(blob, count)
        table = [(sha256_bytes(c), len(c)) for c in chunks]
        for i, (chunk, (sha, _)) in enumerate(zip(chunks, table, strict=True)):
            self._keep(base_round, i, WEIGHTS, sha, chunk)
        return table

    async def fetch_weights(
        self,
        base_round: int,
        table: Sequence[tuple[str, int]],
        holders: Sequence[str],
        sha256: str = "",
    ) -> bytes:
        """The global weights of ``base_round``, joined from the chunks ``table`` names (the
        coordinator's :func:`chunk_table`), fetched from ``holders`` at once.

        Holders this member does not know, lost ones (``gone``) and itself are skipped; of
        the rest, chunk ``i`` is asked of holder ``i mod len(rest)`` first, so the load
        spreads, and on any failure (no answer, not held, bytes that do not hash to the
        table's sha256) of the next one, until every holder was asked once; a holder that
        cannot be reached is not dialled again in this fetch. At most
        :data:`WEIGHT_FETCHES` chunks are in flight. With ``sha256`` the joined bytes must
        hash to it. Raises ``ProtocolError`` naming the first chunk no holder served and the
        last error it got."""
        if not 1 <= len(table) <= MAX_CHUNKS:
            raise ProtocolError(f"a weights table has 1 to {MAX_CHUNKS} chunks, not {len(table)}")
        sources = [
            h
            for h in dict.fromkeys(holders)
            if h != self.node and h not in self.gone and h in self.peers
        ]
        if not sources:
            raise ProtocolError(
                f"no member to fetch round {base_round}'s weights from: every holder given "
                "is this member, lost, or not one of the session's members"
            )
        run = _WeightsFetch(self, base_round, sources)
        tasks = [
            asyncio.ensure_future(run.chunk(i, sha, size)) for i, (sha, size) in enumerate(table)
        ]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        finally:
            for t in tasks:
                t.cancel()  # one chunk no holder served ends the fetch: the rest need not come
        outcomes = await asyncio.gather(*tasks, return_exceptions=True)
        chunks = [o for o in outcomes if isinstance(o, bytes)]
        if len(chunks) < len(tasks):
            raise next((o for o in outcomes if isinstance(o, Exception)), ProtocolError(
                f"the fetch of round {base_round}'s weights was cut short"
            ))  # fmt: skip
        blob = b"".join(chunks)
        if sha256 and sha256_bytes(blob) != sha256:
            raise ProtocolError(
                f"round {base_round}'s weights joined from their chunks hash to "
                f"{sha256_bytes(blob)[:16]}…, not {sha256[:16]}…: the table does not describe "
                "these weights"
            )
        return blob

    @property
    def _client(self) -> PieceClient:
        if self.client is None:
            raise DriftError("the member's data plane is not started: call start() first")
        return self.client

    async def close(self) -> None:
        for task in list(self._pushing):
            task.cancel()
        if self.server is not None:
            await self.server.close()
        if self.client is not None:
            await self.client.close()


class _WeightsFetch:
    """One :meth:`Member.fetch_weights`: which holders answered, which cannot be reached.

    A holder that cannot be reached costs a connect timeout per try, so the first fetch from
    each holder goes alone; the chunks that would follow it wait for its outcome and pass
    over a holder found unreachable (never dialled again in this fetch)."""

    def __init__(self, member: Member, base_round: int, sources: list[str]) -> None:
        self.member = member
        self.base_round = base_round
        self.sources = sources
        self.slots = asyncio.Semaphore(WEIGHT_FETCHES)
        self.first = {s: asyncio.Lock() for s in sources}
        self.answered: set[str] = set()
        self.unreachable: dict[str, DriftError] = {}

    async def ask(self, source: str, i: int, sha: str, size: int) -> bytes:
        m = self.member
        try:
            async with self.slots:
                data = await m._client.fetch(
                    m.peers[source], self.base_round, i, WEIGHTS, sha, size
                )
        except (ConnectTimeout, PeerLost, AuthError) as exc:
            self.unreachable[source] = exc
            raise
        except DriftError:
            self.answered.add(source)  # it answered, though not with this chunk
            raise
        self.answered.add(source)
        return data

    async def chunk(self, i: int, sha: str, size: int) -> bytes:
        held = self.member.store.get(self.base_round, i, WEIGHTS, sha)
        if held is not None:
            return held
        last: DriftError | None = None
        for k in range(len(self.sources)):
            source = self.sources[(i + k) % len(self.sources)]
            try:
                if source not in self.answered:  # its first fetch goes alone (see above)
                    async with self.first[source]:
                        if source not in self.answered and source not in self.unreachable:
                            return await self.ask(source, i, sha, size)
                if source in self.unreachable:
                    last = self.unreachable[source]
                    continue
                return await self.ask(source, i, sha, size)
            except DriftError as exc:
                last = exc
                log.info(
                    "dataplane.weights_chunk_failed node=%s chunk=%d from=%s why=%s",
                    short_id(self.member.node), i, short_id(source), exc,
                )  # fmt: skip
        raise ProtocolError(
            f"no member served chunk {i} of round {self.base_round}'s weights ({size} bytes, "
            f"sha256 {sha[:16]}…) from {len(self.sources)} holders; last error: {last}"
        )


__all__ = ["CHANGE", "MAX_CHUNKS", "RESULT", "STATE", "WEIGHTS", "WEIGHT_FETCHES", "Computed"]
__all__ += ["Member", "chunk_table", "fetch_tree", "weight_chunks"]
