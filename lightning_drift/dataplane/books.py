"""The coordinator's books of one sharded round: commits in, who computes what, whose result
stands, and the manifest out. Pure: no I/O, no clock of its own (``now`` is passed in).

A round goes through four steps, each an event the shell hands in:

1. **commit** (:meth:`RoundBooks.commit`): a member commits the sha256 and sizes of its
   change's pieces (``manifest.Commit``), checked against the plan, once per member;
2. **fix** (:meth:`RoundBooks.fix`): the session says which commits count and with what
   weight; the contributors are taken in a fixed order (by node id), the order every
   aggregator reduces in, so every honest computation of a shard gives the same bytes;
3. **report** (:meth:`RoundBooks.report`): a shard's computers report its result (the hash
   of the result piece, the check's partial sums, the contributors' squared change norms,
   the pieces they refused). The computers of a shard are the first members of its
   rendezvous ranking (``owners.py``) that are still reachable: the primary and the mirror
   at first;
4. **settle** (:meth:`RoundBooks.settle`): a shard stands once two of its computers reported
   the same thing. When they differ, the next member in the ranking is asked too (the
   referee): a report two computers agree on stands and a computer that reported otherwise
   is named a liar (the shell strikes it); three different answers and the shard cannot be
   settled, so the round leaves the weights as they are. A computer that is lost or overdue
   is replaced by the next member in the ranking; when no member is left to ask, a single
   report stands alone (the log says so). Pieces both agreeing computers refused name their
   contributors as bad: the round is fixed again without them. When every shard stands, the
   check's partial sums decide (``reduce.check_sums``) and the result is a ``Manifest``
   ready to sign, or the reason the round leaves the weights unchanged.

What a hostile member can do here: as a contributor, commit pieces it then withholds or
corrupts (the aggregators refuse them, so it is struck and left out); as a computer, report a
wrong result, which another computer's report outvotes; as a pair holding both seats of a
shard, agree on a wrong result: nothing here can see that, which is what the coordinator's
own recomputation of a random shard is for. It cannot make the books wait: every computer
has a deadline, and a round without a settled shard ends unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field

from lightning_drift import protocol
from lightning_drift.dataplane.manifest import (
    Commit,
    Contributor,
    Manifest,
    ShardEntry,
    check_commit,
    inputs_digests,
)
from lightning_drift.dataplane.owners import rankings
from lightning_drift.dataplane.plan import ShardPlan
from lightning_drift.dataplane.reduce import TensorSums, check_sums, contributor_norms
from lightning_drift.errors import ProtocolError
from lightning_drift.text import clean_text, is_hex64

# How many members compute a shard at first (the primary and the mirror).
SEATS = 2


@dataclass(frozen=True)
class Report:
    """What a computer says of a shard: the sha256 and size of its result piece ("" and 0
    when it published none), the check's partial sums, each contributor's squared change
    norm over the shard, and the contributors whose pieces it refused, with why."""

    shard: int
    result: str
    size: int
    sums: Mapping[str, TensorSums] = field(default_factory=dict)
    norms2: Mapping[str, float] = field(default_factory=dict)
    bad: Mapping[str, str] = field(default_factory=dict)
    state: str = ""  # sha256 of the shard's next state, served to a member taking it over
    state_size: int = 0
    # Contributors whose pieces this computer could not obtain: it computed nothing, and
    # its report is no vote (an honest seat a contributor starved is never outvoted).
    missing: tuple[str, ...] = ()
    attempt: int = 0  # the attempt of the order it answers

    def same(self, other: Report) -> bool:
        """Honest computers of a shard report exactly the same (the reduction is exact)."""
        return (
            self.result == other.result
            and self.size == other.size
            and self.sums == other.sums
            and self.norms2 == other.norms2
            and self.bad.keys() == other.bad.keys()
            and self.state == other.state
            and self.state_size == other.state_size
        )


@dataclass(frozen=True)
class Order:
    """What the shell must ask of ``node``: compute ``shard`` of the round by ``deadline``;
    ``attempt`` counts the round's fixes (a redo is the next attempt), and the report must
    name it, so a late report of an earlier attempt is never taken for a redo's."""

    node: str
    shard: int
    deadline: float
    attempt: int = 0


