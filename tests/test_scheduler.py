"""Scheduler: permutation, scores, admission, shard planning, late joiners, persistence."""

from __future__ import annotations

import json
import math
from fractions import Fraction

import msgspec
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_drift.coordinator.epochbook import plan_late
from lightning_drift.coordinator.pacebook import ema
from lightning_drift.errors import SessionError
from lightning_drift.protocol import DeviceInfo, NodeInfo
from lightning_drift.scheduler import (
    FALLBACK_CPU_GFLOPS_PER_CORE,
    FALLBACK_GFLOPS,
    EpochPlan,
    Scheduler,
    Shard,
    calibrated_pace,
    consumed_after,
    epoch_permutation,
    largest_remainder,
    optimizer_steps,
)

GIB = 1 << 30


def node_info(
    *,
    dataset_size: int = 1200,
    calibration: float = 100.0,
    train_device: str = "cpu",
    devices: list[DeviceInfo] | None = None,
    cpu_count: int = 4,
) -> NodeInfo:
    return NodeInfo(
        nonce="n",
        devices=devices or [],
        train_device=train_device,
        cpu="test cpu",
        cpu_count=cpu_count,
        memory=8 * GIB,
        calibration=calibration,
        torch_version=torch.__version__,
        dataset_size=dataset_size,
    )


def gpu(kind: str = "cuda", vram: int = 8 * GIB, index: int = 0) -> DeviceInfo:
    return DeviceInfo(name=f"test {kind}", kind=kind, vram_total=vram, vram_free=vram, index=index)


def make_scheduler(**kw) -> Scheduler:
    args = {"dataset_size": 1200, "batch_size": 10, "sync_every": 5, "seed": 7}
    args.update(kw)
    return Scheduler(**args)


def check_partition(plan: EpochPlan, n: int) -> None:
    shards = [plan.shards[k] for k in sorted(plan.shards)]
    pos = 0
    for s in shards:
        assert s.start == pos, "shards must be contiguous in node-id order"
        assert s.stop >= s.start
        pos = s.stop
    assert pos == n
    covered = [i for s in shards for i in range(s.start, s.stop)]
    assert sorted(covered) == list(range(n))


# -- permutation ----------------------------------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**40), epoch=st.integers(0, 1000), n=st.integers(0, 500))
def test_epoch_permutation_is_a_deterministic_permutation(seed, epoch, n):
    p = epoch_permutation(seed, epoch, n)

    assert p.dtype == torch.int64
    assert torch.equal(torch.sort(p).values, torch.arange(n))
    assert torch.equal(p, epoch_permutation(seed, epoch, n))


def test_epoch_permutation_differs_by_epoch_and_seed():
    base = epoch_permutation(1, 0, 1000)

    assert not torch.equal(base, epoch_permutation(1, 1, 1000))
    assert not torch.equal(base, epoch_permutation(2, 0, 1000))
    # seed + epoch is not what is mixed in: (1, 2) and (2, 1) differ
    assert not torch.equal(epoch_permutation(1, 2, 1000), epoch_permutation(2, 1, 1000))


def test_epoch_permutation_does_not_touch_the_global_rng():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)

    epoch_permutation(5, 5, 100)

    assert torch.equal(torch.rand(3), expected)


# -- calibration and scores -----------------------------------------------------------------


def test_calibration_score_uses_the_measured_gflops():
    assert calibrated_pace(node_info(calibration=123.5)) == 123.5


@pytest.mark.parametrize(
    ("train_device", "devices", "expected"),
    [
        ("cuda:0", [gpu("cuda")], FALLBACK_GFLOPS["cuda"]),
        ("cuda:1", [gpu("rocm", index=0), gpu("rocm", index=1)], FALLBACK_GFLOPS["rocm"]),
        ("cuda:0", [], FALLBACK_GFLOPS["cuda"]),
        ("mps", [gpu("mps", vram=0)], FALLBACK_GFLOPS["mps"]),
        ("cpu", [], FALLBACK_CPU_GFLOPS_PER_CORE * 4),
    ],
)
def test_calibration_score_falls_back_by_device_kind(train_device, devices, expected):
    info = node_info(calibration=0.0, train_device=train_device, devices=devices)

    assert calibrated_pace(info) == expected


