"""One shard's round, the same bits as the star's. Pure torch: no I/O, no clock.

The star (``coordinator/aggregation.py``) combines the round's changes, takes the outer step,
checks the result and encodes the download change with its error feedback, all on the whole
model. :func:`reduce_shard` does the same on one shard's slices (``plan.py``) with the very
same functions (:class:`~lightning_drift.aggregate.Accumulator` or
:class:`~lightning_drift.robust.RobustAccumulator`, :class:`~lightning_drift.aggregate.DiLoCo`,
:func:`lightning_drift.codec.encode_tensors`). Each of them computes per value or per codec
block, with no fused operation whose rounding depends on the CPU's kernels, so on the same
pieces, weights and contributor order the shard's result piece holds exactly the bytes of the
star's download change over the same values (``tests/test_dataplane_reduce.py`` checks it under
several ``ATEN_CPU_CAPABILITY`` settings).

What a shard carries from round to round, its piece of DiLoCo's momentum and of the download
residual, is a :class:`ShardState`; :func:`reduce_shard` returns the next one without
touching the one it was given, so an aggregator adopts it only once the round's manifest
accepted the result (the star likewise keeps both when its aggregate is refused).

What needs the whole model stays out: the aggregate's check is made of per-shard partial sums
(:class:`TensorSums`, combined by :func:`check_sums`), and each contributor's change norm of
per-shard squares. Norm clipping (``--clip``) scales a whole contribution by its global norm
before any value is combined, which no shard can do alone: :func:`outer_rule` refuses it.

Carried tensors (non-finite by design, ``modelspec.carried``) are named by the caller from the
whole global weights (a slice of one may hold no infinity): their change must be 0 in every
piece and is 0 in the result, as in the star.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import safetensors.torch
import torch

from lightning_drift import codec
from lightning_drift.aggregate import (
    OUTER_MOMENTUM,
    Accumulator,
    DiLoCo,
    moved_too_far,
    outer_settings,
    weighed,
)
from lightning_drift.dataplane.manifest import piece_hash
from lightning_drift.dataplane.plan import ShardPlan
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.modelspec import carried_changed
from lightning_drift.robust import METHODS, RobustAccumulator

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class OuterRule:
    """How a round turns its contributions into new weights: the session's aggregation
    (``mean`` or ``diloco`` with its outer learning rate and momentum) and robust method."""

    aggregation: str = "mean"
    outer_lr: float = 0.0  # 0: by the round's contributors (aggregate.outer_settings)
    outer_momentum: float = OUTER_MOMENTUM
    robust: str = "off"
    trim: float = 0.2
    outer_warmup: int = 0


def outer_rule(
    aggregation: str,
    outer_lr: float,
    outer_momentum: float,
    robust: str,
    trim: float,
    clip: float,
    outer_warmup: int = 0,
) -> OuterRule:
    """The rule for a sharded session's settings; ConfigError for what shards cannot do."""
    if clip > 0:
        raise ConfigError(
            f"--clip {clip:g} scales each contribution by its norm over the whole model, which "
            "no shard sees: use --data-plane star with --clip, or --robust trimmed/median "
            "(coordinate-wise, they work per shard) without it"
        )
    if robust not in METHODS:
        raise ConfigError(f"robust aggregation must be {', '.join(METHODS)}; got {robust!r}")
    if aggregation not in ("mean", "diloco"):
        raise ConfigError(f"aggregation must be mean or diloco, got {aggregation!r}")
    return OuterRule(aggregation, outer_lr, outer_momentum, robust, trim, outer_warmup)


@dataclass(frozen=True)
class ShardState:
    """What one shard carries between rounds, keyed by span key: DiLoCo's momentum and the
    download residual (error feedback). Empty before the first round."""

    momentum: StateDict = field(default_factory=dict)
    residual: StateDict = field(default_factory=dict)


_MOMENTUM, _RESIDUAL = "momentum/", "residual/"


