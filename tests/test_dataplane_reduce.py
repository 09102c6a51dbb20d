"""One shard's round equals the star's bit for bit: on the same uploads in the same order, the
shards' result pieces join into the star's download change, and the weights, DiLoCo's
momentum and the residual they lead to are the same bytes, on every CPU kernel."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dataplane_cases import NODES, local, model, run

from lightning_drift import codec
from lightning_drift.aggregate import check_aggregate
from lightning_drift.dataplane.plan import ShardPlan
from lightning_drift.dataplane.reduce import (
    OuterRule,
    Piece,
    ShardState,
    TensorSums,
    check_sums,
    contributor_norms,
    outer_rule,
    read_state,
    reduce_shard,
    state_bytes,
)
from lightning_drift.errors import ConfigError, SessionError
from lightning_drift.modelspec import carried, table_of

HERE = Path(__file__).parent


def _equal(r: dict[str, str]) -> bool:
    return (
        r["same_every_round"] == "True"
        and r["weights"] == r["sharded_weights"]
        and r["momentum"] == r["star_momentum"]
        and r["residual"] == r["star_residual"]
    )


@pytest.mark.parametrize("codec_name", codec.CODECS)
@pytest.mark.parametrize("method", ["mean", "diloco", "trimmed", "median"])
@pytest.mark.parametrize("count", [1, 3, 8])
def test_the_shards_give_the_stars_bytes_every_round(
    codec_name: str, method: str, count: int
) -> None:
    r = run(codec_name, method, count)
    assert _equal(r), r


def _capabilities() -> list[str]:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    caps = ["default"]
    caps += [c for c in ("avx2", "avx512") if f" {c}" in flags.replace("avx512f", "avx512")]
    return caps


@pytest.mark.parametrize(
    ("codec_name", "method", "count"), [("int8", "diloco", 3), ("bfloat16", "trimmed", 5)]
)
def test_every_cpu_kernel_gives_the_same_bytes(codec_name: str, method: str, count: int) -> None:
    caps = _capabilities()
    if os.uname().machine in ("x86_64", "AMD64"):
        assert len(caps) >= 2, "an x86 CPU has at least one vector kernel to compare with"
    seen = {}
    for cap in caps:
        env = dict(os.environ, ATEN_CPU_CAPABILITY=cap)
        done = subprocess.run(
            [sys.executable, str(HERE / "dataplane_cases.py"), codec_name, method, str(count)],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        got = ast.literal_eval(done.stdout.strip().splitlines()[-1])
        assert _equal(got), (cap, got)
        seen[cap] = got
    assert len({r["weights"] for r in seen.values()}) == 1, seen
    assert len({r["residual"] for r in seen.values()}) == 1, seen
    assert len({r["momentum"] for r in seen.values()}) == 1, seen
    assert len({r["reports"] for r in seen.values()}) == 1, seen  # sums and norms too


def _setup(count: int = 3) -> tuple[ShardPlan, dict[str, torch.Tensor], list[list[bytes]]]:
    sd = model()
    plan = ShardPlan(table_of(sd), "int8", count)
    cut = []
    for i in range(len(NODES)):
        change = codec.difference(local(sd, i, 1), sd)
        cut.append(plan.pieces(codec.encode(change, "int8").payload))
    return plan, sd, cut


def test_a_bad_piece_names_its_node_and_nothing_is_combined() -> None:
    plan, sd, cut = _setup()
    j = next(s.index for s in plan.shards if any(sp.name == "mask" for sp in s.spans))
    held = ShardState()
    mask = next(s for s in plan.shards[j].spans if s.name == "mask")
    at = sum(  # the first code of the carried mask in piece j: make its change non-zero
        len(b"\0" * 0)
        + (s.numel + 4 * -(-s.numel // plan.block) if s.floating else s.numel * s.dtype.itemsize)
        for s in plan.shards[j].spans[: plan.shards[j].spans.index(mask)]
    )
    moved = bytearray(cut[1][j])
    moved[at] = 5
    scale_at = at + mask.numel
    moved[scale_at : scale_at + 4] = torch.tensor([0.5]).numpy().tobytes()
    pieces = [
        Piece(NODES[0], 1.0, cut[0][j]),
        Piece(NODES[1], 1.0, bytes(moved)),
        Piece(NODES[2], 1.0, cut[2][j][:-3]),
    ]
    r = reduce_shard(plan, j, sd, carried(sd), pieces, held, OuterRule())
    assert r.piece is None and r.sha == ""
    assert set(r.bad) == {NODES[1], NODES[2]}
    assert "non-finite values by design" in r.bad[NODES[1]]
    assert "bytes; the plan's is" in r.bad[NODES[2]]
    assert r.state is held


def test_nothing_trained_leaves_the_shard_unchanged() -> None:
    plan, sd, cut = _setup()
    state = ShardState()
    r = reduce_shard(
        plan, 0, sd, carried(sd), [Piece(NODES[0], 0.0, cut[0][0])], state, OuterRule()
    )
    assert r.piece is None and not r.bad and r.total_weight == 0 and r.state is state


def test_the_given_state_is_never_changed() -> None:
    plan, sd, cut = _setup(1)
    rule = OuterRule(aggregation="diloco")
    first = reduce_shard(
        plan, 0, sd, carried(sd), [Piece(NODES[0], 2.0, cut[0][0])], ShardState(), rule
    )
    before = {k: v.clone() for k, v in first.state.momentum.items()}
    second = reduce_shard(
        plan, 0, sd, carried(sd), [Piece(NODES[1], 2.0, cut[1][0])], first.state, rule
    )
    assert second.state is not first.state
    assert all(torch.equal(first.state.momentum[k], v) for k, v in before.items())
    assert second.sha != first.sha


def test_the_shards_sums_judge_as_the_stars_check() -> None:
    plan, sd, cut = _setup(4)
    fixed = carried(sd)
    results = [
        reduce_shard(
            plan,
            j,
            sd,
            fixed,
            [Piece(n, 1.0, cut[i][j]) for i, n in enumerate(NODES)],
            ShardState(),
            OuterRule(),
        )
        for j in range(plan.count)
    ]
    new = codec.apply(
        sd, plan.assemble([plan.read(j, r.piece or b"") for j, r in enumerate(results)])
    )
    for bound in (0.0, 1e-6, 1e-3, 10.0):
        star = check_aggregate(sd, new, bound)
        sharded = check_sums(plan, fixed, [r.sums for r in results], bound)
        assert (star is None) == (sharded is None), (bound, star, sharded)
        if star is not None:
            assert star.split(" moved")[0] == sharded.split(" moved")[0]
    norms = contributor_norms([r.norms2 for r in results])
    assert set(norms) == set(NODES) and all(v > 0 for v in norms.values())
    bad = [{"lin.weight": TensorSums(0.0, 1.0, 3)}]
    assert check_sums(plan, fixed, bad, 0.0) == "tensor 'lin.weight' holds 3 non-finite value(s)"


def test_clip_is_refused_with_what_to_use_instead() -> None:
    with pytest.raises(ConfigError, match="--data-plane star") as err:
        outer_rule("mean", 0.7, 0.6, "off", 0.2, clip=3.0)
    assert "--robust trimmed/median" in str(err.value)
    assert outer_rule("diloco", 0.5, 0.4, "median", 0.2, 0.0) == OuterRule(
        "diloco", 0.5, 0.4, "median", 0.2
    )


def test_a_shards_state_round_trips_by_bytes_and_a_bad_one_is_refused() -> None:
    plan, sd, cut = _setup(2)
    rule = OuterRule(aggregation="diloco")
    r = reduce_shard(
        plan, 1, sd, carried(sd), [Piece(NODES[0], 3.0, cut[0][1])], ShardState(), rule
    )
    data = state_bytes(r.state)
    assert data == state_bytes(r.state)  # equal states, equal bytes
    back = read_state(plan, 1, data)
    assert back.momentum.keys() == r.state.momentum.keys() and back.momentum
    assert all(torch.equal(back.residual[k], v) for k, v in r.state.residual.items())
    assert read_state(plan, 1, b"") == ShardState()
    key = next(iter(r.state.residual))
    other = ShardState({}, {key: r.state.residual[key][:-1].clone()})
    cases = [
        (b"garbage", "not a shard state"),
        (state_bytes(ShardState({}, {"nope@0": torch.zeros(3)})), "not one of its spans"),
        (state_bytes(other), "finite values"),
        (
            state_bytes(
                ShardState({}, {key: torch.full_like(r.state.residual[key], float("nan"))})
            ),
            "finite values",
        ),
    ]
    for bad, says in cases:
        with pytest.raises(SessionError, match=says):
            read_state(plan, 1, bad)
    with pytest.raises(SessionError, match="not one of its spans"):
        read_state(plan, 0, data)  # another shard's state
