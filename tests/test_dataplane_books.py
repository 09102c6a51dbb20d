"""The coordinator's books of a sharded round: commits, orders, reports, and who stands."""

from __future__ import annotations

import dataclasses
import hashlib

import msgspec
import pytest
from dataplane_cases import NODES, WEIGHTS, local, model

from lightning_drift import codec, protocol
from lightning_drift.auth import Identity
from lightning_drift.dataplane import manifest as mf
from lightning_drift.dataplane.books import Order, Report, RoundBooks
from lightning_drift.dataplane.plan import ShardPlan
from lightning_drift.dataplane.reduce import OuterRule, Piece, ShardState, TensorSums, reduce_shard
from lightning_drift.modelspec import carried, table_of

MEMBERS = [*NODES, "e" * 64, "f" * 64]  # four contributors, two more members
BASE = "0" * 64


class Round:
    """A real round's pieces and honest reports, and books to feed them to."""

    def __init__(self, count: int = 4, members: list[str] = MEMBERS) -> None:
        self.sd = model()
        self.plan = ShardPlan(table_of(self.sd), "int8", count)
        self.fixed = carried(self.sd)
        self.cut = {}
        for i, n in enumerate(NODES):
            change = codec.difference(local(self.sd, i, 1), self.sd)
            self.cut[n] = self.plan.pieces(codec.encode(change, "int8").payload)
        self.books = RoundBooks(
            session="s1", round_no=3, epoch=0, base=BASE, plan=self.plan, members=members,
            seed=b"seed", report_s=10.0, fixed=self.fixed,
        )  # fmt: skip

    def commit_all(self) -> None:
        for n in NODES:
            commit = mf.Commit(
                round=3, base=BASE, pieces=[mf.piece_hash(p) for p in self.cut[n]],
                sizes=[len(p) for p in self.cut[n]],
            )  # fmt: skip
            assert self.books.commit(n, commit) is None

    def honest(self, shard: int, without: frozenset[str] = frozenset()) -> Report:
        order = [(n, w) for n, w, _ in self.books.reduction(shard) if n not in without]
        r = reduce_shard(
            self.plan, shard, self.sd, self.fixed,
            [Piece(n, w, self.cut[n][shard]) for n, w in order], ShardState(), OuterRule(),
        )  # fmt: skip
        return Report(
            shard, r.sha, len(r.piece or b""), r.sums, r.norms2, r.bad, attempt=self.books.attempt
        )

    def answer(
        self, orders: list[Order], lie: dict[str, str] | None = None, shard: int = -1
    ) -> None:
        """Honest reports, but a node in ``lie`` reports that hash (on ``shard``, or on all)."""
        for o in orders:
            rep = self.honest(o.shard)
            if lie and o.node in lie and shard in (-1, o.shard):
                rep = dataclasses.replace(rep, result=lie[o.node])
            assert self.books.report(o.node, rep) is None


def test_honest_computers_settle_on_the_stars_download_and_a_signed_manifest() -> None:
    r = Round()
    r.commit_all()
    weights = dict(zip(NODES, WEIGHTS, strict=True))
    orders = r.books.fix(weights, now=0.0)
    assert sorted(o.shard for o in orders) == [0, 0, 1, 1, 2, 2, 3, 3]  # two seats each
    assert all(len({o.node for o in orders if o.shard == j}) == 2 for j in range(4)) and all(
        o.deadline == 10.0 for o in orders
    )
    assert [c.node for c in r.books.contributors] == sorted(NODES)  # the fixed order
    assert r.books.settle(1.0, 0.0) == (None, [])  # nobody reported yet
    r.answer(orders)
    settled, more = r.books.settle(2.0, 0.0)
    assert more == [] and settled is not None and settled.manifest is not None
    m = settled.manifest
    assert m.unchanged == "" and not settled.liars and not settled.alone
    assert [s.result for s in m.shards] == [r.honest(j).result for j in range(4)]
    assert all(
        {s.primary, s.mirror} == {o.node for o in orders if o.shard == s.index} for s in m.shards
    )
    assert m.contributors == len(NODES) and m.weight == sum(WEIGHTS)
    assert [s.inputs for s in m.shards] == [
        mf.inputs_digest(r.books.reduction(j)) for j in range(4)
    ]
    # Anyone holding the pieces names the same inputs: the nodes by id, the pieces' sha256.
    by_id = sorted(zip(NODES, WEIGHTS, strict=True))
    for j, s in enumerate(m.shards):
        assert s.inputs == mf.inputs_digest([(n, w, mf.piece_hash(r.cut[n][j])) for n, w in by_id])
    me = Identity.generate()
    assert mf.verify(mf.sign(m, me), me.public_key, session="s1", open_round=3) == m
    assert set(r.books.norms()) == set(NODES)