def test_score_is_calibration_until_measured_then_the_measured_pace():
    s = make_scheduler()
    s.add("a", node_info(calibration=100.0))
    s.add("b", node_info(calibration=300.0))
    assert s.pace("a") == 100.0 and s.pace("b") == 300.0  # no measurement: k = 1

    paces = {"a": 50.0}  # a: 50 samples/s from 100 GFLOP/s -> k = 0.5 sample/GFLOP
    assert s.pace("a", paces) == 50.0
    assert s.pace("b", paces) == 150.0  # b converted to samples/s on the same scale

    paces["a"] = ema(50.0, 70.0, 0.5)  # the pace book averages; the scheduler reads it
    assert s.pace("a", paces) == 60.0  # 0.5 * 50 + 0.5 * 70

    assert s.pace("a", {"a": 0.0}) == 100.0  # non-measurements are ignored


def test_scores_are_in_samples_per_s_only_once_a_node_is_measured():
    s = make_scheduler()
    s.add("a", node_info(calibration=100.0))
    s.add("b", node_info(calibration=300.0))
    assert s.measured_factor() is None  # scores are calibration units: ratios only
    assert s.measured_factor({"a": 0.0}) is None
    assert s.measured_factor({"a": 50.0}) == 0.5  # samples/s per calibration GFLOP/s
    assert Scheduler.from_dict(s.to_dict()).measured_factor({"a": 50.0}) == 0.5


def test_returning_node_keeps_its_measured_rate():
    s = make_scheduler()
    s.add("a", node_info(calibration=100.0))
    paces = {"a": 42.0}  # the pace book's, which a returning node keeps

    s.add("a", node_info(calibration=999.0))

    assert s.pace("a", paces) == 42.0


def test_unknown_node_is_a_clear_error():
    s = make_scheduler()

    with pytest.raises(SessionError, match="unknown node 'x'") as exc:
        s.pace("x")
    assert exc.value.code == "unknown_node"


# -- admission ------------------------------------------------------------------------------


def test_admit_accepts_a_matching_node():
    assert make_scheduler(min_vram=4 * GIB).admit(node_info()) is None


def test_admit_refuses_a_dataset_size_mismatch():
    refusal = make_scheduler().admit(node_info(dataset_size=1000))

    assert refusal is not None and refusal.code == "dataset_mismatch"
    assert refusal.reason == (
        "node reports a dataset of 1000 samples, the session's has 1200: "
        "every node must load the same dataset"
    )


@pytest.mark.parametrize("kind", ["cuda", "rocm"])
def test_admit_refuses_too_little_vram_on_the_train_device(kind):
    s = make_scheduler(min_vram=16 * GIB)
    info = node_info(train_device="cuda:1", devices=[gpu(kind, 24 * GIB, 0), gpu(kind, 8 * GIB, 1)])

    refusal = s.admit(info)

    assert refusal is not None and refusal.code == "refused"
    reason = refusal.reason
    assert "cuda:1" in reason and "8.0 GiB" in reason and "16.0 GiB" in reason


def test_admit_checks_vram_only_on_the_train_device_and_only_for_gpus():
    s = make_scheduler(min_vram=16 * GIB)

    ok_big = node_info(train_device="cuda:0", devices=[gpu("cuda", 24 * GIB, 0), gpu("cuda", 1)])
    cpu_node = node_info(train_device="cpu", devices=[gpu("cuda", 1 * GIB)])
    unknown = node_info(train_device="cuda:0", devices=[gpu("cuda", 0)])

    assert s.admit(ok_big) is None
    assert s.admit(cpu_node) is None
    assert s.admit(unknown) is None  # 0 means unknown: admitted


# -- planning -------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(0, 5000),
    scores=st.lists(st.floats(0.01, 1e4, allow_nan=False), min_size=1, max_size=8),
    batch=st.integers(1, 64),
    sync=st.integers(1, 50),
)
def test_plan_partitions_exactly_and_proportionally(n, scores, batch, sync):
    # Unbounded trust: the split itself is proportional (the trust bound is tested apart).
    s = make_scheduler(dataset_size=n, batch_size=batch, sync_every=sync, trust=math.inf)
    names = [f"{i:02x}" * 32 for i in range(len(scores))]
    for name, sc in zip(names, scores, strict=True):
        s.add(name, node_info(dataset_size=n, calibration=sc))

    plan = s.plan_epoch(3, list(reversed(names)), first_round=11)

    check_partition(plan, n)
    total = sum(Fraction(x) for x in scores)
    for name, sc in zip(names, scores, strict=True):
        shard = plan.shards[name]
        assert abs(shard.size - n * Fraction(sc) / total) < 1
        assert shard.steps_per_round == math.ceil(math.ceil(shard.size / batch) / plan.rounds)
    assert plan.rounds == max(1, round(n / (batch * sync * len(scores))))
    assert plan.first_round == 11 and plan.epoch == 3
    assert math.isclose(sum(sh.share for sh in plan.shards.values()), 1.0)
    assert s.plan_epoch(3, names, first_round=11) == plan  # deterministic, order-free


