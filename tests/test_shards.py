"""The node's shard of an epoch: a sampler over the coordinator's assignment (no Lightning)."""

from __future__ import annotations

import torch

from lightning_drift.node.shards import ShardSampler
from lightning_drift.protocol import ShardAssignment
from lightning_drift.scheduler import epoch_permutation


def test_shard_sampler_yields_exactly_its_indices():
    idx = torch.tensor([5, 3, 9])
    s = ShardSampler(idx)
    assert list(s) == [5, 3, 9] and len(s) == 3


def test_the_shards_of_an_epoch_cover_the_dataset_once():
    n = 103
    a = ShardAssignment(epoch=2, start=0, stop=40, rounds=2, first_round=5, seed=9)
    b = ShardAssignment(epoch=2, start=40, stop=n, rounds=3, first_round=5, seed=9)
    seen = list(ShardSampler.for_assignment(a, n)) + list(ShardSampler.for_assignment(b, n))
    assert sorted(seen) == list(range(n))
    assert seen == epoch_permutation(9, 2, n).tolist()  # the coordinator's order


def test_an_empty_sampler_yields_nothing():
    assert list(ShardSampler.empty()) == [] and len(ShardSampler.empty()) == 0


def _assignment(*ranges: tuple[int, int], revision: int = 0) -> ShardAssignment:
    return ShardAssignment(
        epoch=1,
        start=ranges[0][0],
        stop=ranges[0][1],
        rounds=4,
        first_round=1,
        seed=3,
        segments=list(ranges) if len(ranges) > 1 else [],
        revision=revision,
    )


def test_an_assignment_of_several_ranges_yields_them_in_order():
    n = 50
    perm = epoch_permutation(3, 1, n).tolist()
    a = _assignment((0, 10), (30, 35))
    assert a.ranges == [(0, 10), (30, 35)] and a.size == 15
    assert list(ShardSampler.for_assignment(a, n)) == perm[0:10] + perm[30:35]


def test_a_running_iteration_follows_a_re_plan_that_grows_or_shrinks_the_tail():
    n = 60
    perm = epoch_permutation(3, 1, n).tolist()
    s = ShardSampler.for_assignment(_assignment((0, 20)), n)
    it = iter(s)
    first = [next(it) for _ in range(8)]
    # The coordinator gives this node a donor's tail: the iteration runs on into it.
    assert s.update([(0, 20), (40, 50)]) == 0
    assert len(s) == 30
    assert first + list(it) == perm[0:20] + perm[40:50]
    # Next epoch-like pass: shrink to [0, 12) after 10 yielded: nothing is lost or repeated.
    it = iter(s)
    head = [next(it) for _ in range(10)]
    assert s.update([(0, 12)]) == 0
    assert head + list(it) == perm[0:12]


def test_a_re_plan_that_cuts_below_what_was_loaded_reports_the_overrun():
    n = 40
    perm = epoch_permutation(3, 1, n).tolist()
    s = ShardSampler.for_assignment(_assignment((0, 20)), n)
    it = iter(s)
    got = [next(it) for _ in range(15)]
    assert s.update([(0, 10)]) == 5  # five samples already handed out moved elsewhere
    assert got + list(it) == perm[0:15]  # nothing more, nothing twice here


def test_a_sampler_not_made_from_an_assignment_cannot_follow_one():
    import pytest

    with pytest.raises(ValueError, match="assignment"):
        ShardSampler(torch.tensor([1, 2])).update([(0, 1)])
