"""The coordinator's side of a sharded session (``--data-plane sharded``): the member
directory, the books of the open round, orders out and reports in on the control streams,
and the round's result taken by hash from the members that computed it.

A node reports its data endpoint in its ``NodeInfo`` (``data_peer``); :meth:`DataPlane.join`
checks it and every member hears the new :class:`~lightning_drift.protocol.Directory`. The
seats of the shards are drawn when a round's first commit comes (:meth:`DataPlane.books`),
among the members connected then, with a new seed whenever they changed, so no node can
choose a key that wins the seat it wants; a node that joins during a round counts from the
next one.

At a barrier a node pushes its change's pieces to the seats and commits their hashes on its
barrier stream (``PieceCommit``); the upload core records the commit in the round's books
(:class:`ShardedRound`). When the session completes the round, :meth:`DataPlane.settle`
fixes the contributors, sends each seat its ``ShardOrder``, takes the ``ShardReport`` s as
they come (:meth:`DataPlane.report`), replaces computers that are lost or late, asks a
referee where seats disagree and fixes the round again without refused pieces, all within
a bound; one round in ``--audit-every`` the coordinator recomputes a secretly drawn shard
itself before it signs the manifest. :meth:`DataPlane.result` takes the result pieces from
the seats by their hashes in the manifest, and the coordinator applies the same change every
member applies and writes the same checkpoint the star writes; after the round is answered,
:meth:`DataPlane.keep_state` takes the shards' next state (DiLoCo's momentum, the residual)
and attaches it to that checkpoint. Outside an audit the coordinator carries no node's
change.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from lightning_drift import codec
from lightning_drift.auth import Identity
from lightning_drift.checkpoint import CheckpointInfo
from lightning_drift.coordinator import effects
from lightning_drift.coordinator.aggregation import SUSPECT_FACTOR, Aggregation
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.effects import Effects
from lightning_drift.coordinator.session import Session
from lightning_drift.dataplane import manifest as mf
from lightning_drift.dataplane.books import Order, Report, RoundBooks, Settled
from lightning_drift.dataplane.member import Member, chunk_count, chunk_table
from lightning_drift.dataplane.owners import assign, audit_pick, epoch_seed
from lightning_drift.dataplane.pieces import PieceClient
from lightning_drift.dataplane.plan import ShardPlan
from lightning_drift.dataplane.reduce import ShardState, TensorSums, outer_rule
from lightning_drift.errors import ConfigError, DriftError
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.modelspec import carried, table_of
from lightning_drift.peers import parse_peer
from lightning_drift.protocol import (
    Directory,
    Message,
    SessionStatus,
    ShardOrder,
    ShardReport,
    WeightsChunks,
    encode,
)
from lightning_drift.robust import suspects
from lightning_drift.text import short_id
from lightning_drift.transport import Endpoint, peer_key

log = logging.getLogger(__name__)

REPORT_S_MIN = 30.0  # the least time a seat gets to compute a shard (pieces fetched included)
ATTEMPTS_MAX = 4  # fixes of one round (a redo without refused pieces is one more)
HOLDERS_MAX = 64  # members a joiner is told to fetch the weights' chunks from
REFUSED = "aggregate refused: "  # how the books begin the reason of a refused aggregate
OuterOf = Callable[[dict[str, Any], dict[str, Any]], bytes]  # momentum, residual -> outer bytes
Attach = Callable[[int, bytes], bool]  # (round, outer bytes) into that round's checkpoint


@dataclass
class ShardedRound:
    """The open round of a sharded session, where the star keeps its accumulator: the books
    (made when the first commit comes, so that the members who joined meanwhile are seated),
    and each counted commit's weight in the order they came."""

    make: Callable[[], RoundBooks]
    base: Mapping[str, Any]  # the global weights the round starts from
    weights: dict[str, float] = field(default_factory=dict)
    _books: RoundBooks | None = None

    @property
    def books(self) -> RoundBooks:
        if self._books is None:
            self._books = self.make()
        return self._books

    @property
    def contributors(self) -> list[tuple[str, float]]:
        return list(self.weights.items())

    def add(self, node: str, commit: mf.Commit, weight: float) -> tuple[str, bool]:
        """Record ``node``'s commit with ``weight``: ("", False), or why it does not count
        and whether that is the node's fault (a member seated since the round's books were
        made is not: its change counts from the next round)."""
        books = self.books
        if node not in books.members:
            return f"it joined the data plane after round {books.round}'s seats were drawn", False
        why = books.commit(node, commit)
        if why is None:
            self.weights[node] = weight
        return why or "", why is not None