def state_bytes(state: ShardState) -> bytes:
    """A shard's state as bytes (safetensors; equal states, equal bytes): what a seat serves
    by its sha256 to a member that takes the shard over."""
    flat = {_MOMENTUM + k: v.contiguous() for k, v in state.momentum.items()}
    flat.update({_RESIDUAL + k: v.contiguous() for k, v in state.residual.items()})
    return safetensors.torch.save(flat) if flat else b""


def read_state(plan: ShardPlan, index: int, data: bytes) -> ShardState:
    """The state :func:`state_bytes` wrote for shard ``index``, checked against the plan: only
    the shard's floating spans, each a flat tensor of its size in its compute dtype, finite.
    ``SessionError(code="bad_upload")`` says what is wrong."""
    if not data:
        return ShardState()
    try:
        flat = safetensors.torch.load(bytes(data))
    except Exception as exc:  # the binding raises its own SafetensorError
        raise SessionError(
            f"not a shard state ({len(data)} bytes): {exc}", code="bad_upload"
        ) from None
    spans = {s.key: s for s in plan.shards[index].spans if s.floating}
    momentum: StateDict = {}
    residual: StateDict = {}
    for name, t in flat.items():
        part, _, key = name.partition("/")
        span = spans.get(key)
        if part not in ("momentum", "residual") or span is None:
            raise SessionError(
                f"shard {index}'s state holds {name[:80]!r}, not one of its spans",
                code="bad_upload",
            )
        cdt = codec.compute_dtype(span.dtype)
        if t.dtype != cdt or tuple(t.shape) != (span.numel,) or not bool(torch.isfinite(t).all()):
            raise SessionError(
                f"shard {index}'s state {name[:80]!r} must be {span.numel} finite values of {cdt}",
                code="bad_upload",
            )
        (momentum if part == "momentum" else residual)[key] = t
    return ShardState(momentum, residual)


@dataclass(frozen=True)
class Piece:
    """One contributor's piece of the shard, with its aggregation weight."""

    node: str
    weight: float
    data: bytes


@dataclass(frozen=True)
class TensorSums:
    """A shard's part of one tensor's check: squares of how far it moved and of its old
    values (float64), and how many new values are not finite."""

    moved2: float = 0.0
    ref2: float = 0.0
    nonfinite: int = 0


@dataclass(frozen=True)
class ShardResult:
    """One shard's round.

    ``piece`` is the shard's download change (``None``: the weights stay, because nothing was
    trained or a piece was bad) and ``sha`` its sha256; ``bad`` names each contributor whose
    piece was refused and why (then nothing was combined: the round must be reduced again
    without them). ``state`` is the shard's next state, to adopt once the round is accepted."""

    index: int
    piece: bytes | None
    sha: str
    sums: dict[str, TensorSums]
    norms2: dict[str, float]
    total_weight: float
    state: ShardState
    bad: dict[str, str] = field(default_factory=dict)


def reduce_shard(
    plan: ShardPlan,
    index: int,
    base: Mapping[str, torch.Tensor],
    fixed: frozenset[str],
    pieces: Sequence[Piece],
    state: ShardState,
    rule: OuterRule,
    round_no: int = 0,
) -> ShardResult:
    """Shard ``index``'s round ``round_no`` (the upload round): ``pieces`` combined in the given
    order against the whole global weights ``base`` (whose carried tensors are ``fixed``), the
    outer step, and the download change encoded with the shard's residual (see the module
    docstring)."""
    shard = plan.shards[index]
    views = plan.slices(index, base)
    live = {s.key: views[s.key] for s in shard.spans if s.name not in fixed}
    acc, bad = _combine(plan, index, live, fixed, pieces, rule)
    norms2 = {n: v * v for n, v in acc.norms.items()}
    if bad or acc.total_weight <= 0:
        return ShardResult(index, None, "", {}, norms2, acc.total_weight, state, bad)
    mean = acc.mean()
    momentum: StateDict = {}
    if rule.aggregation == "diloco":
        lr, beta = outer_settings(
            weighed(acc.contributors), round_no, rule.outer_lr, rule.outer_momentum,
            rule.outer_warmup,
        )  # fmt: skip
        outer = DiLoCo(lr=lr, momentum=beta)
        outer.load_state_dict(state.momentum)
        target = outer.step(live, mean)
        momentum = outer.state_dict()
    else:
        target = mean
    sums = {
        s.name: _sums(target[s.key], live[s.key])
        for s in shard.spans
        if s.key in live and s.floating
    }
    moved = codec.difference(target, live)
    change_of: StateDict = {}
    for s in shard.spans:
        if s.key in moved:
            change_of[s.key] = moved[s.key]
        else:  # a carried span: exactly 0, as the star's difference gives it
            change_of[s.key] = torch.zeros(s.numel, dtype=codec.compute_dtype(s.dtype))
    residual = codec.Residual()
    residual.load_state_dict(state.residual)
    wire, _ = codec.encode_tensors(change_of, plan.codec, residual)
    piece = plan.write(index, wire)
    return ShardResult(
        index,
        piece,
        piece_hash(piece),
        sums,
        norms2,
        acc.total_weight,
        ShardState(momentum, residual.state_dict()),
    )


