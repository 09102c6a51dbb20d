"""Sharded rounds between members on real iroh endpoints: every round's weights are the
star's, bytes stay within their bounds, and the faults of a round are survived."""

from __future__ import annotations

import asyncio

from dataplane_cases import local, model
from shardsim import Simulation, flip_one_value


def _payloads(sim: Simulation, upload_round: int) -> dict[str, bytes]:
    return {
        n: sim.change_of(n, local(sim.global_sd, i, upload_round)) for i, n in enumerate(sim.live)
    }


async def _rounds(n: int, shards: int, rounds: int, **faults):
    sim = Simulation(model(), shards=shards)
    await sim.open(n)
    out = []
    try:
        for r in range(1, rounds + 1):
            payloads = _payloads(sim, r)
            weights = {node: 10.0 + i for i, node in enumerate(sorted(payloads))}
            kw = faults.pop(r, {})
            out.append(await sim.round(r, payloads, weights, **kw))
    finally:
        await sim.close()
    return sim, out


def test_honest_members_end_every_round_on_the_stars_weights_within_their_byte_bounds() -> None:
    sim, figures = asyncio.run(asyncio.wait_for(_rounds(6, 4, 3), 240))
    for f in figures:
        assert f.equal and not f.struck and not f.unchanged
        for n in f.pushed:
            assert f.pushed[n] <= 2 * f.encoded  # its pieces to two seats each, at most
            assert f.fetched[n] <= f.encoded  # the result pieces it did not compute
        assert sum(f.fetched.values()) > 0
    assert len({f.weights_sha for f in figures}) == 3  # the weights moved every round


def test_a_lying_computer_is_outvoted_and_struck() -> None:
    async def go():
        sim = Simulation(model(), shards=4)
        await sim.open(5)
        try:
            payloads = _payloads(sim, 1)
            seat = sim.members[sim.live[0]].seats[2]
            lies = {(seat.mirror, 2): flip_one_value}
            f = await sim.round(1, payloads, dict.fromkeys(payloads, 1.0), lies=lies)
            return seat.mirror, f
        finally:
            await sim.close()

    liar, f = asyncio.run(asyncio.wait_for(go(), 240))
    assert f.equal and f.struck == [liar]


def test_a_primary_lost_before_it_computes_is_replaced_and_every_round_is_the_stars() -> None:
    async def go():
        sim = Simulation(model(), shards=3)
        await sim.open(5)
        try:
            out = [await sim.round(1, _payloads(sim, 1), dict.fromkeys(sim.live, 2.0))]
            primary = sim.members[sim.live[0]].seats[1].primary
            payloads = _payloads(sim, 2)
            out.append(
                await sim.round(
                    2, payloads, dict.fromkeys(payloads, 2.0), kill_before_compute=[primary]
                )
            )
            payloads = _payloads(sim, 3)
            out.append(await sim.round(3, payloads, dict.fromkeys(payloads, 2.0)))
            return out, primary, sim
        finally:
            await sim.close()

    figures, gone, sim = asyncio.run(asyncio.wait_for(go(), 240))
    # With DiLoCo, round 2 equals the star only if the member that took shard 1 over
    # fetched the momentum and residual its mirror carried (by hash).
    assert all(f.equal and not f.struck and not f.restarted for f in figures)
    assert gone in sim.killed


def test_both_seats_lost_restart_their_shards_state_and_the_round_still_completes() -> None:
    async def go():
        sim = Simulation(model(), shards=3)
        await sim.open(6)
        try:
            await sim.round(1, _payloads(sim, 1), dict.fromkeys(sim.live, 2.0))
            seat = sim.members[sim.live[0]].seats[2]
            payloads = _payloads(sim, 2)
            f = await sim.round(
                2,
                payloads,
                dict.fromkeys(payloads, 2.0),
                kill_before_compute=[seat.primary, seat.mirror],
            )
            return f, seat
        finally:
            await sim.close()

    f, seat = asyncio.run(asyncio.wait_for(go(), 240))
    assert 2 in f.restarted and not f.unchanged
    # Their own pieces of shard 2 died with them: the round went on without their uploads.
    assert f.left_out == sorted([seat.primary, seat.mirror])
    assert not f.equal  # the star kept shard 2's momentum; the sharded plane could not


def test_a_colluding_pair_of_seats_is_caught_by_the_coordinators_audit() -> None:
    async def go():
        sim = Simulation(model(), shards=3)
        await sim.open(5)
        try:
            await sim.round(1, _payloads(sim, 1), dict.fromkeys(sim.live, 1.0))
            seat = sim.members[sim.live[0]].seats[0]
            lies = {(seat.primary, 0): flip_one_value, (seat.mirror, 0): flip_one_value}
            payloads = _payloads(sim, 2)
            honest = await sim.round(2, payloads, dict.fromkeys(payloads, 1.0), audit=1)
            payloads = _payloads(sim, 3)
            caught = await sim.round(3, payloads, dict.fromkeys(payloads, 1.0), lies=lies, audit=0)
            return seat, honest, caught
        finally:
            await sim.close()

    seat, honest, caught = asyncio.run(asyncio.wait_for(go(), 240))
    assert honest.equal and honest.audited == {}
    # The pair agreed, so their result stood and was published ...
    assert not caught.equal and not caught.struck
    # ... and the coordinator's own recomputation names them both.
    assert set(caught.audited) == {seat.primary, seat.mirror}
    assert all("failed the coordinator's recomputation" in why for why in caught.audited.values())