def test_an_outvoted_computer_is_named_a_liar() -> None:
    r = Round()
    r.commit_all()
    orders = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    liar = next(o for o in orders if o.shard == 2).node
    r.answer(orders, lie={liar: hashlib.sha256(b"x").hexdigest()}, shard=2)
    settled, referee = r.books.settle(1.0, 0.0)
    assert settled is None and len(referee) == 1 and referee[0].shard == 2
    assert referee[0].node not in {o.node for o in orders if o.shard == 2}
    r.answer(referee)
    settled, _ = r.books.settle(2.0, 0.0)
    assert settled is not None and settled.manifest is not None
    assert settled.liars == {liar: "its result for shard 2 of round 3 was outvoted"}
    assert settled.manifest.struck == [liar]
    assert liar not in (settled.manifest.shards[2].primary, settled.manifest.shards[2].mirror)
    assert settled.manifest.shards[2].result == r.honest(2).result


def test_answers_that_never_agree_leave_the_weights_unchanged() -> None:
    r = Round()
    r.commit_all()
    orders = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    lies = {n: hashlib.sha256(n.encode()).hexdigest() for n in MEMBERS}
    r.answer(orders, lie={o.node: lies[o.node] for o in orders if o.shard == 1})
    for _ in range(len(MEMBERS)):
        settled, more = r.books.settle(1.0, 0.0)
        if settled is not None:
            break
        r.answer(more, lie=lies)
    assert settled is not None and settled.manifest is not None
    assert "could not be settled" in settled.manifest.unchanged
    assert settled.manifest.shards == [] and settled.liars == {}
    assert settled.manifest.contributors == 0 and settled.manifest.weight == 0.0
    mf.check(settled.manifest)  # an unchanged round's manifest is still a valid one


def test_a_lost_or_late_computer_is_replaced_and_a_last_one_may_stand_alone() -> None:
    r = Round()
    r.commit_all()
    orders = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    gone = orders[0].node
    replaced = r.books.lost(gone, now=1.0)
    assert replaced and all(o.node != gone for o in replaced)
    assert {o.shard for o in replaced} == {o.shard for o in orders if o.node == gone}
    r.answer([o for o in orders if o.node != gone] + replaced)
    settled, _ = r.books.settle(2.0, 0.0)
    assert settled is not None and settled.manifest is not None and settled.manifest.unchanged == ""
    # Overdue: past the deadline, a silent computer is replaced, not struck.
    r2 = Round()
    r2.commit_all()
    orders = r2.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    assert r2.books.overdue(5.0) == []
    late = r2.books.overdue(10.5)
    assert len(late) == len(orders)  # every seat was silent
    # Two members only, one lost: the other's word stands alone.
    r3 = Round(count=2, members=NODES[:2])
    for n in NODES[:2]:
        c = mf.Commit(
            round=3,
            base=BASE,
            pieces=[mf.piece_hash(p) for p in r3.cut[n]],
            sizes=[len(p) for p in r3.cut[n]],
        )
        assert r3.books.commit(n, c) is None
    orders = r3.books.fix({NODES[0]: 1.0, NODES[1]: 2.0}, now=0.0)
    assert r3.books.lost(NODES[1], now=1.0) == []
    r3.answer([o for o in orders if o.node == NODES[0]])
    settled, _ = r3.books.settle(2.0, 0.0)
    assert settled is not None and settled.alone == [0, 1]


def test_a_bad_piece_both_computers_refuse_redoes_the_round_without_its_node() -> None:
    r = Round()
    cheat = NODES[1]
    r.commit_all()
    # The piece the aggregators get is not the one committed: a NaN scale in its last block.
    broken = bytearray(r.cut[cheat][3])
    broken[-4:] = b"\x00\x00\xc0\x7f"  # a NaN scale in the last block
    r.cut[cheat][3] = bytes(broken)
    orders = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    r.answer(orders)
    settled, _ = r.books.settle(1.0, 0.0)
    assert settled is not None and settled.manifest is None
    assert set(settled.redo) == {cheat} and "finite" in settled.redo[cheat]
    orders = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=2.0)
    assert cheat not in [c.node for c in r.books.contributors]
    r.answer(orders)
    settled, _ = r.books.settle(3.0, 0.0)
    assert settled is not None and settled.manifest is not None and settled.manifest.unchanged == ""
    m = settled.manifest
    honest = [(n, w) for n, w in sorted(zip(NODES, WEIGHTS, strict=True)) if n != cheat]
    assert m.contributors == 3 and m.weight == sum(w for _, w in honest)
    for j, s in enumerate(m.shards):  # the redone round's inputs leave the cheat out
        assert s.inputs == mf.inputs_digest(r.books.reduction(j))
        assert s.inputs == mf.inputs_digest([(n, w, mf.piece_hash(r.cut[n][j])) for n, w in honest])