def test_plan_hand_example():
    s = make_scheduler(dataset_size=10, batch_size=2, sync_every=1)
    s.add("a", node_info(dataset_size=10, calibration=1.0))
    s.add("b", node_info(dataset_size=10, calibration=1.0))
    s.add("c", node_info(dataset_size=10, calibration=1.0))

    plan = s.plan_epoch(0, ["c", "a", "b"], first_round=1)

    # quotas 3.33 each: floors 3,3,3, one left goes to the first node in id order
    assert [(sh.node, sh.start, sh.stop) for sh in plan.shards.values()] == [
        ("a", 0, 4),
        ("b", 4, 7),
        ("c", 7, 10),
    ]
    assert plan.rounds == 2  # round(10 / (2 * 1 * 3)) = round(1.67)
    assert [sh.steps_per_round for sh in plan.shards.values()] == [1, 1, 1]


def test_plan_refuses_no_nodes_and_unknown_nodes():
    s = make_scheduler()

    with pytest.raises(SessionError, match="no nodes"):
        s.plan_epoch(0, [], first_round=1)
    with pytest.raises(SessionError, match="unknown node"):
        s.plan_epoch(0, ["ghost"], first_round=1)


@settings(max_examples=50, deadline=None)
@given(
    total=st.integers(0, 10**6),
    weights=st.lists(st.floats(1e-3, 1e6, allow_nan=False), min_size=1, max_size=10),
)
def test_largest_remainder_sums_and_stays_within_one(total, weights):
    parts = largest_remainder(total, weights)

    assert sum(parts) == total
    denom = sum(Fraction(w) for w in weights)
    for p, w in zip(parts, weights, strict=True):
        assert abs(p - total * Fraction(w) / denom) < 1


# -- late joiners ---------------------------------------------------------------------------


def planned(n: int = 1000, batch: int = 10, sync: int = 5) -> tuple[Scheduler, EpochPlan]:
    s = make_scheduler(dataset_size=n, batch_size=batch, sync_every=sync)
    s.add("a", node_info(dataset_size=n, calibration=100.0))
    s.add("b", node_info(dataset_size=n, calibration=300.0))
    return s, s.plan_epoch(0, ["a", "b"], first_round=1)


def test_late_joiner_takes_the_unconsumed_rest_of_an_orphan():
    _, plan = planned()  # rounds = round(1000 / 100) = 10; b: [250, 1000), 75 steps
    orphan = plan.shards["b"]
    assert plan.rounds == 10 and orphan.size == 750

    shard = plan_late(plan, "c", 50.0, rounds_done=4, orphan=orphan)

    # b's 4th barrier fell after ceil(4 * 75 / 10) = 30 steps = 300 samples
    assert (shard.node, shard.start, shard.stop) == ("c", 250 + 300, 1000)
    assert shard.steps_per_round == math.ceil(45 / 6)


def test_late_joiner_orphan_progress_can_differ_from_the_epoch_progress():
    _, plan = planned()
    orphan = plan.shards["b"]

    shard = plan_late(plan, "c", 50.0, rounds_done=4, orphan=orphan, orphan_done=2)

    assert shard.start == 250 + consumed_after(750, 10, 10, 2) == 250 + 150


def test_late_joiner_without_orphan_gets_a_proportional_slice_for_the_remaining_rounds():
    s, plan = planned()
    s.add("c", node_info(dataset_size=1000, calibration=200.0))

    shard = plan_late(plan, "c", s.pace("c"), rounds_done=5, orphan=None)

    # per round: 1000 samples * 200 / (400 * 10 rounds) = 50; 5 rounds left -> 250
    assert shard.size == 250
    assert shard.start >= 0 and shard.stop <= 1000
    assert shard == plan_late(plan, "c", s.pace("c"), 5, None)  # deterministic


# -- persistence ----------------------------------------------------------------------------


def test_to_dict_round_trips_through_json():
    s = make_scheduler(min_vram=GIB)
    s.add("a", node_info(calibration=100.0))
    s.add("b", node_info(calibration=300.0))
    paces = {"a": 12.5}

    restored = Scheduler.from_dict(json.loads(json.dumps(s.to_dict())))

    assert restored.to_dict() == s.to_dict()
    assert restored.plan_epoch(1, ["a", "b"], 5, paces) == s.plan_epoch(1, ["a", "b"], 5, paces)


def test_epoch_plan_round_trips_through_json():
    _, plan = planned()

    saved = json.loads(json.dumps(msgspec.to_builtins(plan)))
    assert msgspec.convert(saved, EpochPlan) == plan
    assert msgspec.convert(msgspec.to_builtins(plan.shards["a"]), Shard) == plan.shards["a"]


