"""The roster: joins, caps, unique names, heartbeats, forgetting, strikes and bans."""

from __future__ import annotations

import msgspec

from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.roster import GONE, MemberState, Roster

A, B, C = ("a" * 64, "b" * 64, "c" * 64)


def config(**kw) -> SessionConfig:
    return SessionConfig(**{"dataset_size": 100, **kw})


def test_join_reconnect_and_rejoin_say_what_happened():
    r = Roster()
    assert r.join(A, "a", 1.0, "t", config(), False).reason == f"node {A[:8]} joined"
    assert "reconnected (was joined)" in r.join(A, "a", 2.0, "t", config(), False).reason
    r.gone(A, "bye", 3.0, left=True)
    assert "rejoined (was left)" in r.join(A, "a", 4.0, "t", config(), False).reason
    assert r.members[A].state is MemberState.JOINED and r.members[A].joined_at == 4.0


def test_caps_on_live_members_and_per_token():
    r = Roster()
    c = config(max_nodes=2, max_nodes_per_token=1)
    assert r.join(A, "a", 0.0, "t1", c, False).ok
    d = r.join(B, "b", 0.0, "t1", c, False)
    assert not d.ok and d.code == "too_many_nodes" and "--max-nodes-per-token" in d.reason
    assert r.join(B, "b", 0.0, "t2", c, False).ok
    d = r.join(C, "c", 0.0, "t3", c, False)
    assert not d.ok and "--max-nodes" in d.reason
    assert r.join(C, "c", 0.0, "t3", c, True).ok  # finished: may fetch the final weights
    assert r.members[C].state is MemberState.LEFT


def test_names_are_made_unique():
    r = Roster()
    for n in (A, B, C):
        r.join(n, "gpu", 0.0, "", config(), False)
    assert [m.name for m in r.members.values()] == ["gpu", "gpu#2", "gpu#3"]


def test_heartbeat_timeouts_and_forgetting():
    r = Roster()
    r.join(A, "a", 0.0, "", config(), False)
    r.join(B, "b", 0.0, "", config(), False)
    r.seen(B, 9.0)
    ((node, why),) = r.timed_out(10.0, 5.0)
    assert node == A and why == "no message for 10.0s (heartbeat timeout 5s)"
    r.gone(A, why, 10.0, left=False)
    assert r.members[A].state in GONE
    assert r.forget(20.0, after_s=60.0, keep_max=8) == []
    assert r.forget(71.0, after_s=60.0, keep_max=8) == [A] and A not in r.members


def test_strikes_then_a_ban_refuses_the_key():
    r = Roster()
    r.join(A, "a", 0.0, "", config(), False)
    assert not r.strike(A, 2).ok
    assert r.strike(A, 2).ok
    d = r.ban(A, "2 failed uploads", 1.0)
    assert d.code == "excluded" and r.members[A].state is MemberState.BANNED
    refused = r.join(A, "a", 2.0, "", config(), False)
    assert not refused.ok and refused.code == "excluded"


def test_the_roster_round_trips_and_a_restore_gives_a_reconnect_grace():
    r = Roster()
    r.join(A, "a", 0.0, "", config(), False)
    r.join(B, "b", 0.0, "", config(), False)
    r.gone(B, "bye", 1.0, left=True)
    r.admitted.add(A)
    back = msgspec.convert(msgspec.to_builtins(r), Roster)
    back.restored(100.0, 15.0)
    assert back.members[A].state is MemberState.TRAINING and back.members[A].last_seen == 115.0
    assert back.members[B].state is MemberState.LEFT and back.members[B].gone_at == 1.0
    assert back.admitted == {A}