def test_nothing_trained_and_a_failed_check_leave_the_weights_unchanged() -> None:
    r = Round()
    r.commit_all()
    orders = r.books.fix(dict.fromkeys(NODES, 0.0), now=0.0)
    r.answer(orders)
    settled, _ = r.books.settle(1.0, 0.0)
    assert settled is not None and settled.manifest is not None
    assert settled.manifest.unchanged == "no samples trained this round"
    assert settled.manifest.contributors == 0 and settled.manifest.weight == 0.0
    mf.check(settled.manifest)
    r2 = Round()
    r2.commit_all()
    orders = r2.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    r2.answer(orders)
    settled, _ = r2.books.settle(1.0, 1e-9)  # a bound no change fits in
    assert settled is not None and settled.manifest is not None
    assert settled.manifest.unchanged.startswith("aggregate refused: tensor")


def test_commits_and_reports_out_of_turn_are_refused() -> None:
    r = Round()
    good = mf.Commit(
        round=3,
        base=BASE,
        pieces=[mf.piece_hash(p) for p in r.cut[NODES[0]]],
        sizes=[len(p) for p in r.cut[NODES[0]]],
    )
    assert "not a member" in (r.books.commit("9" * 64, good) or "")
    assert "sizes[0]" in (
        r.books.commit(NODES[0], msgspec.structs.replace(good, sizes=[1, *good.sizes[1:]])) or ""
    )
    assert "base" in (r.books.commit(NODES[0], msgspec.structs.replace(good, base="1" * 64)) or "")
    assert r.books.commit(NODES[0], good) is None
    assert "already committed" in (r.books.commit(NODES[0], good) or "")
    orders = r.books.fix({NODES[0]: 1.0, NODES[1]: 5.0}, now=0.0)
    assert [c.node for c in r.books.contributors] == [NODES[0]]  # NODES[1] never committed
    assert "already fixed" in (r.books.commit(NODES[2], good) or "")
    o = orders[0]
    outsider = next(m for m in MEMBERS if m not in {x.node for x in orders if x.shard == o.shard})
    honest = r.honest(o.shard)
    assert "was not asked" in (r.books.report(outsider, honest) or "")
    assert "not one of" in (r.books.report(o.node, dataclasses.replace(honest, shard=9)) or "")
    for bad, says in [
        (dataclasses.replace(honest, size=honest.size + 1), "sha256 of a"),
        (dataclasses.replace(honest, sums={"nope": TensorSums()}), "outside the shard"),
        (dataclasses.replace(honest, norms2={"9" * 64: 1.0}), "not contributors"),
        (dataclasses.replace(honest, norms2={NODES[0]: float("nan")}), "finite"),
        (dataclasses.replace(honest, sums={}), "cover each"),
    ]:
        assert says in (r.books.report(o.node, bad) or ""), says
    assert r.books.report(o.node, honest) is None
    assert "already reported" in (r.books.report(o.node, honest) or "")
    fresh = Round()
    fresh.commit_all()
    with pytest.raises(ValueError, match="finite"):
        fresh.books.fix({NODES[0]: float("inf")}, now=0.0)


@pytest.mark.parametrize(
    "norms",
    [
        [1.0, 2.0, -1.0, 3.0],
        [float("inf"), 0.0, 1.0, 1.0],
        [float("-inf"), float("inf"), 1.0, 1.0],
        [1.0, float("nan"), 1.0, 1.0],
        [1e308, 1e308, -1.0, 1.0],  # the sum overflows: each is looked at
        [1e308, 1e308, float("nan"), 1.0],
    ],
)
def test_a_report_with_a_norm_not_finite_or_below_zero_is_refused(norms: list[float]) -> None:
    r = Round()
    r.commit_all()
    o = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)[0]
    bad = dataclasses.replace(r.honest(o.shard), norms2=dict(zip(NODES, norms, strict=True)))
    assert "norms must be finite and >= 0" in (r.books.report(o.node, bad) or "")


