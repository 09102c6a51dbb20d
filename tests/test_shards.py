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
