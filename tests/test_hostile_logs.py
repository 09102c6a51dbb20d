"""A hostile node against a live coordinator's session log: renaming itself and coming back
under new keys every round must not widen the log without bound.

The session log is a CSV file by default, and Lightning's CSV logger rewrites the whole file
at every new column: a node that could add columns at will would make the log grow with the
square of the rounds. Per-node columns are keyed by node id, and only ``2 × --max-nodes``
nodes get any.
"""

from __future__ import annotations

import asyncio
import csv
import os
from pathlib import Path

import pytest
from support import honest_step, node_info, small_model
from test_hostile import FP, coordinator, finish, honest_finished, logged, run, status, until

from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.coordinator.logs import node_column_cap
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.node.client import CoordinatorClient
from lightning_drift.protocol import BarrierSync
from lightning_drift.text import short_id

pytestmark = pytest.mark.slow

MAX_NODES = 2


async def connect(coord: Coordinator, name: str, secret: bytes | None) -> CoordinatorClient:
    return await CoordinatorClient.connect(
        coord.node_token,
        node_info=node_info(coord.config.dataset_size, FP),
        name=name,
        secret=secret,
        timeout=10,
    )


async def comes_back(coord: Coordinator, r: int, secret: bytes) -> tuple[CoordinatorClient, dict]:
    """The hostile node for round ``r``: its first key under a new name in even rounds, a new
    key in odd ones; synced to the global weights and holding a shard that starts at ``r``."""
    evil = await connect(coord, f"evil-{r}-" + "x" * 40, secret if r % 2 == 0 else None)
    _, blob = await evil.barrier(BarrierSync(round=0), to_bytes(small_model()))
    shard = await evil.shard(0)
    assert shard.first_round == r, shard
    return evil, from_bytes(blob)


def test_a_node_renaming_itself_and_changing_keys_every_round_adds_bounded_columns(
    tmp_path: Path, caplog
):
    """One honest node, one hostile node that leaves and comes back every round, renamed,
    every other time with a new key. Each round waits for both (the hostile upload first),
    so the hostile node contributes to every round under a new name and, in half of them, a
    new id. The session completes; the CSV log has columns for at most 2 × --max-nodes nodes,
    none of them named after what a node called itself."""

    async def main():
        coord = coordinator(
            tmp_path, min_nodes=2, max_nodes=MAX_NODES, dataset_size=2000, deadline_floor=60.0
        )
        await coord.start()
        runner = asyncio.create_task(coord.run())
        secret = os.urandom(32)
        a = await connect(coord, "a", None)
        evil = await connect(coord, "evil-0", secret)
        start = asyncio.create_task(a.barrier(BarrierSync(round=0), to_bytes(small_model())))
        _, blob = await evil.barrier(BarrierSync(round=0), to_bytes(small_model()))
        held, held_evil = from_bytes((await start)[1]), from_bytes(blob)
        shard = await a.shard(0)
        await evil.shard(0)
        keys = [evil.node_key]
        for r in range(shard.first_round, shard.first_round + shard.rounds):
            if r > shard.first_round:
                await evil.close()
                evil, held_evil = await comes_back(coord, r, secret)
                keys.append(evil.node_key)
            sync = BarrierSync(round=r, samples=10, train_seconds=0.5)
            up = asyncio.create_task(evil.barrier(sync, to_bytes(honest_step(held_evil, r, 1))))
            await until(lambda key=keys[-1]: key in coord.session.arrivals, "the hostile upload")
            ready, blob = await a.barrier(sync, to_bytes(honest_step(held, r, 0)))
            held = from_bytes(blob)
            assert ready.round == r and (await up)[0].round == r
        assert ready.finished
        await status(coord)
        await finish(coord, runner, a, evil)
        return held, shard.rounds, a.node_key, keys

    final, rounds, honest_key, keys = run(main())
    honest_finished(tmp_path, [final])
    assert rounds >= 8 and len(set(keys)) > node_column_cap(MAX_NODES)

    (metrics,) = (tmp_path / "state").glob("**/csv/*/version_*/metrics.csv")
    with metrics.open() as f:
        reader = csv.DictReader(f)
        rows = [row for row in reader if row["round/nodes"]]
        header = reader.fieldnames or []
    labels = {c.split("/")[1] for c in header if c.startswith("node/")}
    # The honest node and the hostile node's first key (renamed every other round) have one
    # set of columns each; new keys take the rest, then count only in the round's totals.
    first = short_id(keys[0])
    assert {short_id(honest_key), first} <= labels and len(labels) <= node_column_cap(MAX_NODES)
    assert not any("evil" in c for c in header)
    assert [float(row["round/nodes"]) for row in rows] == [2.0] * rounds  # both counted
    assert all(row[f"node/{short_id(honest_key)}/samples"] for row in rows)
    renamed = [row for row, key in zip(rows, keys, strict=True) if key == keys[0]]
    assert len(renamed) >= rounds // 2 and all(row[f"node/{first}/samples"] for row in renamed)
    omitted = [float(row["round/nodes_omitted"]) for row in rows]
    assert set(omitted) == {0.0, 1.0}
    left_out = [key for key, n in zip(keys, omitted, strict=True) if n]
    for key in left_out:
        logged(caplog, "session_log.node_left_out", f"node={short_id(key)}", "all taken")
