"""A node's part in a sharded session (``--data-plane sharded``), on its own data endpoint.

The node binds a second endpoint before it joins and names it in its ``NodeInfo``
(``data_peer``); members take and fetch pieces there (``dataplane/member.py``), and only the
session's members and its coordinator get in. What the coordinator sends unasked comes here
(:meth:`NodeDataPlane.unasked`): the member ``Directory`` (who is in the data plane, whose
seats a round uses) and each ``ShardOrder``, computed in a thread with the global weights the
node holds and the shard's standing state, and answered with a ``ShardReport``.

At a barrier (:meth:`NodeDataPlane.barrier`) the node cuts its encoded change into pieces,
pushes them to the seats and commits their hashes on the barrier stream; the answer names
the round's signed manifest, which is checked against the coordinator's key; the result
pieces are fetched down the members' tree, each checked against its hash, and joined into
exactly the change the star would have sent, which the node applies as it applies the star's
(``node/weights.py``, checked against the weights' sha256).

Every member keeps the chunks of the weights it last applied (:meth:`NodeDataPlane.received`);
a node that joins a running session is answered with their table (``WeightsChunks``) and
fetches them from several members at once, asking the coordinator for the whole weights
only when that fails.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sys
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import msgspec
import torch

from lightning_drift import protocol as p
from lightning_drift.aggregate import to_bytes
from lightning_drift.auth import decode_token
from lightning_drift.dataplane import manifest as mf
from lightning_drift.dataplane.member import MAX_CHUNKS, Member, chunk_count
from lightning_drift.dataplane.owners import assign
from lightning_drift.dataplane.plan import ShardPlan
from lightning_drift.dataplane.reduce import ShardState, outer_rule
from lightning_drift.errors import DriftError, ProtocolError
from lightning_drift.modelspec import Table, carried, table_of
from lightning_drift.node.token import reach
from lightning_drift.peers import PeerName, parse_peer
from lightning_drift.text import is_hex64, short_id
from lightning_drift.transport import Endpoint, local_bind_for, peer_key, ticket_addrs

log = logging.getLogger(__name__)

Held = Callable[[], "tuple[str, Mapping[str, torch.Tensor]] | None"]
Send = Callable[[p.ShardReport], Awaitable[None]]


class NodeDataPlane:
    """This node's data endpoint and its member (see the module docstring). ``held`` gives
    the global weights the node holds now (their sha256 and tensors); ``send`` sends on the
    control stream of the connection now open."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.peer = endpoint.ticket()
        self.node = ""  # this node's id (its control endpoint's key): what seats are named by
        self.config: p.TrainConfig | None = None
        self.coordinator = b""  # the coordinator's key: it fetches results and states here
        self.held: Held = lambda: None
        self.table: Callable[[], Table | None] = lambda: None  # the local model's, before weights
        self.send: Send | None = None
        self.member: Member | None = None
        self.directory: p.Directory | None = None
        self.seed = b""
        self._commits: dict[int, p.PieceCommit] = {}  # this node's, by round (a retry re-sends)
        self._tasks: set[asyncio.Task[Any]] = set()
        self._making = asyncio.Lock()
        self._keep_from = 0  # the oldest round whose pieces may still be asked for

    @classmethod
    async def bind(
        cls,
        token: str | None,
        peer: str | None,
        *,
        mode: str | None,
        relay_urls: tuple[str, ...],
        via: tuple[str, ...],
    ) -> NodeDataPlane:
        """The data endpoint of a node that reaches its coordinator by ``token`` or ``peer``:
        in the coordinator's mode; in local mode bound where the coordinator is reached."""
        if token is not None:
            claims, _, _ = decode_token(token)
            mode, relay_urls = reach(claims, mode, relay_urls)
            addrs = list(via) or ticket_addrs(claims.coordinator)
        else:
            mode = mode or "local"
            addrs = list(via) or ([parse_peer(peer).addr] if peer else [])
        bind_addr = local_bind_for([a for a in addrs if a]) if mode == "local" else None
        return cls(await Endpoint.bind(mode=mode, bind_addr=bind_addr, relay_urls=relay_urls))

    @property
    def bytes_moved(self) -> int:
        """Piece bytes this node's data endpoint moved so far, both ways."""
        m = self.member
        if m is None or m.client is None or m.server is None:
            return 0
        return m.client.bytes_in + m.client.bytes_out + m.server.bytes_in + m.server.bytes_out

    @property
    def sharded(self) -> bool:
        return self.config is not None and self.config.data_plane == "sharded"

    def joined(self, node: str, config: p.TrainConfig, coordinator: bytes, send: Send) -> None:
        """This node's id, the session's settings, once (re)joined, and how to reach its
        coordinator."""
        self.node, self.config, self.coordinator, self.send = node, config, coordinator, send
        if self.sharded and self.directory is not None:
            self._spawn(self.update())

    # ---- what comes unasked ----------------------------------------------------------------
    def unasked(self, msg: p.Message) -> None:
        """A ``Directory`` or ``ShardOrder`` from the coordinator (on the loop)."""
        if isinstance(msg, p.Directory):  # kept even before the settings are taken
            self.directory = msg
            if self.sharded:
                self._spawn(self.update())
        elif isinstance(msg, p.ShardOrder) and self.sharded:
            self._spawn(self._order(msg))

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        task = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def update(self) -> bool:
        """Make the member once the node holds weights (the plan is cut from their table) and
        tell it who is in the data plane; whether it runs."""
        async with self._making:
            if self.member is None:
                held, config = self.held(), self.config
                table = table_of(held[1]) if held is not None else self.table()
                if not table or config is None or not config.shards:
                    return False
                plan = ShardPlan.of(table, config.transfer_dtype, config.shards)
                member = Member(self.node, self.endpoint, plan, {})
                await member.start({})
                self.member = member
        d, m = self.directory, self.member
        if d is not None:
            self._directory(m, d)
        return True

    def _directory(self, m: Member, d: p.Directory) -> None:
        peers: dict[str, PeerName | str] = {}
        keys: dict[str, bytes] = {}
        for node, name in d.peers:
            try:
                peers[node], keys[node] = name, peer_key(parse_peer(name))
            except DriftError as exc:
                log.info("dataplane.peer_unreadable node=%s why=%s", short_id(node), exc)
        m.peers, m.gone = peers, set(d.gone)
        try:
            self.seed = bytes.fromhex(d.seed)
        except ValueError:
            self.seed = b""
        m.seats = assign(d.seated, self.seed, m.plan.count) if d.seated else []
        assert m.server is not None
        m.server.allow([*keys.values(), self.coordinator])

    async def _order(self, o: p.ShardOrder) -> None:
        """Compute the shard an order names and report it (or say nothing, when this node
        does not hold the round's base weights: the books give the shard to another)."""
        held, m, config = self.held(), self.member, self.config
        if held is None or m is None or config is None or held[0] != o.base:
            log.warning(
                "dataplane.order_skipped round=%d shard=%d (not on its base)", o.round, o.shard
            )
            return
        if not (len(o.nodes) == len(o.weights) == len(o.pieces)) or not 0 <= o.shard < m.plan.count:
            log.warning("dataplane.order_malformed round=%d shard=%d", o.round, o.shard)
            return
        try:
            state = await self._state(o)
            rule = outer_rule(config.aggregation, config.outer_lr, config.outer_momentum,
                              config.robust, config.trim, 0.0, config.outer_warmup)  # fmt: skip
            base = held[1]
            done = await m.compute(
                o.round, o.shard, list(zip(o.nodes, o.weights, o.pieces, strict=True)),
                base, carried(base), state, rule,
            )  # fmt: skip
        except (DriftError, ValueError) as exc:
            log.warning("dataplane.compute_failed round=%d shard=%d why=%s", o.round, o.shard, exc)
            return
        res = done.result
        report = p.ShardReport(
            round=o.round, shard=o.shard, result=res.sha, size=len(res.piece or b""),
            sums=[(k, _finite(v.moved2), _finite(v.ref2), v.nonfinite) for k, v in res.sums.items()],
            norms2=[(k, _finite(v)) for k, v in res.norms2.items()], bad=list(res.bad.items()), state=done.state,
            state_size=done.state_size, missing=list(done.missing), attempt=o.attempt,
        )  # fmt: skip
        if self.send is not None:
            try:
                await self.send(report)
            except DriftError as exc:
                log.info("dataplane.report_lost round=%d shard=%d why=%s", o.round, o.shard, exc)

    async def _state(self, o: p.ShardOrder) -> ShardState:
        """The shard's standing state: kept here when this node computed it, else fetched
        from the seats that did, by its hash."""
        assert self.member is not None
        if o.state_round < 0 or not o.state:
            return ShardState()
        seats = (list(o.state_from) + ["", ""])[:2]
        entry = mf.ShardEntry(
            index=o.shard, primary=seats[0], mirror=seats[1], result="", size=0, inputs="",
            state=o.state, state_size=o.state_size,
        )  # fmt: skip
        return await self.member.fetch_state(o.state_round, entry)

    # ---- a barrier --------------------------------------------------------------------------
    async def barrier(
        self, client: Any, sync: p.BarrierSync, payload: bytes
    ) -> tuple[p.BarrierReady, bytes]:
        """One barrier through ``client`` (a ``CoordinatorClient``): in a sharded round, the
        pieces pushed and committed, and the manifest's result fetched and joined."""
        if not (self.sharded and sync.delta and sync.round > 0 and await self.update()):
            ready, blob = await client.barrier(sync, payload)
            if ready.payload == "chunks":
                return await self._join(client, sync, payload, ready, blob)
            return ready, blob
        m = self.member
        assert m is not None and self.config is not None
        commit = self._commits.get(sync.round)
        if commit is None:
            c = await m.push_change(sync.round, sync.base_sha256, payload)
            commit = p.PieceCommit(round=c.round, base=c.base, pieces=c.pieces, sizes=c.sizes)
            self._commits = {sync.round: commit}
        ready, blob = await client.barrier(sync, commit)
        if ready.payload != "manifest":
            return ready, blob
        manifest = mf.verify(blob, self.coordinator, session=self.config.session_id)
        pieces = await m.fetch_result(
            manifest, self.directory.seated if self.directory else [], self.seed
        )
        change = await asyncio.to_thread(m.plan.join, pieces)
        m.store.forget_before(min(manifest.round, self._keep_from))
        self._keep_from = manifest.round
        return msgspec.structs.replace(ready, payload="delta"), change

    async def _join(
        self, client: Any, sync: p.BarrierSync, payload: bytes, ready: p.BarrierReady, blob: bytes
    ) -> tuple[p.BarrierReady, bytes]:
        """The answer to a joiner: the session's weights, fetched from the members that hold
        them (a chunk table, ``WeightsChunks``); when that fails, asked whole of the
        coordinator."""
        try:
            table = _chunks(blob)
            if not await self.update() or self.member is None:
                raise ProtocolError("this node's data plane could not start")
            weights = await self.member.fetch_weights(
                table.round, table.chunks, table.holders, table.sha256
            )
        except DriftError as exc:
            log.warning("dataplane.join_fetch_failed why=%s; asking the coordinator", exc)
            whole = msgspec.structs.replace(sync, whole=True)
            return await client.barrier(whole, payload)
        log.info(
            "dataplane.weights_fetched round=%d chunks=%d holders=%d",
            table.round, len(table.chunks), len(table.holders),
        )  # fmt: skip
        return ready, weights

    async def received(self, round_no: int) -> None:
        """The node now holds the weights of ``round_no``: keep their chunks to serve nodes
        that join (every member holds them, so a joiner fetches from several)."""
        if not self.sharded or not await self.update():
            return
        held, m = self.held(), self.member
        if held is None or m is None:
            return
        blob = await asyncio.to_thread(to_bytes, held[1])
        m.hold_weights(round_no, blob, chunk_count(len(blob)))

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self.member is not None:
            await self.member.close()
        await self.endpoint.close()


def _chunks(blob: bytes) -> p.WeightsChunks:
    """A joiner's chunk table, checked before it is used (``ProtocolError`` otherwise)."""
    msg = p.expect(p.decode(blob), p.WeightsChunks)
    assert isinstance(msg, p.WeightsChunks)
    if not (1 <= len(msg.chunks) <= MAX_CHUNKS and is_hex64(msg.sha256) and msg.round >= 0):
        raise ProtocolError(f"a weights table of {len(msg.chunks)} chunks is not one")
    if not all(is_hex64(sha) and 0 <= size <= 1 << 40 for sha, size in msg.chunks):
        raise ProtocolError("a weights table names a chunk that is not a sha256 and a size")
    return msg


def _finite(x: float) -> float:
    """A float the control frames can carry (JSON has no inf or nan): a non-finite sum is
    the largest float, which the books' check refuses as moving too far."""
    return x if math.isfinite(x) else sys.float_info.max


__all__ = ["NodeDataPlane"]