def test_norms_whose_sum_overflows_are_each_finite_and_taken() -> None:
    r = Round()
    r.commit_all()
    o = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)[0]
    huge = dataclasses.replace(r.honest(o.shard), norms2=dict.fromkeys(NODES, 1e308))
    assert r.books.report(o.node, huge) is None


def test_the_coordinators_audit_names_both_seats_of_a_wrong_standing_result() -> None:
    r = Round()
    r.commit_all()
    orders = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    pair = {o.node for o in orders if o.shard == 1}
    wrong = hashlib.sha256(b"agreed lie").hexdigest()
    r.answer([o for o in orders if o.shard == 1], lie=dict.fromkeys(pair, wrong))
    r.answer([o for o in orders if o.shard != 1])
    settled, _ = r.books.settle(1.0, 0.0)
    assert settled is not None and settled.manifest is not None
    assert settled.manifest.shards[1].result == wrong  # two seats agreed: it stood
    assert set(r.books.audit(1, r.honest(1))) == pair
    assert r.books.audit(0, r.honest(0)) == {}  # an honest shard passes its audit
    assert r.books.audit(99, r.honest(0)) == {}


def test_a_starved_seat_abstains_and_is_never_outvoted() -> None:
    r = Round()
    r.commit_all()
    orders = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    starved, fed = [o for o in orders if o.shard == 0]
    # A hostile contributor served its piece to one seat only.
    empty = Report(0, "", 0, missing=(NODES[2],), attempt=r.books.attempt)
    assert r.books.report(starved.node, empty) is None
    assert r.books.report(fed.node, r.honest(0)) is None
    r.answer([o for o in orders if o.shard != 0])
    settled, referee = r.books.settle(1.0, 0.0)
    assert settled is None and [o.shard for o in referee] == [0]  # the abstention is no vote
    r.answer(referee)
    settled, _ = r.books.settle(2.0, 0.0)
    assert settled is not None and settled.manifest is not None
    assert settled.liars == {} and settled.manifest.struck == []


def test_a_piece_two_computers_could_not_obtain_leaves_its_node_out_unstruck() -> None:
    r = Round()
    r.commit_all()
    orders = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    gone = NODES[3]
    for o in orders:
        if o.shard == 2:
            missing = Report(2, "", 0, missing=(gone,), attempt=r.books.attempt)
            assert r.books.report(o.node, missing) is None
    r.answer([o for o in orders if o.shard != 2])
    settled, _ = r.books.settle(1.0, 0.0)
    assert settled is not None and settled.manifest is None
    assert set(settled.missing) == {gone} and not settled.redo and not settled.liars
    again = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=2.0)
    assert gone not in [c.node for c in r.books.contributors]
    r.answer(again)
    settled, _ = r.books.settle(3.0, 0.0)
    assert settled is not None and settled.manifest is not None and settled.manifest.struck == []
    fresh = Round()
    fresh.commit_all()
    o = fresh.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)[0]
    outsider = Report(o.shard, "", 0, missing=("9" * 64,), attempt=fresh.books.attempt)
    assert "not contributors" in (fresh.books.report(o.node, outsider) or "")


def test_a_late_report_of_an_earlier_attempt_is_refused() -> None:
    r = Round()
    r.commit_all()
    first = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=0.0)
    late = r.honest(first[0].shard)
    again = r.books.fix(dict(zip(NODES[:3], WEIGHTS[:3], strict=True)), now=1.0)  # a redo
    assert again and again[0].attempt == 2 and late.attempt == 1
    assert "attempt 1" in (r.books.report(first[0].node, late) or "")


def test_an_order_frame_is_the_shards_reduction_and_the_same_for_both_seats() -> None:
    r = Round()
    r.commit_all()
    orders = r.books.fix(dict(zip(NODES, WEIGHTS, strict=True)), now=5.0)
    for j in range(4):
        seats = [o for o in orders if o.shard == j]
        frames = [r.books.order_frame(o, now=1.0) for o in seats]
        assert len(seats) == 2 and frames[0] == frames[1]
        msg = protocol.decode_frame(frames[0])
        assert isinstance(msg, protocol.ShardOrder)
        assert (msg.round, msg.shard, msg.attempt, msg.deadline_s) == (3, j, 1, 14.0)
        assert list(zip(msg.nodes, msg.weights, msg.pieces, strict=True)) == r.books.reduction(j)
    stale = orders[0]
    r.books.fix(dict(zip(NODES[:3], WEIGHTS[:3], strict=True)), now=6.0)  # a redo: attempt 2
    with pytest.raises(ValueError, match="attempt 1"):
        r.books.order_frame(stale, now=6.0)
