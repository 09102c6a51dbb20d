"""Ranges of an epoch's permutation: a node's work as ``[start, stop)`` segments. Pure.

A node's work of an epoch is a list of ranges of the epoch's seeded permutation, consumed
front to back. Plans cut them (``scheduler.py``), re-plans move their tails
(``coordinator/replans.py``), the epoch book hands the rest of a lost node's on
(``coordinator/epochbook.py``): this is the arithmetic all three share, in one place so that
"the first ``n`` positions of a node's work" means the same thing everywhere.
"""

from __future__ import annotations

from collections.abc import Sequence

Segment = tuple[int, int]  # [start, stop) positions of an epoch's permutation
Segments = tuple[Segment, ...]


def total(segments: Sequence[Segment]) -> int:
    """Positions in ``segments``."""
    return sum(max(0, b - a) for a, b in segments)


def split(segments: Sequence[Segment], n: int) -> tuple[Segments, Segments]:
    """The first ``n`` positions of ``segments`` and the rest, as two lists of ranges."""
    head: list[Segment] = []
    tail: list[Segment] = []
    left = max(0, n)
    for a, b in segments:
        if b <= a:
            continue
        if left >= b - a:
            head.append((a, b))
            left -= b - a
        elif left > 0:
            head.append((a, a + left))
            tail.append((a + left, b))
            left = 0
        else:
            tail.append((a, b))
    return tuple(head), tuple(tail)


def normalize(segments: Sequence[Segment]) -> Segments:
    """Drop empty ranges and join ranges that continue each other."""
    out: list[Segment] = []
    for a, b in segments:
        if b <= a:
            continue
        if out and out[-1][1] == a:
            out[-1] = (out[-1][0], b)
        else:
            out.append((a, b))
    return tuple(out)


__all__ = ["Segment", "Segments", "normalize", "split", "total"]