@dataclass
class Outcome:
    """How a sharded round settled: the signed ``manifest`` (None when it could not settle),
    why the weights stay as they are (``unchanged``), the contributors struck for refused
    pieces (``struck``), left out unstruck (``left_out``), the computers outvoted (``liars``)
    and the weights the round was reduced with."""

    manifest: mf.Manifest | None
    blob: bytes
    unchanged: str
    struck: dict[str, str]
    left_out: dict[str, str]
    liars: dict[str, str]
    weights: dict[str, float]
    norms: dict[str, float] = field(default_factory=dict)  # each contributor's change norm
    idle: list[str] = field(default_factory=list)  # contributors whose change is zero


class DataPlane:
    """The directory, the books and the traffic of a sharded session (see the module
    docstring). ``send(node, message)`` sends on a node's control stream (without waiting);
    ``members()`` names the nodes connected now."""

    def __init__(
        self,
        config: SessionConfig,
        session_id: str,
        identity: Identity,
        *,
        send: Callable[[str, Message], None],
        members: Callable[[], list[str]],
        clock: Callable[[], float],
    ) -> None:
        self.config = config
        self.session_id = session_id
        self.identity = identity
        self.send = send
        self.members = members
        self.clock = clock
        self.peers: dict[str, str] = {}  # node -> its data endpoint, as it reported it
        self.keys: dict[str, bytes] = {}  # node -> its data endpoint's key
        self.gone: set[str] = set()
        self.seated: list[str] = []
        self.seating = 0
        self.seed = b""
        self._reseat = False
        self.plan: ShardPlan | None = None
        # Each shard's standing state: the round it came out of and its manifest entry.
        self.standing: dict[int, tuple[int, mf.ShardEntry]] = {}
        self.report_s = max(REPORT_S_MIN, config.deadline_floor)
        self._wake = asyncio.Event()
        self._secret = secrets.token_bytes(32)  # draws the audited rounds and shards
        self._books: RoundBooks | None = None
        self._table: tuple[str, list[tuple[str, int]]] = ("", [])  # the weights' chunk table
        self._fetcher: Member | None = None
        self.bytes_in = 0  # piece bytes this coordinator fetched (results and states)
        self.endpoint: Endpoint | None = None  # the coordinator's, to fetch pieces on
        self.outer: bytes | None = None  # the outer state last attached to a checkpoint
        self._tasks: set[asyncio.Task[None]] = set()

    # ---- the directory ---------------------------------------------------------------------
    def join(self, node: str, data_peer: str) -> str | None:
        """``node`` (connected) reports its data endpoint: the reason it cannot take part,
        or None. It is seated when the next round opens; everyone hears the directory."""
        if not data_peer:
            return "it runs no data endpoint (a node of an older version?): update lightning-drift"
        try:
            key = peer_key(parse_peer(data_peer))
        except (ConfigError, DriftError) as exc:
            return f"its data endpoint {data_peer[:40]!r} cannot be read: {exc}"
        if any(k == key and n != node for n, k in self.keys.items()):
            return "its data endpoint's key is another member's"
        self.peers[node], self.keys[node] = data_peer, key
        self.gone.discard(node)
        if node not in self.seated:
            self._reseat = True
            if self._books is None:  # no round is being counted: seat it now
                self._seat()
        self.broadcast()
        return None

    def left(self, node: str) -> None:
        """``node``'s connection ended: its seats go to the next members of their rankings."""
        if node not in self.peers or node in self.gone:
            return
        self.gone.add(node)
        if self._books is not None:
            self._orders(self._books.lost(node, self.clock()))
            self._wake.set()
        self.broadcast()

    def directory(self) -> Directory:
        return Directory(
            seating=self.seating,
            seed=self.seed.hex(),
            seated=list(self.seated),
            peers=sorted(self.peers.items()),
            gone=sorted(self.gone),
        )

    def show(self, st: SessionStatus) -> None:
        """The data plane in the session's status: who holds how many seats, bytes."""
        st.data_plane, st.shards, st.coordinator_bytes = (
            "sharded",
            self.config.shards,
            self.bytes_in,
        )
        seats: dict[str, int] = {}
        if self.plan is not None and self.seed:
            for o in assign(self.seated, self.seed, self.plan.count):
                for seat in (o.primary, o.mirror):
                    if seat:
                        seats[seat] = seats.get(seat, 0) + 1
        for ns in st.nodes:
            ns.seats = seats.get(ns.node_id, 0) if ns.node_id not in self.gone else 0

    def chunks_for(self, round_no: int, sha: str, blob: bytes, node: str) -> bytes:
        """A ``WeightsChunks`` blob that lets ``node`` fetch the weights of ``round_no`` from
        the members that hold them (every member keeps the chunks of the weights it applied),
        or b"" when it has no other member to ask."""
        holders = [
            n for n in self.members() if n in self.peers and n != node and n not in self.gone
        ]
        if not holders or round_no < 1:  # round 0's weights are one node's: nobody holds them
            return b""
        if self._table[0] != sha:
            self._table = (sha, chunk_table(blob, chunk_count(len(blob))))
        msg = WeightsChunks(
            round=round_no, sha256=sha, chunks=self._table[1], holders=holders[:HOLDERS_MAX]
        )
        return encode(msg)

    def broadcast(self) -> None:
        msg = self.directory()
        for node in self.members():
            if node in self.peers:
                self.send(node, msg)

    # ---- a round ---------------------------------------------------------------------------
    def open(self, round_no: int, base: str, global_sd: Mapping[str, Any]) -> ShardedRound:
        """Round ``round_no`` (from the weights ``base``), whose books are made by
        :meth:`books` when its first commit comes."""
        return ShardedRound(lambda: self.books(round_no, base, global_sd), global_sd)

    def books(self, round_no: int, base: str, global_sd: Mapping[str, Any]) -> RoundBooks:
        """The books of round ``round_no``: seated anew when a member joined or the seats'
        members are all gone."""
        if self.plan is None:
            self.plan = ShardPlan.of(
                table_of(global_sd), self.config.transfer_dtype, self.config.shards
            )
        if self._reseat or not [n for n in self.seated if n not in self.gone]:
            self._seat()
            self.broadcast()
        books = RoundBooks(
            session=self.session_id, round_no=round_no, epoch=self.seating, base=base,
            plan=self.plan, members=[n for n in self.seated if n not in self.gone],
            seed=self.seed, report_s=self.report_s, fixed=carried(global_sd),
        )  # fmt: skip
        for n in self.gone:
            books.lost(n, self.clock())
        self._books = books
        return books

    def _seat(self) -> None:
        """A new seating: the connected members, and a seed no member can foresee."""
        live = set(self.members())
        self.seated = sorted(n for n in self.peers if n in live and n not in self.gone)
        self.seating += 1
        self.seed = epoch_seed(self.session_id, self.seating, secrets.token_bytes(16))
        self._reseat = False

    def report(self, node: str, msg: ShardReport) -> None:
        """A computer's report (from its control stream), into the open round's books."""
        books = self._books
        if books is None or msg.round != books.round:
            log.info("shard.report_ignored node=%s round=%d", short_id(node), msg.round)
            return
        report = Report(
            msg.shard, msg.result, msg.size,
            sums={name: TensorSums(m2, r2, bad) for name, m2, r2, bad in msg.sums},
            norms2=dict(msg.norms2), bad=dict(msg.bad), state=msg.state,
            state_size=msg.state_size, missing=tuple(msg.missing), attempt=msg.attempt,
        )  # fmt: skip
        why = books.report(node, report)
        if why is not None:
            log.warning("shard.report_refused node=%s why=%s", short_id(node), why)
            return
        self._wake.set()

    def _orders(self, orders: list[Order]) -> None:
        books = self._books
        assert books is not None
        for o in orders:
            red = books.reduction(o.shard)
            state_round, entry = self.standing.get(o.shard, (-1, None))
            if entry is not None and {entry.primary, entry.mirror} - {""} <= self.gone:
                # Both seats that hold the shard's state are gone: it starts again from zero
                # (every computer of the shard is told the same, so they still agree).
                log.warning("shard.state_lost shard=%d round=%d", o.shard, state_round)
                state_round, entry = -1, None
            self.send(
                o.node,
                ShardOrder(
                    round=books.round, shard=o.shard, nodes=[x[0] for x in red],
                    weights=[x[1] for x in red], pieces=[x[2] for x in red],
                    deadline_s=self.report_s, attempt=o.attempt, base=books.base,
                    state_round=state_round if entry is not None else -1,
                    state=entry.state if entry is not None else "",
                    state_size=entry.state_size if entry is not None else 0,
                    state_from=[entry.primary, entry.mirror] if entry is not None else [],
                ),
            )  # fmt: skip

    async def settle(self, shr: ShardedRound, weights: dict[str, float]) -> Outcome:
        """Fix the round's contributors (``weights``), order the seats, take the reports until
        the round settles (or its bound passes), and sign the manifest. A contributor whose
        change the reports show to be exactly zero is weighed 0 and the round fixed again,
        as the star weighs an unchanged upload."""
        books = shr.books
        out = Outcome(None, b"", "", {}, {}, {}, dict(weights))
        self._orders(books.fix(out.weights, self.clock()))
        bound = self.clock() + ATTEMPTS_MAX * 2 * self.report_s
        settled: Settled | None = None
        while True:
            self._wake.clear()
            settled, more = books.settle(self.clock(), self.config.max_change)
            self._orders(more)
            if settled is not None and self._again(books, settled, out):
                if books.attempt >= ATTEMPTS_MAX:
                    settled = None
                    break
                self._orders(books.fix(out.weights, self.clock()))
                continue
            if settled is not None or self.clock() > bound:
                break
            try:
                await asyncio.wait_for(self._wake.wait(), 1.0)
            except asyncio.TimeoutError:
                self._orders(books.overdue(self.clock()))
        self._books = None
        shr.weights = out.weights
        if settled is None or settled.manifest is None:
            out.unchanged = "its shards were not settled in time"
            return out
        out.manifest, out.liars = settled.manifest, settled.liars
        out.unchanged = settled.manifest.unchanged
        if not out.unchanged and self._audit_due(books.round):
            await self._audit(books, shr.base, out)
        if not out.unchanged:
            out.blob = await asyncio.to_thread(mf.sign, settled.manifest, self.identity)
        return out

    def _audit_due(self, round_no: int) -> bool:
        every = self.config.audit_every
        return every > 0 and audit_pick(self._secret + b"/rounds", round_no, every) == 0

    async def _audit(self, books: RoundBooks, base: Mapping[str, Any], out: Outcome) -> None:
        """Recompute one shard, drawn from this coordinator's secret, from its pieces and the
        state it started from (fetched by hash like any member's), against the standing
        result: a contradicted result is not published and both its seats are struck."""
        assert self.plan is not None and self.endpoint is not None
        j = audit_pick(self._secret, books.round, self.plan.count)
        fetcher = self._fetcher_on(self.endpoint)
        fetcher.gone = set(self.gone)
        c = self.config
        rule = outer_rule(
            c.aggregation, c.outer_lr, c.outer_momentum, c.robust, c.trim, 0.0, c.outer_warmup
        )
        try:
            state = ShardState()
            if j in self.standing:
                state = await fetcher.fetch_state(*self.standing[j])
            done = await fetcher.compute(
                books.round, j, books.reduction(j), base, carried(base), state, rule
            )
        except DriftError as exc:
            log.warning("shard.audit_failed round=%d shard=%d why=%s", books.round, j, exc)
            return
        finally:
            fetcher.store.forget_before(books.round + 1)
        caught = books.audit(j, done.report())
        log.info("shard.audited round=%d shard=%d caught=%d", books.round, j, len(caught))
        if caught:  # the outvoted (if any) agreed with the recomputation: not liars
            out.liars = dict(caught)
            out.unchanged = f"shard {j}'s result failed the coordinator's recomputation"

    @staticmethod
    def _again(books: RoundBooks, settled: Settled, out: Outcome) -> bool:
        """Whether the round must be fixed again: pieces were refused (their contributors
        are struck) or could not be obtained (left out), or a contributor's change is zero."""
        out.struck.update(settled.redo)
        out.left_out.update(settled.missing)
        dropped = settled.redo.keys() | settled.missing.keys()
        if dropped:
            out.weights = {n: w for n, w in out.weights.items() if n not in dropped}
            return True
        if settled.manifest is None or settled.manifest.unchanged:
            return False
        out.norms = books.norms()
        idle = [n for n, w in out.weights.items() if w > 0 and out.norms.get(n, 0.0) <= 0.0]
        for n in idle:
            out.weights[n] = 0.0
            out.idle.append(n)
        return bool(idle)

    # ---- the result ------------------------------------------------------------------------
    async def result(self, m: mf.Manifest) -> bytes:
        """The round's download change, joined from the result pieces the seats serve, each
        checked against its hash in ``m``: what every member applies."""
        assert self.plan is not None
        assert self.endpoint is not None, "the coordinator's endpoint is bound first"
        fetcher = self._fetcher_on(self.endpoint)
        fetcher.gone = set(self.gone)
        before = fetcher.client.bytes_in if fetcher.client is not None else 0
        pieces = await fetcher.fetch_result(m, [], self.seed)
        if fetcher.client is not None:
            self.bytes_in += fetcher.client.bytes_in - before
        for e in m.shards:
            self.standing[e.index] = (m.round, e)
        return await asyncio.to_thread(self.plan.join, pieces)

    def keep_state(self, m: mf.Manifest, outer_of: OuterOf, attach: Attach) -> None:
        """Off the round's path: take each shard's next state (DiLoCo's momentum, the
        residual) from its seats by its hash in ``m``, and attach it to the round's
        checkpoint (``attach``), so that the checkpoint holds the outer state the star's
        holds. What cannot be taken is logged; the seats still carry it."""

        async def take() -> None:
            assert self.plan is not None and self.endpoint is not None
            fetcher = self._fetcher_on(self.endpoint)
            before = fetcher.client.bytes_in if fetcher.client is not None else 0
            try:
                states = await asyncio.gather(*(fetcher.fetch_state(m.round, e) for e in m.shards))
                momentum, residual = await asyncio.to_thread(_merged, self.plan, states)
                self.outer = await asyncio.to_thread(outer_of, momentum, residual)
                await asyncio.to_thread(attach, m.round, self.outer)
            except DriftError as exc:
                log.warning("shard.state_not_kept round=%d why=%s", m.round, exc)
            finally:
                fetcher.store.forget_before(m.round + 1)
                if fetcher.client is not None:
                    self.bytes_in += fetcher.client.bytes_in - before

        task = asyncio.create_task(take())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _fetcher_on(self, endpoint: Endpoint) -> Member:
        assert self.plan is not None
        if self._fetcher is None:
            self._fetcher = Member(self.identity.public_hex, endpoint, self.plan, {})
            self._fetcher.client = PieceClient(endpoint)
        self._fetcher.peers = dict(self.peers)
        return self._fetcher

    async def close(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        if self._fetcher is not None:
            await self._fetcher.close()


async def sharded_round(
    dp: DataPlane,
    aggregation: Aggregation,
    session: Session,
    aggregating: int,
    shr: ShardedRound,
    global_sd: dict[str, Any],
    clock: Callable[[], float],
) -> tuple[tuple[Any, bytes, CheckpointInfo, Any, Any, bytes], Effects]:
    """Steps 2 to 5 of a sharded round for ``rounds.py``: settled by the members, the result
    taken from them and applied, the checkpoint written as the star writes it. Returns what
    ``Aggregation.run`` returns plus the signed manifest, and the strikes and events."""
    out = await dp.settle(shr, dict(shr.weights))
    fx = _judged(session, aggregating, out, clock())
    extra = {"session": session.session_id, "aggregation": session.config.aggregation,
             "data_plane": "sharded"}  # fmt: skip
    refused: tuple[str, list[str]] | None = None
    delta: tuple[bytes, str] | None = None
    new_sd = global_sd
    if not out.unchanged and out.manifest is not None:
        try:
            change = await dp.result(out.manifest)
        except DriftError as exc:
            out.unchanged = f"its result could not be taken from the seats: {exc}"
        else:
            new_sd = await asyncio.to_thread(
                codec.apply, global_sd, codec.decode(change, global_sd)
            )
            delta = (change, sha256_bytes(change))
    if out.unchanged:
        extra["unchanged"] = out.unchanged
        if out.unchanged.startswith(REFUSED):
            blamed = suspects(out.norms, SUSPECT_FACTOR)
            refused = (out.unchanged[len(REFUSED) :], blamed)
            extra["suspects"] = ",".join(blamed)
    contributors = [(n, w) for n, w in out.weights.items()]
    # A changed round's outer state comes from the seats after the round is answered
    # (keep_state); an unchanged one carries the last state on.
    outer = dp.outer if delta is None else None
    blob, info = await asyncio.to_thread(
        aggregation.write, aggregating, session.epoch, new_sd, contributors, extra, outer
    )
    if delta is not None and out.manifest is not None:
        dp.keep_state(out.manifest, aggregation.outer_of, aggregation.store.attach_outer)
    manifest = out.blob if delta is not None else b""
    return (new_sd, blob, info, refused, delta, manifest), fx


def _judged(session: Session, aggregating: int, out: Outcome, now: float) -> Effects:
    """What a settled round says of its nodes: strikes for refused pieces and outvoted
    results, events for the left out, a strike for a change of zero; and the evidence of
    training the contributors' norms give (``evidence.py``)."""
    fx = Effects()
    for node, why in {**out.struck, **out.liars}.items():
        fx.events.append(f"node {short_id(node)} struck in round {aggregating}: {why}")
        fx.add(effects.strike(session, node, f"round {aggregating}: {why}", now))
    for node, why in out.left_out.items():
        fx.events.append(f"node {short_id(node)} left out of round {aggregating}: {why}")
    for node in out.idle:
        reason = (
            f"node {short_id(node)} upload for round {aggregating} shows no training: its "
            "change is zero; weighed 0"
        )
        fx.events.append(reason)
        fx.add(effects.strike(session, node, reason, now))
    for node, w in out.weights.items():
        norm = out.norms.get(node, 0.0)
        session.evidence.counted(node, norm, w, evidence=not session.evidence.judge(norm, w))
    return fx


def _merged(plan: ShardPlan, states: list[ShardState]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The shards' states as whole tensors: DiLoCo's momentum and the download residual."""
    return plan.merge([s.momentum for s in states]), plan.merge([s.residual for s in states])


__all__ = ["DataPlane", "Outcome", "ShardedRound", "sharded_round"]