@dataclass(frozen=True)
class Settled:
    """The books' answer once every shard stood or could not: ``manifest`` (unsigned) when the
    round changes the weights or leaves them with a reason in ``manifest.unchanged``;
    ``redo``: contributors whose pieces were refused (fix the round again without them);
    ``missing``: contributors no two computers could obtain a piece of (fix it again without
    them too, but they are not to be struck: a lost node looks the same);
    ``liars``: computers outvoted on a shard, with the shard; ``alone``: shards whose result
    stands on one computer's word (no member was left to check it)."""

    manifest: Manifest | None = None
    redo: dict[str, str] = field(default_factory=dict)
    missing: dict[str, str] = field(default_factory=dict)
    liars: dict[str, str] = field(default_factory=dict)
    alone: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class _ShardBounds:
    """What the plan allows a report of one shard: its result's bytes, its state's bytes at
    most, the tensors it holds, and those of them the check's sums must cover."""

    size: int
    most: int
    names: frozenset[str]
    checked: frozenset[str]


def _finite_and_not_negative(values: Collection[float]) -> bool:
    """Every value finite and >= 0. A sum is NaN or infinite as soon as one value is, so a
    finite sum rules out both in one pass in C; a sum that overflowed is looked at value by
    value. This is what a report's thousand contributor norms are checked with."""
    total = sum(values, 0.0)
    if not math.isfinite(total):
        return all(math.isfinite(v) and v >= 0 for v in values)
    return not values or min(values) >= 0