def _combine(
    plan: ShardPlan,
    index: int,
    live: StateDict,
    fixed: frozenset[str],
    pieces: Sequence[Piece],
    rule: OuterRule,
) -> tuple[Accumulator | RobustAccumulator, dict[str, str]]:
    """Every piece read, checked and added in order; the refused ones by node, with why."""
    held = [s for s in plan.shards[index].spans if s.name in fixed]
    acc: Accumulator | RobustAccumulator = (
        Accumulator(live)
        if rule.robust == "off"
        else RobustAccumulator(live, method=rule.robust, trim=rule.trim)
    )
    bad: dict[str, str] = {}
    for p in pieces:
        try:
            change = plan.read(index, p.data)
            for s in held:
                if not bool((change[s.key] == 0).all()):
                    raise SessionError(
                        f"upload refused: {carried_changed(s.name)}", code="bad_upload"
                    )
            acc.add(p.node, {k: change[k] for k in live}, p.weight, delta=True)
        except SessionError as exc:
            bad[p.node] = str(exc)
    return acc, bad


def _sums(new: torch.Tensor, old: torch.Tensor) -> TensorSums:
    ref = old.to(torch.float64)
    bad = int((~torch.isfinite(new)).sum().item())
    moved = new.to(torch.float64) - ref
    return TensorSums(float((moved * moved).sum()), float((ref * ref).sum()), bad)


def check_sums(
    plan: ShardPlan,
    fixed: frozenset[str],
    parts: Sequence[Mapping[str, TensorSums]],
    max_change: float,
) -> str | None:
    """Why the round's new weights must not be taken, from every shard's :class:`TensorSums`,
    or None: the star's ``check_aggregate`` (finite; no tensor moved further than
    ``max_change × (‖old‖ + √numel)``), its norms summed from the shards' squares (so a
    tensor right at the bound may be judged on the other side of it by a rounding)."""
    total: dict[str, list[float]] = {}
    for part in parts:
        for name, s in part.items():
            t = total.setdefault(name, [0.0, 0.0, 0.0])
            t[0] += s.moved2
            t[1] += s.ref2
            t[2] += s.nonfinite
    for name, spec in plan.table.items():
        if name in fixed or not spec.floating or name not in total:
            continue
        moved2, ref2, bad = total[name]
        if bad:
            return f"tensor {name[:80]!r} holds {int(bad)} non-finite value(s)"
        if max_change <= 0:
            continue
        why = moved_too_far(name, math.sqrt(moved2), math.sqrt(ref2), spec.numel, max_change)
        if why is not None:
            return why
    return None


def contributor_norms(parts: Sequence[Mapping[str, float]]) -> dict[str, float]:
    """Each contributor's change norm over the whole model, from every shard's squares."""
    total: dict[str, float] = {}
    for part in parts:
        for node, v in part.items():
            total[node] = total.get(node, 0.0) + v
    return {n: math.sqrt(v) for n, v in total.items()}


__all__ = [
    "OuterRule",
    "Piece",
    "ShardResult",
    "ShardState",
    "TensorSums",
    "check_sums",
    "contributor_norms",
    "outer_rule",
    "reduce_shard",
]
