"""Claims are not evidence: a hostile node's numbers about itself against a live coordinator.

What a node says about itself (its speed, its samples, where it is) and how fast its uploads
come back may shape only its own share; the honest nodes' work and the round's clock rest on
what the coordinator received and measured. Each test drives a hostile client by hand next
to honest ones over real iroh (the helpers of ``test_hostile.py``) and checks that the honest
session completes with finite checkpoints that verify, and that the log names the node and
the reason.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from support import honest_step, small_model
from test_hostile import (
    coordinator,
    finish,
    finite,
    honest,
    honest_epochs,
    honest_finished,
    join,
    logged,
    run,
    status,
    until,
)

from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.protocol import BarrierSync, TrainProgress

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="lightning_drift")


def test_a_node_claiming_speed_and_returning_its_weights_at_once_takes_no_work(tmp_path, caplog):
    """A node saying it trains 10^7 samples/s and sending its weights back unchanged the
    moment each round opens, claiming a billion samples: its uploads show no training, so
    they weigh nothing, measure nothing and are strikes; no re-plan moves the honest nodes'
    work to it, its next epoch's share is no larger than theirs, and every global weight is
    theirs."""

    async def main():
        coord = coordinator(tmp_path, epochs=2, max_strikes=50)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = await join(coord, "a"), await join(coord, "b")
        evil = await join(coord, "evil")
        tasks = [asyncio.create_task(honest_epochs(c, i, 2)) for i, c in enumerate((a, b))]
        ready, blob = await evil.barrier(BarrierSync(round=0), to_bytes(small_model()))
        held, sizes = from_bytes(blob), {}
        for epoch in range(2):
            shard = await evil.shard(epoch)
            sizes[epoch] = shard.size
            for k in range(shard.rounds):
                r = shard.first_round + k
                await evil.progress(
                    TrainProgress(round=r, epoch=epoch, step=k, samples=10**9, samples_per_s=1e7)
                )
                ready, blob = await evil.barrier(
                    BarrierSync(round=r, epoch=epoch, samples=10**9, epoch_samples=shard.size),
                    to_bytes(held),
                )
                held = from_bytes(blob)
                # No re-plan gave the fast-looking node more of the epoch.
                mine = coord.session.assignments.get(evil.node_key)
                assert mine is None or mine.epoch != epoch or mine.size <= shard.size
        finals = await asyncio.gather(*tasks)
        await status(coord)
        await finish(coord, runner, a, b, evil)
        return finals, sizes, evil.node_key

    finals, sizes, evil = run(main())
    entries = honest_finished(tmp_path, finals)
    # Its calibrated share of 900 samples among three equal nodes (a batch either way).
    assert sizes[0] <= 310 and sizes[1] <= 310, sizes
    # It arrived (no round waited for it), weighing nothing: every global weight is theirs.
    weights = [w for e in entries for n, w in e["contributors"] if n == evil]
    assert weights and all(w == 0 for w in weights), weights
    logged(caplog, f"node {evil[:8]} upload for round 1 shows no training", "unchanged")
    logged(caplog, f"node {evil[:8]}: failed upload 1/50")
    assert not [
        r for r in caplog.records if "moved" in r.getMessage() and evil[:8] + " +" in r.getMessage()
    ]


def test_a_node_measured_slow_once_cannot_hold_the_rounds_after_a_quorum(tmp_path, caplog):
    """Two nodes: the hostile one arrives late in round 1 claiming one sample (so that it is
    measured at well under a sample a second, the median of a two-node session), then stops
    uploading while it keeps its connection alive. By its pace the next deadline would be
    minutes away; the honest node, a quorum, arrived at once: each round closes a margin over
    what it took (the floor), and the session ends in seconds."""

    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=600, deadline_floor=4.0)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, evil = await join(coord, "a"), await join(coord, "evil")
        ready, blob = await evil.barrier(BarrierSync(round=0), to_bytes(small_model()))
        honest_task = asyncio.create_task(honest(a, 0))
        shard = await evil.shard(0)
        await asyncio.sleep(1.2)  # within the round's floor: it counts, and is measured slow
        await evil.progress(TrainProgress(round=1, epoch=0, step=0, samples=0, samples_per_s=1e-3))
        ready, _ = await evil.barrier(
            BarrierSync(round=1, samples=1, train_seconds=1e6),
            to_bytes(honest_step(from_bytes(blob), 1, 5)),
        )
        assert ready.contributed, ready.reason
        s = coord.session
        pace = s.paces.of(evil.node_key).measured
        assert 0 < pace < 2.0  # one sample in over a second
        by_pace = shard.size / shard.rounds / pace * s.config.deadline_margin
        assert by_pace > 60.0  # what the old deadline would have waited

        def held_in_round_2() -> bool:
            return s.open_round == 2 and a.node_key in s.arrivals

        await until(held_in_round_2, "the honest node arrived in round 2")
        dl = s.deadline()
        assert (
            dl is not None
            and dl - s.round_started
            <= max(s.config.deadline_floor, s.config.deadline_margin * s.round.took[a.node_key])
            + 1e-6
        )
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        final = await asyncio.wait_for(honest_task, 60)
        took = loop.time() - t0
        await status(coord)
        await finish(coord, runner, a, evil)
        return final, evil.node_key, took, by_pace

    final, evil, took, by_pace = run(main())
    honest_finished(tmp_path, [final])
    assert finite(final) and took < by_pace
    logged(caplog, "deadline passed", "quorum 1/2", f"left behind {evil[:8]}")


def test_a_node_that_says_its_shard_is_done_and_leaves_hands_on_the_rest(tmp_path, caplog):
    """A node uploads one real round claiming a billion samples and its whole shard trained,
    then leaves: its upload weighed one round's work, and all but that round of its shard is
    handed on."""

    async def main():
        coord = coordinator(tmp_path)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = await join(coord, "a"), await join(coord, "b")
        evil = await join(coord, "evil")
        tasks = [asyncio.create_task(honest(c, i)) for i, c in enumerate((a, b))]
        ready, blob = await evil.barrier(BarrierSync(round=0), to_bytes(small_model()))
        shard = await evil.shard(0)
        up = honest_step(from_bytes(blob), 1, 7)
        ready, _ = await evil.barrier(
            BarrierSync(round=1, samples=10**9, epoch_samples=shard.size), to_bytes(up)
        )
        assert ready.contributed, ready.reason
        await evil.close()
        await until(lambda: evil.node_key in coord.session.book.orphans, "its rest is handed on")
        orphan = coord.session.book.orphans[evil.node_key]
        finals = await asyncio.gather(*tasks)
        await finish(coord, runner, a, b)
        return finals, shard, orphan, evil.node_key

    finals, shard, orphan, evil = run(main())
    entries = honest_finished(tmp_path, finals)
    per_round = shard.size // shard.rounds
    assert orphan.size == shard.size - per_round  # rounds 2 and 3 of its shard
    weight = {n: w for e in entries if e["round"] == 1 for n, w in e["contributors"]}[evil]
    assert weight <= per_round + 10  # one round's work and a step, not a billion
    logged(caplog, f"node {evil[:8]} left")
