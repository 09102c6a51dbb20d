"""Who aggregates each shard: rendezvous hashing over the session's members. Pure.

Every member draws for every shard with ``sha256(seed | shard | member)``; a shard's
**primary** is its member with the highest draw and its **mirror** the next one. The
``seed`` is fixed for an epoch (:func:`epoch_seed`), so the assignment is sticky: when a
member leaves, only the shards it aggregated get a new primary or mirror (its mirror becomes
the primary), and nothing else moves. A new epoch's seed reshuffles, so no pair of members
keeps a shard for the whole session.

Who may hold a seat. A member's draws depend on its id (its public key) and the seed; a
hostile node that knew the seed could make keys until one draws high for the shard it wants.
So the seed holds a nonce the coordinator draws at random when the epoch begins
(:func:`epoch_seed`), and the members that draw are those of that moment: a node that joins
during the epoch, when the seed is known, takes a seat only from the next epoch on (the
caller passes the epoch's members, not the live ones).
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Owners:
    """Shard ``index``'s aggregators: the primary and the mirror ("" with a single member)."""

    index: int
    primary: str
    mirror: str

    def holds(self, node: str) -> bool:
        return node in (self.primary, self.mirror)


def epoch_seed(session: str, epoch: int, nonce: bytes) -> bytes:
    """The seed of an epoch's assignment; ``nonce``: random bytes the coordinator draws when
    the epoch begins (and keeps with the session's state)."""
    what = f"drift/owners/1 {session} {epoch} ".encode()
    return hashlib.sha256(what + bytes(nonce)).digest()


def draw(seed: bytes, shard: int, member: str) -> bytes:
    """A member's rendezvous draw for a shard (compared as bytes: higher wins)."""
    return hashlib.sha256(seed + shard.to_bytes(4, "big") + member.encode()).digest()


def ranking(members: Sequence[str], seed: bytes, shard: int) -> list[str]:
    """``members`` (distinct ids) from the highest draw for ``shard`` to the worst: the primary,
    the mirror, then whom to ask next when one of them is lost or outvoted."""
    return sorted(set(members), key=lambda m: draw(seed, shard, m), reverse=True)


@functools.lru_cache(maxsize=8)
def rankings(members: tuple[str, ...], seed: bytes, count: int) -> tuple[tuple[str, ...], ...]:
    """:func:`ranking` of every shard, kept while the members and the seed stay the same: a
    thousand members' draws for 16 shards are some 20 ms, and every round of an epoch needs
    the same ones."""
    return tuple(tuple(ranking(members, seed, j)) for j in range(count))


def assign(members: Sequence[str], seed: bytes, count: int) -> list[Owners]:
    """Each of ``count`` shards' primary and mirror among ``members`` (distinct ids; order
    does not matter). ValueError for no members."""
    if not members:
        raise ValueError("no members to aggregate the shards")
    out: list[Owners] = []
    for j in range(count):
        ranked = ranking(members, seed, j)
        out.append(Owners(j, ranked[0], ranked[1] if len(ranked) > 1 else ""))
    return out


def audit_pick(secret: bytes, round_no: int, count: int) -> int:
    """The shard the coordinator recomputes after ``round_no``: drawn from a secret only it
    holds, so no pair of seats can know in advance whether its shard is the one checked."""
    digest = hashlib.sha256(b"drift/audit/1 " + bytes(secret) + round_no.to_bytes(8, "big"))
    return int.from_bytes(digest.digest(), "big") % max(1, count)


__all__ = ["Owners", "assign", "audit_pick", "draw", "epoch_seed", "ranking", "rankings"]
