"""The upload core without a network: admit and accept over a real Session and Rounds in a
temp dir, asserting the answers and the effects they return (the server only carries those
out)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from support import node_info, small_fingerprint, small_model

from lightning_drift import codec
from lightning_drift.aggregate import to_bytes
from lightning_drift.checkpoint import CheckpointStore
from lightning_drift.coordinator.config import SessionConfig
from lightning_drift.coordinator.effects import Effects
from lightning_drift.coordinator.rounds import Rounds
from lightning_drift.coordinator.session import Session, Verdict
from lightning_drift.coordinator.state import StateDir
from lightning_drift.coordinator.uploads import Admit, Unread, Uploads
from lightning_drift.protocol import BarrierSync

A, B = "a" * 64, "b" * 64


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def core(tmp_path: Path, nodes=(A,), **cfg) -> tuple[Uploads, Clock]:
    base = dict(epochs=1, batch_size=10, sync_every=10, min_nodes=1, dataset_size=200)
    base.update(cfg)
    clock = Clock()
    session = Session(SessionConfig(**base), session_id="s1", now=clock.now)
    state = StateDir(tmp_path / "state")
    state.ensure()
    rounds = Rounds(session, CheckpointStore(tmp_path / "ckpt"), state, clock=clock)
    for n in nodes:
        assert session.join(n, n[:1], clock.now).ok
        d = session.admit(n, node_info(200, small_fingerprint()), clock.now)
        assert d.ok, d.reason
    return Uploads(session, rounds, max_model_bytes=1 << 20), clock


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def started(up: Uploads, clock: Clock, *nodes: str) -> None:
    """Round 0 from the first node's weights; every node gets its shard."""
    first = up.admit(nodes[0], BarrierSync(round=0), clock.now)
    assert first.kind is Admit.READ and first.check is not None
    done = await up.accept(nodes[0], BarrierSync(round=0), to_bytes(small_model()), clock.now)
    assert done.answer.verdict.kind is Verdict.INITIAL
    assert any("round 0: start-up weights" in e for e in done.effects.events)
    for n in nodes:
        assert up.session.shard(n, 0, clock.now).assignment is not None


def moved(delta: float = 0.01) -> dict[str, torch.Tensor]:
    return {k: v + delta if v.is_floating_point() else v for k, v in small_model().items()}


def test_the_start_up_weights_become_round_0_and_a_second_node_gets_them(tmp_path):
    async def main():
        up, clock = core(tmp_path, nodes=(A, B))
        await started(up, clock, A)
        assert up.rounds.current is not None and up.rounds.current.completed_round == 0
        # The second node's start-up weights do not count: drained, answered with round 0's.
        adm = up.admit(B, BarrierSync(round=0), clock.now)
        assert adm.kind is Admit.DRAIN and adm.answer.verdict.kind is Verdict.CURRENT
        ready = await adm.answer.ready("")
        assert ready.frame.round == 0 and ready.payload == "weights"
        assert not ready.frame.contributed

    run(main())


def test_a_counted_upload_returns_the_decision_that_completes_its_round(tmp_path):
    async def main():
        up, clock = core(tmp_path)
        await started(up, clock, A)
        sync = BarrierSync(round=1, samples=10, train_seconds=1.0)
        assert up.admit(A, sync, clock.now).kind is Admit.READ
        done = await up.accept(A, sync, to_bytes(moved()), clock.now)
        assert done.answer.verdict.kind is Verdict.OPEN and not done.effects.banned
        decision = done.effects.decision
        assert decision is not None and decision.complete and decision.open_round == 1
        # Completing is the server's to start (once); what it returns says what follows.
        assert up.rounds.consider(decision) and not up.rounds.consider(decision)
        after = await up.rounds.complete(decision)
        assert after.completed is not None and after.completed.completed_round == 1
        assert not after.failed
        ready = await done.answer.ready(up.rounds.current.sha256)
        assert ready.frame.round == 1 and ready.frame.contributed and ready.payload == "same"

    run(main())


def test_refusals_and_uploads_that_do_not_count_are_decided_before_the_body(tmp_path):
    async def main():
        up, clock = core(tmp_path)
        await started(up, clock, A)
        ahead = up.admit(A, BarrierSync(round=5), clock.now)
        assert ahead.kind is Admit.REFUSE and ahead.answer.refused
        assert ahead.answer.verdict.code == "bad_round"
        stranger = up.admit(B, BarrierSync(round=1), clock.now)
        assert stranger.kind is Admit.REFUSE and stranger.answer.verdict.code == "not_joined"
        # A delta against other weights than the global ones is left out, its body drained.
        stale = BarrierSync(round=1, delta=True, base_round=3)
        adm = up.admit(A, stale, clock.now)
        assert adm.kind is Admit.DRAIN and adm.answer.verdict.kind is Verdict.LEFT_OUT

    run(main())


