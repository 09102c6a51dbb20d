"""The node's part of an epoch: a sampler over the work the coordinator assigned.

Torch only (no Lightning): the strategy puts :class:`ShardSampler` into the train
dataloader; anything else that trains on a drift shard can use it the same way.

A node's work of an epoch is a list of ranges of the epoch's permutation, trained in order.
The coordinator may re-plan the rest of an epoch while the node trains it (the work list
grows or shrinks at its tail, see ``lightning_drift.coordinator.replans``): :meth:`ShardSampler.update`
swaps the part not yet handed out, and the running iteration follows.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized
from typing import Any

import torch
from torch.utils.data import IterableDataset, Sampler

from lightning_drift.errors import ConfigError
from lightning_drift.protocol import ShardAssignment
from lightning_drift.scheduler import epoch_permutation


def map_style(dataset: Any) -> Sized:
    """``dataset``, which a node shards by index: refused (``ConfigError`` with the fix) when
    it is not a map-style dataset (one with ``__len__`` and ``__getitem__``)."""
    if isinstance(dataset, IterableDataset) or not isinstance(dataset, Sized):
        raise ConfigError(
            "DriftStrategy shards a map-style dataset (one with __len__ and __getitem__); the "
            f"train dataset is a {type(dataset).__name__}. Wrap your data in a map-style "
            "Dataset so the coordinator can give each node its own indices."
        )
    return dataset


class ShardSampler(Sampler[int]):
    """Yields this node's work of one epoch: the dataset indices at its positions of the
    epoch's permutation, range after range.

    ``yielded`` counts the indices handed out by the current iteration (a data loader reads
    ahead of training, so it can be more than what was trained)."""

    def __init__(self, indices: torch.Tensor, perm: torch.Tensor | None = None) -> None:
        self._order: list[int] = indices.tolist()
        self._perm = perm
        self.yielded = 0

    @classmethod
    def for_assignment(cls, assignment: ShardAssignment, dataset_size: int) -> ShardSampler:
        """The sampler of ``assignment`` over a dataset of ``dataset_size`` samples: every node
        and the coordinator derive the same permutation from the session's seed and the epoch."""
        perm = epoch_permutation(assignment.seed, assignment.epoch, dataset_size)
        return cls(_take(perm, assignment.ranges), perm)

    @classmethod
    def empty(cls) -> ShardSampler:
        """A sampler with nothing to train on (the session is over)."""
        return cls(torch.empty(0, dtype=torch.long))

    def __iter__(self) -> Iterator[int]:
        # Reads the order at every step, so an update made while the iteration runs is
        # followed (the data loader pulls indices one batch at a time).
        self.yielded = 0
        while self.yielded < len(self._order):
            i = self._order[self.yielded]
            self.yielded += 1
            yield i

    def __len__(self) -> int:
        return len(self._order)

    def update(self, ranges: Sequence[tuple[int, int]]) -> int:
        """Make ``ranges`` (of the epoch's permutation) the epoch's whole work; returns how many
        indices already handed out the new work does not hold.

        What was handed out stays handed out. The rest of the order becomes the new work's
        positions not handed out yet, in order, so a re-plan that keeps the trained prefix
        (the coordinator's do) continues seamlessly. A positive return means the loader had
        read past the new end: those samples are trained here and by the node they moved to.
        """
        if self._perm is None:
            raise ValueError("this sampler was not made from an assignment; it cannot follow one")
        new = _take(self._perm, ranges).tolist()
        done = self._order[: self.yielded]
        handed = set(done)
        overrun = len(handed - set(new))
        self._order = done + [i for i in new if i not in handed]
        return overrun


def _take(perm: torch.Tensor, ranges: Sequence[tuple[int, int]]) -> torch.Tensor:
    parts = [perm[a:b] for a, b in ranges if b > a]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.long)


__all__ = ["map_style", "ShardSampler"]