# -- shards in whole optimizer steps --------------------------------------------------------


def batching_info(n: int, batch: int, accumulate: int = 1, calibration: float = 100.0) -> NodeInfo:
    info = node_info(dataset_size=n, calibration=calibration)
    return msgspec.structs.replace(info, batch_size=batch, samples_per_step=batch * accumulate)


def batch_sizes(size: int, batch: int) -> list[int]:
    """The batches a loader without drop_last makes of a shard of ``size`` samples."""
    return [batch] * (size // batch) + ([size % batch] if size % batch else [])


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 3000),
    nodes=st.lists(
        st.tuples(st.floats(0.1, 1e3), st.integers(1, 40), st.integers(1, 4)),
        min_size=1,
        max_size=5,
    ),
    sync=st.integers(1, 20),
)
def test_shards_are_whole_steps_and_only_a_plain_runs_partial_batch(n, nodes, sync):
    s = make_scheduler(dataset_size=n, batch_size=32, sync_every=sync)
    names = [f"{i:02x}" * 32 for i in range(len(nodes))]
    for name, (score, batch, acc) in zip(names, nodes, strict=True):
        s.add(name, batching_info(n, batch, acc, calibration=score))

    plan = s.plan_epoch(0, names, first_round=1)

    shards = [plan.shards[k] for k in names]
    assert all(a.stop == b.start for a, b in zip(shards, shards[1:], strict=False))
    trained = sum(sh.size for sh in shards)
    batches = [b for _, b, _ in nodes]
    # Left out: fewer samples than one batch, and only when batch sizes differ.
    assert n - min(batches) < trained <= n if len(set(batches)) > 1 else trained == n
    partial = 0
    for sh, (_, batch, acc) in zip(shards, nodes, strict=True):
        assert (sh.batch_size, sh.samples_per_step) == (batch, batch * acc)
        sizes = batch_sizes(sh.size, batch)
        if sizes and sizes[-1] != batch:
            assert sizes[-1] == n % batch, (sh, n)  # the partial batch a plain run has too
            partial += 1
    assert partial <= 1
    # Rounds in optimizer steps: never more than the fewest steps a (non-empty) shard gives.
    steps = [
        optimizer_steps(sh.size, b, b * a) for sh, (_, b, a) in zip(shards, nodes, strict=True)
    ]
    per_step = sum(b * a for _, b, a in nodes)
    expected = max(1, round(n / (per_step * sync)))
    assert plan.rounds == max(1, min([expected, *[x for x in steps if x > 0]]))


def test_shards_hand_example_with_accumulation():
    # 250 samples, two equal nodes with batches of 16 and 4 batches per optimizer step (64
    # samples a step). Quotas 125: one whole step each (64), the next step to the first node
    # (a tie) -> 128; the remainder 58 (3 batches and the partial batch of 250 % 16 = 10 a
    # plain run has too) to the node furthest below its quota: b = 64 + 58.
    s = make_scheduler(dataset_size=250, batch_size=32, sync_every=1)
    s.add("a", batching_info(250, 16, 4))
    s.add("b", batching_info(250, 16, 4))
    plan = s.plan_epoch(0, ["a", "b"], first_round=1)
    assert [(sh.start, sh.stop) for sh in plan.shards.values()] == [(0, 128), (128, 250)]
    assert batch_sizes(122, 16) == [16] * 7 + [10]
    # Rounds count optimizer steps, not batches: 250 / (2 nodes × 64 × sync 1) ≈ 2, and each
    # shard gives 2 steps (b's last, short group steps too), so no barrier shares a step.
    assert optimizer_steps(128, 16, 64) == optimizer_steps(122, 16, 64) == 2 == plan.rounds


def test_a_late_joiner_gets_whole_steps_of_its_own():
    s = make_scheduler(dataset_size=1000, batch_size=10, sync_every=5)
    s.add("a", batching_info(1000, 10))
    s.add("b", batching_info(1000, 10))
    plan = s.plan_epoch(0, ["a", "b"], first_round=1)
    s.add("c", batching_info(1000, 16, 2))
    late = plan_late(plan, "c", s.pace("c"), 5, None, batch_size=16, samples_per_step=32)
    assert late.size % 32 == 0 and late.size >= 32 * (plan.rounds - 5)
    orphan = plan.shards["b"]
    rest = plan_late(plan, "c", 50.0, 4, orphan, batch_size=16, samples_per_step=32)
    assert rest.start == orphan.start + consumed_after(orphan.size, 10, plan.rounds, 4)
    assert rest.stop <= orphan.stop and rest.size % 16 in (0, 1000 % 16)