def test_a_round_that_moved_on_while_the_body_arrived_is_decided_again(tmp_path):
    async def main():
        up, clock = core(tmp_path)
        await started(up, clock, A)
        sync = BarrierSync(round=1, samples=10)
        assert up.admit(A, sync, clock.now).kind is Admit.READ
        done = await up.accept(A, sync, to_bytes(moved()), clock.now)
        decision = done.effects.decision
        assert decision is not None and up.rounds.consider(decision)
        await up.rounds.complete(decision)
        # The same upload again, now that round 1 has completed: not counted, no effects.
        again = await up.accept(A, sync, to_bytes(moved()), clock.now)
        assert again.answer.verdict.kind is Verdict.CURRENT and not again.effects

    run(main())


def test_a_bad_upload_is_refused_with_a_strike_and_enough_of_them_ban(tmp_path):
    async def main():
        up, clock = core(tmp_path, max_strikes=2)
        await started(up, clock, A)
        sync = BarrierSync(round=1, samples=10)
        first = await up.accept(A, sync, b"not safetensors", clock.now)
        assert first.answer.refused and first.answer.verdict.code == "bad_upload"
        assert any("failed upload 1/2" in e for e in first.effects.events)
        assert not first.effects.banned
        second = up.unread(A, sync, Unread.BAD_HEADER, "not the model", clock.now)
        assert second.answer.refused and second.effects.banned
        assert second.effects.banned[0][0] == A

    run(main())


def test_a_slow_or_too_large_body_is_reported_not_accepted(tmp_path):
    async def main():
        up, clock = core(tmp_path)
        slow0 = up.unread(A, BarrierSync(round=0), Unread.TOO_SLOW, "below 1 B/s", clock.now)
        assert slow0.answer.verdict.code == "too_slow"
        assert slow0.effects.events == [slow0.effects.events[0]]
        assert "upload dropped" in slow0.effects.events[0]
        await started(up, clock, A)
        big = up.unread(A, BarrierSync(round=1), Unread.TOO_LARGE, "too big", clock.now)
        assert big.answer.verdict.code == "too_large"
        assert any("failed upload" in e for e in big.effects.events)  # a strike
        slow = up.unread(A, BarrierSync(round=1), Unread.TOO_SLOW, "below 1 B/s", clock.now)
        assert not any("failed upload" in e for e in slow.effects.events)  # no strike

    run(main())


def test_a_delta_against_the_global_weights_counts(tmp_path):
    async def main():
        up, clock = core(tmp_path)
        await started(up, clock, A)
        current = up.rounds.current
        assert current is not None and up.rounds.global_sd is not None
        enc = codec.encode(codec.difference(moved(), up.rounds.global_sd), "int8", None)
        sync = BarrierSync(
            round=1, samples=10, delta=True, base_round=0, base_sha256=current.sha256
        )
        assert up.admit(A, sync, clock.now).kind is Admit.READ
        done = await up.accept(A, sync, enc.payload, clock.now)
        assert done.answer.verdict.kind is Verdict.OPEN, done.answer.verdict.reason

    run(main())


def test_effects_add_in_order_and_the_later_decision_wins():
    a = Effects(events=["one"], banned=[("x", "why")])
    b = Effects(events=["two"], failed="disk full")
    a.add(b)
    assert a.events == ["one", "two"] and a.banned == [("x", "why")] and a.failed
    assert not Effects() and bool(Effects(events=["e"]))


if __name__ == "__main__":
    raise SystemExit(pytest.main([__file__, "-q"]))


def test_uploads_waiting_for_a_round_get_the_final_weights_when_the_session_finishes(tmp_path):
    """A round that will never complete (the session finished on an earlier one) must not
    hold the uploads that wait for it: the finish answers them with the final weights."""

    async def main():
        up, clock = core(tmp_path, nodes=(A, B))
        await started(up, clock, A, B)
        waiting = asyncio.ensure_future(up.rounds.published(5))
        await asyncio.sleep(0)
        assert not waiting.done()
        assert up.rounds.release_waiters() == 1
        weights = await asyncio.wait_for(waiting, 5)
        assert weights is up.rounds.current and weights.completed_round == 0
        assert up.rounds.release_waiters() == 0

    run(main())
