"""A hostile node against a live coordinator, where it is one of only two contributors:
its integer buffers must not decide the session's counters.

With two contributors there is no majority to out-vote a hostile node, so the rule for
integer buffers has to hold on its own: one node may hold a counter back, never push it
backwards or past what the honest node counted.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from support import honest_step, small_model
from test_hostile import coordinator, finish, finite, honest_finished, run, scene, status

from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.protocol import BarrierSync

pytestmark = pytest.mark.slow

COUNTER = "bn.num_batches_tracked"
HUGE = 2**62


def test_one_of_two_contributors_cannot_set_the_batch_counter(tmp_path: Path):
    """The hostile node uploads honest-looking weights with num_batches_tracked at -2^62 in
    odd rounds and +2^62 in even ones. The honest node's counter holds in the odd rounds and
    advances by its own 10 batches in the even ones: never negative, never past its count."""

    async def main():
        # Two nodes, four rounds each; a deadline long enough that every round waits for both.
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=800, deadline_floor=60.0)
        runner, (a,), tasks, evil, shard = await scene(coord, n_honest=1)
        held = small_model()  # round 0's global weights: what every node started from
        sent = {}
        for r in range(shard.first_round, shard.first_round + shard.rounds):
            up = honest_step(held, r, 1)
            up[COUNTER] = torch.tensor(-HUGE if r % 2 else HUGE)
            sent[r] = int(up[COUNTER])
            ready, blob = await evil.barrier(
                BarrierSync(round=r, samples=10, train_seconds=0.5), to_bytes(up)
            )
            assert ready.round == r
            held = from_bytes(blob)
        (final,) = await asyncio.gather(*tasks)
        await status(coord)
        await finish(coord, runner, a, evil)
        return final, sent

    final, sent = run(main())
    entries = honest_finished(tmp_path, [final])
    rounds = len(sent)
    assert rounds >= 3 and set(sent.values()) == {-HUGE, HUGE}
    # The honest node counted 10 batches a round; only the rounds the hostile node did not
    # push backwards moved the counter, by the honest 10.
    forwards = sum(1 for v in sent.values() if v > 0)
    assert int(final[COUNTER]) == 10 * forwards
    assert 0 <= int(final[COUNTER]) <= 10 * rounds
    assert finite(final)
    counts = [int(weights(tmp_path, e)[COUNTER]) for e in sorted(entries, key=lambda e: e["round"])]
    assert counts == sorted(counts) and counts[0] >= 0 and counts[-1] == int(final[COUNTER])


def weights(tmp_path: Path, entry: dict) -> dict:
    return from_bytes((tmp_path / "state" / "checkpoints" / entry["file"]).read_bytes())
