"""The node's part of an epoch: a sampler over the shard the coordinator assigned.

Torch only (no Lightning): the strategy puts :class:`ShardSampler` into the train
dataloader; anything else that trains on a drift shard can use it the same way.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler

from lightning_drift.protocol import ShardAssignment
from lightning_drift.scheduler import epoch_permutation


class ShardSampler(Sampler[int]):
    """Yields this node's shard of one epoch: positions ``start:stop`` of the epoch's permutation."""

    def __init__(self, indices: torch.Tensor) -> None:
        self.indices = indices

    @classmethod
    def for_assignment(cls, assignment: ShardAssignment, dataset_size: int) -> ShardSampler:
        """The sampler of ``assignment`` over a dataset of ``dataset_size`` samples: every node
        and the coordinator derive the same permutation from the session's seed and the epoch."""
        perm = epoch_permutation(assignment.seed, assignment.epoch, dataset_size)
        return cls(perm[assignment.start : assignment.stop])

    @classmethod
    def empty(cls) -> ShardSampler:
        """A sampler with nothing to train on (the session is over)."""
        return cls(torch.empty(0, dtype=torch.long))

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices.tolist())

    def __len__(self) -> int:
        return len(self.indices)


__all__ = ["ShardSampler"]
