"""Sharded rounds in one process: every member on its own iroh endpoint (loopback), pieces
moving between them for real, the coordinator's books and signature in process.

What is real: the plan, the pieces and their transfer (``dataplane/pieces.py``), each
member's push, computation and fetch down the tree (``dataplane/member.py``), the books
(``dataplane/books.py``), the signed manifest, and a reference star (the coordinator's own
``Aggregation``) fed the same uploads in the same order, whose weights every round's result
is compared with byte for byte; a computer new to a shard fetches the shard's state (DiLoCo's
momentum, the residual) by its hash in the last manifest from that round's seats. What is
not: the control messages (commits, orders, reports and the manifest are handed over in
process, not sent over a control stream).

``benchmarks/scale.py`` measures with it; ``tests/test_dataplane_member.py`` tests with it.
"""

from __future__ import annotations

import asyncio
import hashlib
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lightning_drift import codec
from lightning_drift.aggregate import to_bytes
from lightning_drift.auth import Identity
from lightning_drift.checkpoint import CheckpointStore
from lightning_drift.coordinator.aggregation import Aggregation
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.dataplane import manifest as mf
from lightning_drift.dataplane.books import Order, Report, RoundBooks
from lightning_drift.dataplane.member import Computed, Member
from lightning_drift.dataplane.owners import assign, epoch_seed
from lightning_drift.dataplane.plan import ShardPlan
from lightning_drift.dataplane.reduce import OuterRule, ShardResult, ShardState, outer_rule
from lightning_drift.errors import ProtocolError
from lightning_drift.modelspec import carried, table_of
from lightning_drift.transport import Endpoint

StateDict = dict[str, torch.Tensor]
Lie = Callable[[ShardResult], ShardResult]


@dataclass
class RoundFigures:
    """One round as the members saw it (payload bytes, from the piece counters)."""

    encoded: int  # bytes of one encoded change
    pushed: dict[str, int]  # bytes each member pushed as a contributor
    fetched: dict[str, int]  # bytes each member fetched as a receiver of the result
    sent: dict[str, int]  # every byte each member sent (pushes and serving)
    received: dict[str, int]  # every byte each member received (pieces taken and fetched)
    equal: bool  # the round's weights are the star's, byte for byte
    seconds: float
    struck: list[str] = field(default_factory=list)
    unchanged: str = ""
    weights_sha: str = ""
    restarted: list[int] = field(default_factory=list)  # shards whose state no seat served
    left_out: list[str] = field(default_factory=list)  # contributors whose pieces were lost or bad
    audited: dict[str, str] = field(default_factory=dict)  # seats the coordinator's audit caught


