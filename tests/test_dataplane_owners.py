"""Who aggregates each shard: rendezvous hashing, sticky while members stay."""

from __future__ import annotations

from collections import Counter

import pytest

from lightning_drift.dataplane.owners import assign, audit_pick, epoch_seed, ranking


def _ids(n: int) -> list[str]:
    return [f"{i:064x}" for i in range(1, n + 1)]


def test_every_shard_gets_two_distinct_members_whatever_their_order() -> None:
    members = _ids(6)
    seed = epoch_seed("s1", 0, b"n")
    owners = assign(members, seed, 16)
    assert [o.index for o in owners] == list(range(16))
    assert all(o.primary != o.mirror and {o.primary, o.mirror} <= set(members) for o in owners)
    assert assign(list(reversed(members)), seed, 16) == owners


def test_one_member_aggregates_alone_and_none_is_an_error() -> None:
    (only,) = _ids(1)
    assert all(o.primary == only and o.mirror == "" for o in assign([only], b"s", 4))
    with pytest.raises(ValueError, match="no members"):
        assign([], b"s", 4)


def test_a_leaver_moves_only_its_own_shards_and_its_mirror_takes_over() -> None:
    members = _ids(12)
    seed = epoch_seed("s1", 3, b"n")
    before = assign(members, seed, 64)
    gone = members[4]
    after = assign([m for m in members if m != gone], seed, 64)
    for b, a in zip(before, after, strict=True):
        if not b.holds(gone):
            assert a == b
        elif b.primary == gone:
            assert a.primary == b.mirror  # the mirror has every piece already
        else:
            assert a.primary == b.primary


def test_a_joiner_takes_only_shards_whose_draws_it_wins() -> None:
    members = _ids(10)
    seed = epoch_seed("s1", 1, b"n")
    before = assign(members, seed, 64)
    new = "f" * 64
    after = assign([*members, new], seed, 64)
    for b, a in zip(before, after, strict=True):
        if not a.holds(new):
            assert a == b


def test_the_seed_holds_the_coordinators_nonce() -> None:
    assert epoch_seed("s1", 0, b"a") != epoch_seed("s1", 0, b"b")
    assert epoch_seed("s1", 0, b"a") == epoch_seed("s1", 0, b"a")


def test_epochs_reshuffle_and_load_spreads() -> None:
    members = _ids(32)
    e0 = assign(members, epoch_seed("s1", 0, b"n"), 64)
    e1 = assign(members, epoch_seed("s1", 1, b"n"), 64)
    assert sum(a != b for a, b in zip(e0, e1, strict=True)) > 32
    per = Counter(m for o in e0 for m in (o.primary, o.mirror))
    assert sum(per.values()) == 128 and max(per.values()) <= 12  # 4 expected each


def test_the_referee_is_neither_of_the_two_that_disagree() -> None:
    members = _ids(5)
    seed = epoch_seed("s1", 0, b"n")
    o = assign(members, seed, 3)[2]
    r = ranking(members, seed, 2)[2]  # the books ask the next in the ranking
    assert r in members and r not in (o.primary, o.mirror)
    assert ranking(members[:2], seed, 2)[2:] == []  # two members: nobody left to ask


def test_the_audited_shard_follows_the_coordinators_secret() -> None:
    picks = [audit_pick(b"secret", r, 16) for r in range(200)]
    assert all(0 <= p < 16 for p in picks) and len(set(picks)) == 16  # every shard in turn
    assert picks == [audit_pick(b"secret", r, 16) for r in range(200)]
    assert picks != [audit_pick(b"other", r, 16) for r in range(200)]