class RoundBooks:
    """One sharded round's books (see the module docstring)."""

    def __init__(
        self,
        *,
        session: str,
        round_no: int,
        epoch: int,
        base: str,
        plan: ShardPlan,
        members: Sequence[str],
        seed: bytes,
        report_s: float,
        fixed: frozenset[str] = frozenset(),
    ) -> None:
        self.session = session
        self.round = round_no
        self.epoch = epoch
        self.base = base
        self.plan = plan
        self.seed = seed
        self.report_s = report_s
        self.fixed = frozenset(fixed)  # the global weights' carried tensors: not checked
        self.members = sorted(set(members))
        self._member_set = frozenset(self.members)  # a commit asks; the list is for reading
        self._sizes = [s.size for s in plan.shards]
        self._bounds: list[_ShardBounds | None] = [None] * plan.count
        self.commits: dict[str, Commit] = {}
        self.contributors: list[Contributor] = []
        # The reduction lists by column: every shard's has the same nodes and weights, and
        # orders and the manifest read them a thousand entries at a time.
        self._nodes: list[str] = []
        self._weights: list[float] = []
        self._columns: list[list[str]] = [[] for _ in range(plan.count)]
        self._frames: dict[tuple[int, int, float], bytes] = {}
        self._ranking = rankings(tuple(self.members), seed, plan.count)
        self._lost: set[str] = set()
        self._asked: list[dict[str, float]] = [{} for _ in range(plan.count)]  # node: deadline
        self._reports: list[dict[str, Report]] = [{} for _ in range(plan.count)]
        self._left_out: dict[str, str] = {}
        self._contributing: frozenset[str] = frozenset()
        self.attempt = 0  # how many times the contributors were fixed
        self._abstained: list[dict[str, frozenset[str]]] = [{} for _ in range(plan.count)]
        # Each shard's verdict while nothing about it changed: settle() runs after every
        # report, and a thousand-member round must not compare every report every time.
        self._known: list[tuple[Report, list[str]] | str | None] = [None] * plan.count

    # ---- 1. commits -------------------------------------------------------------------------

    def commit(self, node: str, commit: Commit) -> str | None:
        """Record ``node``'s commit; the reason it is refused, or None."""
        if node not in self._member_set:
            return f"node {node[:16]} is not a member of this round"
        if node in self.commits:
            return f"node {node[:16]} already committed to round {self.round}"
        if self.contributors:
            return f"round {self.round}'s contributors are already fixed"
        try:
            check_commit(
                commit,
                open_round=self.round,
                base=self.base,
                shards=self.plan.count,
                sizes=self._sizes,
            )
        except ProtocolError as exc:
            return str(exc)
        self.commits[node] = commit
        return None

    # ---- 2. the contributor set -------------------------------------------------------------

    def fix(self, weights: Mapping[str, float], now: float) -> list[Order]:
        """Fix the contributors (committed nodes in ``weights``, by node id) and give the
        first orders: each shard's first :data:`SEATS` reachable members compute it."""
        self.attempt += 1
        chosen = sorted(n for n in weights if n in self.commits and n not in self._left_out)
        for n in chosen:
            w = weights[n]
            if not (math.isfinite(w) and w >= 0):
                raise ValueError(f"weight of node {n[:16]} must be finite and >= 0, got {w!r}")
        self.contributors = [  # each with its commit's list of hashes: the books hold both
            Contributor(node=n, weight=float(weights[n]), pieces=self.commits[n].pieces)
            for n in chosen
        ]
        self._contributing = frozenset(c.node for c in self.contributors)
        self._nodes = [c.node for c in self.contributors]
        self._weights = [c.weight for c in self.contributors]
        columns = zip(*(c.pieces for c in self.contributors), strict=True)
        self._columns = [list(col) for col in columns] or [[] for _ in range(self.plan.count)]
        self._frames = {}
        self._asked = [{} for _ in range(self.plan.count)]
        self._reports = [{} for _ in range(self.plan.count)]
        self._abstained = [{} for _ in range(self.plan.count)]
        self._known = [None] * self.plan.count
        orders: list[Order] = []
        for j in range(self.plan.count):
            orders += self._seat(j, SEATS, now)
        return orders

    def reduction(self, shard: int) -> list[tuple[str, float, str]]:
        """What a computer of ``shard`` reduces: (node, weight, piece sha256), in order."""
        return list(zip(self._nodes, self._weights, self._columns[shard], strict=True))

    def order_frame(self, order: Order, now: float) -> bytes:
        """The ``ShardOrder`` frame for ``order`` (one this attempt's :meth:`fix`, :meth:`lost`,
        :meth:`overdue` or :meth:`settle` gave), with its deadline in seconds from ``now``,
        for ``Stream.send_raw``. A shard's seats reduce the same list, a thousand entries at a
        thousand contributors, so its frame is encoded once and handed to each of them."""
        if order.attempt != self.attempt:
            raise ValueError(
                f"an order of attempt {order.attempt}; the books are at {self.attempt}"
            )
        key = (order.shard, order.attempt, order.deadline - now)
        frame = self._frames.get(key)
        if frame is None:
            msg = protocol.ShardOrder(
                round=self.round, shard=order.shard, nodes=self._nodes, weights=self._weights,
                pieces=self._columns[order.shard], deadline_s=key[2], attempt=order.attempt,
            )  # fmt: skip
            frame = self._frames[key] = protocol.encode_frame(msg)
        return frame

    # ---- 3. reports -------------------------------------------------------------------------

    def report(self, node: str, report: Report) -> str | None:
        """Record ``node``'s report of a shard; the reason it is refused, or None."""
        j = report.shard
        if not 0 <= j < self.plan.count:
            return f"shard {j} is not one of the round's {self.plan.count}"
        if report.attempt != self.attempt:
            return f"a report of attempt {report.attempt}; round {self.round} is at attempt {self.attempt}"
        if node not in self._asked[j]:
            return f"node {node[:16]} was not asked to compute shard {j}"
        if node in self._reports[j] or node in self._abstained[j]:
            return f"node {node[:16]} already reported shard {j}"
        why = self._check(report)
        if why is not None:
            return why
        if report.missing:
            if not set(report.missing) <= self._contributing:
                return f"shard {j}'s report names missing pieces of nodes that are not contributors"
            self._abstained[j][node] = frozenset(report.missing)
            self._known[j] = None
            return None
        bad = {n: clean_text(why, 200) for n, why in report.bad.items()}  # shown and logged
        self._reports[j][node] = Report(
            j, report.result, report.size, dict(report.sums), dict(report.norms2),
            bad, report.state, report.state_size,
        )  # fmt: skip
        self._known[j] = None
        return None

    def lost(self, node: str, now: float) -> list[Order]:
        """``node`` is gone: every shard it was asked for and did not report is asked of the
        next member of its ranking."""
        self._lost.add(node)
        self._known = [None] * self.plan.count  # a lost member changes every ranking's spares
        orders: list[Order] = []
        for j in range(self.plan.count):
            if node in self._asked[j] and node not in self._reports[j]:
                orders += self._seat(j, 1, now)
        return orders

    def overdue(self, now: float) -> list[Order]:
        """Computers past their deadline are treated as lost (not struck: slow is not
        hostile); the orders that replace them."""
        late = {
            n
            for j in range(self.plan.count)
            for n, t in self._asked[j].items()
            if now > t and n not in self._reports[j] and n not in self._lost
        }
        orders: list[Order] = []
        for n in sorted(late):
            orders += self.lost(n, now)
        return orders

    # ---- 4. settling ------------------------------------------------------------------------

    def settle(self, now: float, max_change: float) -> tuple[Settled | None, list[Order]]:
        """(the round's answer, or None while a shard still waits; new orders: a referee for
        each shard whose reports disagree)."""
        standing: list[Report] = []
        seats: list[tuple[str, str]] = []
        liars: dict[str, str] = {}
        alone: list[int] = []
        orders: list[Order] = []
        failed: list[int] = []
        waiting = False
        unobtainable = self._unobtainable()
        if unobtainable:
            self._left_out.update(unobtainable)
            return Settled(missing=unobtainable), []
        for j in range(self.plan.count):
            verdict = self._verdict(j)
            if verdict == "disagree":
                new = self._seat(j, 1, now)
                if new:
                    orders += new
                    waiting = True
                else:
                    failed.append(j)
                continue
            if verdict == "waiting":
                waiting = True
                continue
            if isinstance(verdict, str):  # "failed"
                failed.append(j)
                continue
            report, agreed = verdict
            if len(agreed) == 1:
                alone.append(j)
            for n in self._reports[j]:
                if n not in agreed:  # agreed: each computer whose report is the same as it
                    liars[n] = f"its result for shard {j} of round {self.round} was outvoted"
                    self._lost.add(n)  # never asked again this round, a redo included
            standing.append(report)
            seats.append((agreed[0], agreed[1] if len(agreed) > 1 else ""))
        if waiting:
            return None, orders
        if failed:
            shown = ", ".join(map(str, failed[:10])) + (" …" if len(failed) > 10 else "")
            why = (
                f"{len(failed)} shard(s) ({shown}) could not be settled: their computers disagreed"
            )
            return Settled(self._manifest([], [], liars, why), liars=liars, alone=alone), []
        bad = {n: why for r in standing for n, why in r.bad.items()}
        if bad:
            self._left_out.update(bad)
            return Settled(redo=bad, liars=liars, alone=alone), []
        total = sum(c.weight for c in self.contributors)
        if not self.contributors or total <= 0 or any(not r.result for r in standing):
            why = "no samples trained this round"
            return Settled(self._manifest([], [], liars, why), liars=liars, alone=alone), []
        refused = check_sums(self.plan, self.fixed, [r.sums for r in standing], max_change)
        if refused is not None:
            why = f"aggregate refused: {refused}"
            return Settled(self._manifest([], [], liars, why), liars=liars, alone=alone), []
        return Settled(self._manifest(standing, seats, liars, ""), liars=liars, alone=alone), []

    def audit(self, shard: int, report: Report) -> dict[str, str]:
        """The coordinator's own recomputation of a settled shard (``report``): the
        computers whose standing result it contradicts, with why. Two seats that agreed on a
        wrong result (a colluding pair) are both named; no computer is named when it agrees
        or the shard did not stand."""
        verdict = self._verdict(shard) if 0 <= shard < self.plan.count else "failed"
        if report.missing or isinstance(verdict, str) or verdict[0].same(report):
            return {}  # a recomputation short of pieces proves nothing
        why = f"its result for shard {shard} of round {self.round} failed the coordinator's recomputation"
        return dict.fromkeys(verdict[1], why)

    def _unobtainable(self) -> dict[str, str]:
        """Contributors two computers of one shard could not obtain a piece of."""
        out: dict[str, str] = {}
        for j in range(self.plan.count):
            named: dict[str, int] = {}
            for nodes in self._abstained[j].values():
                for n in nodes:
                    named[n] = named.get(n, 0) + 1
            for n, count in named.items():
                if count >= 2:
                    out[n] = f"its piece of shard {j} of round {self.round} could not be obtained"
        return out

    def norms(self) -> dict[str, float]:
        """Each contributor's change norm over the whole model, from the standing reports."""
        verdicts = [self._verdict(j) for j in range(self.plan.count)]
        return contributor_norms([v[0].norms2 for v in verdicts if isinstance(v, tuple)])

    # ---- internals --------------------------------------------------------------------------

    def _seat(self, j: int, n: int, now: float) -> list[Order]:
        """Ask the next ``n`` members of shard ``j``'s ranking not asked yet and not lost."""
        out: list[Order] = []
        for m in self._ranking[j]:
            if len(out) == n:
                break
            if m in self._asked[j] or m in self._lost:
                continue
            self._asked[j][m] = now + self.report_s
            self._known[j] = None
            out.append(Order(m, j, now + self.report_s, self.attempt))
        return out

    def _verdict(self, j: int) -> tuple[Report, list[str]] | str:
        """(the standing report, the computers that reported it), or "waiting", "disagree"
        (ask a referee) or "failed"; remembered until a report or a seat of the shard changes."""
        known = self._known[j]
        if known is None:
            known = self._known[j] = self._judge(j)
        return known

    def _judge(self, j: int) -> tuple[Report, list[str]] | str:
        reports = self._reports[j]
        distinct: list[Report] = []
        for r in reports.values():
            agreed = [m for m, o in reports.items() if o.same(r)]
            if len(agreed) >= 2:
                return r, agreed
            if not any(r.same(d) for d in distinct):
                distinct.append(r)
        if len(distinct) >= 3:
            return "failed"  # three different answers: no referee can settle it
        pending = [
            m
            for m in self._asked[j]
            if m not in reports and m not in self._abstained[j] and m not in self._lost
        ]
        if pending:
            return "waiting"
        spare = [m for m in self._ranking[j] if m not in self._asked[j] and m not in self._lost]
        if len(reports) == 1 and not spare:
            ((n, r),) = reports.items()
            return r, [n]
        if spare:
            return "disagree"
        return "failed"

    def _check(self, r: Report) -> str | None:
        b = self._shard_bounds(r.shard)
        contributors = self._contributing
        if r.result and (not is_hex64(r.result) or r.size != b.size):
            return f"shard {r.shard}'s result must be a sha256 of a {b.size}-byte piece"
        if r.state and (not is_hex64(r.state) or not 0 < r.state_size <= b.most):
            return f"shard {r.shard}'s state must be a sha256 of at most {b.most} bytes"
        if not b.names.issuperset(r.sums):
            return f"shard {r.shard}'s sums name tensors outside the shard"
        if r.result and not (len(r.sums) == len(b.checked) and b.checked.issuperset(r.sums)):
            return f"shard {r.shard}'s sums must cover each of its {len(b.checked)} checked tensors"
        for s in r.sums.values():
            if not all(math.isfinite(v) and v >= 0 for v in (s.moved2, s.ref2)) or s.nonfinite < 0:
                return f"shard {r.shard}'s sums must be finite and >= 0"
        if not contributors.issuperset(r.norms2) or not contributors.issuperset(r.bad):
            return f"shard {r.shard}'s report names nodes that are not contributors"
        if not _finite_and_not_negative(r.norms2.values()):
            return f"shard {r.shard}'s norms must be finite and >= 0"
        return None

    def _shard_bounds(self, j: int) -> _ShardBounds:
        """What a report of shard ``j`` is checked against, from the plan, worked out once."""
        b = self._bounds[j]
        if b is None:
            spans = self.plan.shards[j].spans
            floats = sum(s.numel for s in spans if s.floating)
            b = self._bounds[j] = _ShardBounds(
                size=self.plan.shards[j].size,
                # momentum and residual in float64 at most, and a header
                most=16 * floats + (64 << 10),
                names=frozenset(s.name for s in spans),
                checked=frozenset(s.name for s in spans if s.floating and s.name not in self.fixed),
            )
        return b

    def _manifest(
        self,
        standing: Sequence[Report],
        seats: Sequence[tuple[str, str]],
        liars: Mapping[str, str],
        unchanged: str,
    ) -> Manifest:
        digests = inputs_digests(
            self._nodes, self._weights, [self._columns[r.shard] for r in standing]
        )
        shards = [
            ShardEntry(
                index=r.shard,
                primary=p,
                mirror=m,
                result=r.result,
                state=r.state,
                state_size=r.state_size,
                size=r.size,
                inputs=inputs,
            )
            for r, (p, m), inputs in zip(standing, seats, digests, strict=True)
        ]
        # An unchanged round has nothing to fetch: no shards, and no uploads it counted.
        counted = self.contributors if not unchanged else []
        return Manifest(
            session=self.session,
            round=self.round,
            epoch=self.epoch,
            base=self.base,
            plan=self.plan.digest,
            contributors=len(counted),
            weight=float(sum(c.weight for c in counted)),
            shards=shards,
            struck=sorted(liars),
            unchanged=unchanged,
        )


__all__ = ["SEATS", "Order", "Report", "RoundBooks", "Settled"]