class Simulation:
    """``n`` members and the coordinator's books (see the module docstring)."""

    def __init__(
        self,
        global_sd: StateDict,
        *,
        shards: int,
        codec_name: str = "int8",
        aggregation: str = "diloco",
        robust: str = "off",
        session: str = "bench",
    ) -> None:
        self.global_sd = global_sd
        self.plan = ShardPlan(table_of(global_sd), codec_name, shards)
        self.codec = codec_name
        config = SessionConfig(
            dataset_size=100, transfer_dtype=codec_name, aggregation=aggregation, robust=robust
        )
        self.config = config
        self.rule: OuterRule = outer_rule(
            aggregation, config.outer_lr, config.outer_momentum, robust, config.trim, 0.0
        )
        self._tmp = tempfile.TemporaryDirectory()
        self.star = Aggregation(config, CheckpointStore(Path(self._tmp.name)), clock=time.time)
        self.identity = Identity.generate()
        self.session = session
        self.seed = epoch_seed(session, 0, b"nonce")
        self.members: dict[str, Member] = {}
        self.states: dict[tuple[str, int], ShardState] = {}  # what each computer carries
        self.last: mf.Manifest | None = None  # the last round's manifest that changed weights
        self.residuals: dict[str, codec.Residual] = {}
        self.killed: set[str] = set()
        self.restarted: list[int] = []

    async def open(self, n: int) -> None:
        endpoints = [await Endpoint.bind() for _ in range(n)]
        own = await Endpoint.bind()  # the coordinator's, for its audits: never a seat
        keys = {ep.key_hex: ep.key for ep in endpoints}
        peers: dict[str, Any] = {
            ep.key_hex: f"{ep.key_hex}@{ep.addrs()[0]}" for ep in [*endpoints, own]
        }
        seats = assign(list(keys), self.seed, self.plan.count)
        for ep in endpoints:
            # Every push lands before the books are fixed, as the bytes counted assume (a
            # session's commit waits for its pushes at most Member.push_wait_s).
            m = Member(ep.key_hex, ep, self.plan, peers, seats=seats, push_wait_s=600.0)
            others = {k: v for k, v in keys.items() if k != ep.key_hex}
            await m.start({**others, own.key_hex: own.key})
            self.members[ep.key_hex] = m
            self.residuals[ep.key_hex] = codec.Residual()
        self.auditor = Member(own.key_hex, own, self.plan, peers, seats=seats)
        await self.auditor.start(keys)

    @property
    def live(self) -> list[str]:
        return sorted(n for n in self.members if n not in self.killed)

    def change_of(self, node: str, local: StateDict) -> bytes:
        """A member's encoded change from the global weights, with its own error feedback."""
        diff = codec.difference(local, self.global_sd)
        return codec.encode(diff, self.codec, self.residuals[node]).payload

    async def kill(self, node: str) -> None:
        """A member dies: its endpoint closes (its pieces and seats are gone)."""
        self.killed.add(node)
        for m in self.members.values():
            m.gone.add(node)
        await self.members[node].close()
        await self.members[node].endpoint.close()

    async def round(
        self,
        upload_round: int,
        payloads: dict[str, bytes],
        weights: dict[str, float],
        *,
        lies: dict[tuple[str, int], Lie] | None = None,
        kill_before_compute: Sequence[str] = (),
        audit: int | None = None,
    ) -> RoundFigures:
        t0 = time.perf_counter()
        self.restarted = []
        before = {n: _counters(m) for n, m in self.members.items()}
        base_sha = hashlib.sha256(to_bytes(self.global_sd)).hexdigest()
        fixed = carried(self.global_sd)
        books = RoundBooks(
            session=self.session, round_no=upload_round, epoch=0, base=base_sha, plan=self.plan,
            members=self.live, seed=self.seed, report_s=120.0, fixed=fixed,
        )  # fmt: skip
        commits = await asyncio.gather(
            *(self.members[n].push_change(upload_round, base_sha, payloads[n]) for n in payloads)
        )
        for n, c in zip(payloads, commits, strict=True):
            why = books.commit(n, c)
            assert why is None, why
        orders = books.fix(weights, now=0.0)
        for gone in kill_before_compute:
            await self.kill(gone)
            orders = [o for o in orders if o.node != gone]
            orders += books.lost(gone, now=0.0)
        orders = [o for o in orders if o.node not in self.killed]
        settled = None
        results: dict[tuple[str, int], Computed] = {}
        left_out: dict[str, str] = {}
        for _ in range(len(self.members) + 2):
            got = await asyncio.gather(
                *(self._compute(o, books, upload_round, lies or {}) for o in orders)
            )
            for o, done in zip(orders, got, strict=True):
                results[(o.node, o.shard)] = done
                assert books.report(o.node, report_of(done, o.attempt)) is None
            settled, orders = books.settle(0.0, self.config.max_change)
            if settled is not None and (settled.redo or settled.missing):
                # Pieces nobody could serve or read: the round again without their nodes.
                left_out.update(settled.redo)
                left_out.update(settled.missing)
                kept = {n: w for n, w in weights.items() if n not in left_out}
                orders = [o for o in books.fix(kept, now=0.0) if o.node not in self.killed]
                settled = None
                continue
            if settled is not None:
                break
            if not orders:
                raise AssertionError("the books wait, but asked nobody")
        assert settled is not None
        manifest = settled.manifest
        assert manifest is not None
        audited: dict[str, str] = {}
        if audit is not None and not manifest.unchanged:
            audited = await self._audit(books, upload_round, audit)
        blob = mf.sign(manifest, self.identity)
        # The reference star, fed the same uploads in the books' order.
        acc = self.star.new_accumulator(self.global_sd)
        for c_node, c_weight, _ in books.reduction(0) if self.plan.count else []:
            acc.add(c_node, codec.decode(payloads[c_node], self.global_sd), c_weight, delta=True)
        star_sd, star_blob, _info, refused, _delta = self.star.run(
            self.session, upload_round, 0, acc, self.global_sd
        )
        equal = True
        new_sd = self.global_sd
        if not manifest.unchanged:
            # A computer keeps a shard's state only when its result stood; any other fetches
            # the standing state by hash when it next computes the shard.
            standing = {(s, e.index) for e in manifest.shards for s in (e.primary, e.mirror)}
            for key in list(self.states):
                done = results.get(key)
                if key in standing and done is not None:
                    self.states[key] = done.result.state
                else:
                    del self.states[key]
            self.last = manifest
            fetched = await asyncio.gather(*(self._fetch(n, blob) for n in self.live))
            first = fetched[0]
            equal = all(f == first for f in fetched)
            change = self.plan.assemble([self.plan.read(j, p) for j, p in enumerate(first)])
            new_sd = codec.apply(self.global_sd, change)
        equal = equal and refused is None and to_bytes(new_sd) == star_blob
        self.global_sd = star_sd if equal else new_sd
        keep = self.last.round if self.last is not None else upload_round  # its states
        for m in self.members.values():
            m.store.forget_before(min(upload_round, keep))
        after = {n: _counters(m) for n, m in self.members.items()}
        d = {n: tuple(a - b for a, b in zip(after[n], before[n], strict=True)) for n in after}
        return RoundFigures(
            encoded=len(next(iter(payloads.values()))),
            pushed={n: v[0] for n, v in d.items()},
            fetched={n: v[1] for n, v in d.items()},
            sent={n: v[0] + v[2] for n, v in d.items()},
            received={n: v[1] + v[3] for n, v in d.items()},
            equal=equal,
            seconds=time.perf_counter() - t0,
            struck=manifest.struck,
            unchanged=manifest.unchanged,
            weights_sha=hashlib.sha256(to_bytes(new_sd)).hexdigest(),
            restarted=sorted(set(self.restarted)),
            left_out=sorted(left_out),
            audited=audited,
        )

    async def _compute(
        self, o: Order, books: RoundBooks, upload_round: int, lies: dict[tuple[str, int], Lie]
    ) -> Computed:
        member = self.members[o.node]
        state = self.states.get((o.node, o.shard))
        if state is None:  # new to the shard: the last standing state, fetched by its hash
            state = ShardState()
            if self.last is not None:
                try:
                    state = await member.fetch_state(self.last.round, self.last.shards[o.shard])
                except ProtocolError:  # both seats lost: the shard's outer state restarts
                    self.restarted.append(o.shard)
            self.states[(o.node, o.shard)] = state
        done = await member.compute(
            upload_round, o.shard, books.reduction(o.shard), self.global_sd,
            carried(self.global_sd), state, self.rule,
        )  # fmt: skip
        lie = lies.get((o.node, o.shard))
        if lie is not None:
            res = lie(done.result)
            if res.piece is not None:  # it serves what it claims
                member.store.put(upload_round, o.shard, "result", res.sha, res.piece)
            done = Computed(res, done.state, done.state_size)
        return done

    async def _audit(self, books: RoundBooks, upload_round: int, shard: int) -> dict[str, str]:
        """The coordinator recomputes ``shard`` itself (pieces and the state it started from
        fetched by hash, as any member would) and checks the standing result against it."""
        self.auditor.gone = set(self.killed)
        state = ShardState()
        if self.last is not None:
            state = await self.auditor.fetch_state(self.last.round, self.last.shards[shard])
        done = await self.auditor.compute(
            upload_round, shard, books.reduction(shard), self.global_sd,
            carried(self.global_sd), state, self.rule,
        )  # fmt: skip
        return books.audit(shard, report_of(done))

    async def _fetch(self, node: str, blob: bytes) -> list[bytes]:
        m = mf.verify(blob, self.identity.public_key, session=self.session)
        return await self.members[node].fetch_result(m, self.live, self.seed)

    async def close(self) -> None:
        await self.auditor.close()
        await self.auditor.endpoint.close()
        for n, m in self.members.items():
            if n not in self.killed:
                await m.close()
                await m.endpoint.close()
        self._tmp.cleanup()


def report_of(done: Computed, attempt: int = 0) -> Report:
    """What a computer reports of a shard it computed (the books' side of ``ShardReport``)."""
    return done.report(attempt)


def flip_one_value(res: ShardResult) -> ShardResult:
    """A computer that flips one value of its result (and reports the hash of what it
    serves): the kind of lie a mirror might tell."""
    if res.piece is None or not res.piece:
        return res
    piece = bytearray(res.piece)
    piece[0] ^= 0x40  # a large step of the first value: no rounding of any dtype hides it
    data = bytes(piece)
    return ShardResult(
        res.index, data, hashlib.sha256(data).hexdigest(), res.sums, res.norms2,
        res.total_weight, res.state, res.bad,
    )  # fmt: skip


def _counters(m: Member) -> tuple[int, int, int, int]:
    """(pushed, fetched, served, taken) payload bytes so far."""
    assert m.client is not None and m.server is not None
    return (m.client.bytes_out, m.client.bytes_in, m.server.bytes_out, m.server.bytes_in)
