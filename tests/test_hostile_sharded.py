"""Hostile members of a sharded session against a real coordinator over iroh: members on
their own data endpoints push, reduce and fetch real pieces; one of them lies about the
shards it computes. The honest members' session completes on weights that are the
coordinator's checkpoints, byte for byte, and the liar is struck and named in the log."""

from __future__ import annotations

import asyncio
import hashlib
import io
import logging
from pathlib import Path

import pytest
from lightning_drift_cli.local import free_udp_port
from rich.console import Console
from support import honest_step, node_info, small_fingerprint, small_model, verify_checkpoints

from lightning_drift.aggregate import to_bytes
from lightning_drift.coordinator.config import ServeOptions, SessionConfig
from lightning_drift.coordinator.monitor import render_lines, render_table
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.dataplane.member import Computed
from lightning_drift.dataplane.reduce import ShardResult
from lightning_drift.node.client import CoordinatorClient
from lightning_drift.node.sharded import NodeDataPlane
from lightning_drift.node.weights import GlobalWeights
from lightning_drift.protocol import BarrierSync, SessionStatus

pytestmark = pytest.mark.slow
FP = small_fingerprint()


def coordinator(tmp_path: Path, **cfg) -> Coordinator:
    base = dict(
        epochs=1, batch_size=10, sync_every=10, min_nodes=3, dataset_size=900,
        heartbeat_timeout=5.0, heartbeat_s=0.5, deadline_floor=2.0, max_strikes=5,
        transfer_dtype="int8", aggregation="diloco", data_plane="sharded", shards=8,
        audit_every=0,
    )  # fmt: skip
    base.update(cfg)
    opts = ServeOptions(
        state_dir=tmp_path / "state", port=free_udp_port(), tick_s=0.1, finish_grace_s=0.3,
        upload_grace_s=1.0,
    )  # fmt: skip
    return Coordinator(SessionConfig(**base), opts)


def flipped(done: Computed) -> Computed:
    """A computer that flips one value of its result and serves what it claims."""
    res = done.result
    if not res.piece:
        return done
    piece = bytearray(res.piece)
    piece[0] ^= 0x40
    data = bytes(piece)
    lie = ShardResult(
        res.index, data, hashlib.sha256(data).hexdigest(), res.sums, res.norms2,
        res.total_weight, res.state, res.bad,
    )  # fmt: skip
    return Computed(lie, done.state, done.state_size, done.missing)


class Died(Exception):
    """A member that died the moment it was first asked to compute a shard."""


async def member(
    coord: Coordinator, index: int, lies: list[int] | None = None, *, dies: bool = False
) -> dict:
    """One member's whole session (start-up sync, its shard, every round through its data
    plane); with ``lies``, every shard it computes is served flipped and counted there; with
    ``dies``, its connection and data endpoint close when it is first asked to compute."""
    dp = await NodeDataPlane.bind(coord.node_token, None, mode=None, relay_urls=(), via=())
    info = node_info(coord.config.dataset_size, FP)
    info.data_peer = dp.peer
    client = await CoordinatorClient.connect(
        coord.node_token, node_info=info, name=f"m{index}", timeout=10, on_unasked=dp.unasked
    )
    weights = GlobalWeights("int8")
    dp.held = weights.held
    assert client.config is not None
    dp.joined(client.node_key, client.config, client.conn.remote_key, client.progress)
    try:
        ready, blob = await client.barrier(BarrierSync(round=0), to_bytes(small_model()))
        got = weights.receive(ready.round, blob, ready.sha256, payload=ready.payload)
        if lies is not None:
            assert await dp.update() and dp.member is not None
            honest_compute = dp.member.compute

            async def lying(*args, **kw):
                done = flipped(await honest_compute(*args, **kw))
                if done.result.piece:
                    dp.member.store.put(
                        args[0], args[1], "result", done.result.sha, done.result.piece
                    )
                    lies.append(args[1])
                return done

            dp.member.compute = lying
        if dies:
            assert await dp.update() and dp.member is not None
            died = asyncio.get_running_loop().create_future()

            async def dying(*args, **kw):
                if not died.done():
                    died.set_result(args[:2])
                client.conn.close(0, "gone")
                await dp.endpoint.close()
                await asyncio.sleep(3600)

            dp.member.compute = dying
        a = await client.shard(0)
        for k in range(a.rounds):
            r = a.first_round + k
            up = weights.upload(honest_step(got.weights, r, index), r)
            sync = BarrierSync(
                round=r, samples=10, train_seconds=0.5, delta=up.delta,
                base_round=up.base_round, base_sha256=up.base_sha256,
            )  # fmt: skip
            barrier = asyncio.ensure_future(dp.barrier(client, sync, up.payload))
            if dies:
                await asyncio.wait([barrier, died], return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(0)  # a barrier the death ended ends with it
                if died.done():
                    barrier.cancel()
                    return {"died": died.result()}
            ready, blob = await barrier
            got = weights.receive(
                ready.round, blob, ready.sha256, payload=ready.payload,
                contributed=ready.contributed,
            )  # fmt: skip
            if ready.finished:
                break
        assert ready.finished
        return {"blob": got.blob, "round": got.round}
    finally:
        await client.close()
        await dp.close()


async def session(
    coord: Coordinator, n: int, liar: int | None, seen: list[SessionStatus]
) -> tuple[list[dict], list[int]]:
    await coord.start()
    runner = asyncio.create_task(coord.run())
    lies: list[int] = []

    async def watch() -> None:  # the status as an observer sees it while the members train
        while True:
            seen.append(coord.status())
            await asyncio.sleep(0.05)

    watching = asyncio.create_task(watch())
    try:
        finals = await asyncio.gather(
            *(member(coord, i, lies if i == liar else None) for i in range(n))
        )
        await asyncio.wait_for(runner, 30)
    finally:
        watching.cancel()
        await coord.close()
    return finals, lies


def test_a_seat_that_lies_is_outvoted_struck_and_the_members_end_on_the_checkpoint(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="lightning_drift")
    # Deadlines and heartbeats far above what a round takes: on a busy machine a member that
    # misses a round's deadline is no seat of it, and the liar must be one.
    coord = coordinator(tmp_path, deadline_floor=15.0, heartbeat_timeout=20.0)
    seen: list[SessionStatus] = []
    finals, lies = asyncio.run(asyncio.wait_for(session(coord, 3, 2, seen), 180))
    entries = verify_checkpoints(tmp_path / "state" / "checkpoints")
    last = max(entries, key=lambda e: e["round"])
    final = (tmp_path / "state" / "checkpoints" / last["file"]).read_bytes()
    # Every honest member (the liar too: it fetched what stood) holds the final checkpoint.
    for f in finals:
        assert f["round"] == last["round"] and f["blob"] == final
    trained = [e for e in entries if e["round"] > 0]
    assert trained and all("unchanged" not in e["extra"] for e in trained), trained
    # The liar computed shards (a seat in 8 shards of 3 members, near certainly) and was
    # outvoted on each: struck and named.
    assert lies, "the liar was never a seat"
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "struck in round" in text and "was outvoted" in text
    # The status shows the data plane: every shard's two seats among the members, bytes.
    st = max(seen, key=lambda s: sum(n.seats for n in s.nodes))
    assert st.data_plane == "sharded" and st.shards == 8
    assert seen[-1].coordinator_bytes > 0  # the results and states it took from the seats
    assert sum(n.seats for n in st.nodes) == 2 * 8
    table = io.StringIO()
    Console(file=table, width=200).print(render_table(st))
    assert "seats" in table.getvalue() and "sharded data plane, 8 shards" in table.getvalue()
    assert "data_plane=sharded" in render_lines(st, now=0)[0]


def test_a_colluding_pair_is_caught_by_the_coordinators_recomputation(tmp_path, caplog):
    # Two members tell the same lie, so they agree with each other: as the two seats of the
    # one shard, or as a seat and the referee that outvotes the honest seat. Either way the
    # standing result is theirs, and only the coordinator's own recomputation (every round
    # here) sees it: no such round is published, and the pair is struck, not the honest one.
    caplog.set_level(logging.INFO, logger="lightning_drift")
    coord = coordinator(tmp_path, shards=1, audit_every=1, max_strikes=100)

    async def go():
        await coord.start()
        runner = asyncio.create_task(coord.run())
        lies: list[int] = []
        try:
            pair = [member(coord, i, lies) for i in range(2)]
            finals = await asyncio.gather(*pair, member(coord, 2))
            await asyncio.wait_for(runner, 30)
        finally:
            await coord.close()
        return finals, lies

    finals, lies = asyncio.run(asyncio.wait_for(go(), 180))
    entries = verify_checkpoints(tmp_path / "state" / "checkpoints")
    trained = [e for e in entries if e["round"] > 0]
    assert trained and lies
    for e in trained:
        assert "recomputation" in e["extra"].get("unchanged", ""), e
    assert len({e["sha256"] for e in entries}) == 1  # the weights never took the lie
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "failed the coordinator's recomputation" in text
    honest = coord.session.members
    names = {m.name: m for m in honest.values()}
    assert names["m2"].strikes == 0 and names["m0"].strikes > 0 and names["m1"].strikes > 0
    last = max(entries, key=lambda e: e["round"])
    final = (tmp_path / "state" / "checkpoints" / last["file"]).read_bytes()
    assert all(f["blob"] == final for f in finals)


def test_a_seat_that_dies_mid_round_is_replaced_and_the_round_goes_on(tmp_path, caplog):
    # A member dies the moment it is asked to compute (its connection and data endpoint
    # close, its pieces with them). The next members of its shards' rankings compute them,
    # with its change where the other seats hold it, and the round goes on.
    caplog.set_level(logging.INFO, logger="lightning_drift")
    coord = coordinator(tmp_path, min_nodes=4, dataset_size=1200)

    async def go():
        await coord.start()
        runner = asyncio.create_task(coord.run())
        try:
            done = await asyncio.gather(
                *(member(coord, i) for i in range(3)), member(coord, 3, dies=True)
            )
            await asyncio.wait_for(runner, 60)
        finally:
            await coord.close()
        return done

    done = asyncio.run(asyncio.wait_for(go(), 240))
    died_round, _ = done[3]["died"]
    entries = verify_checkpoints(tmp_path / "state" / "checkpoints")
    by_round = {e["round"]: e for e in entries}
    # The round it died in was published, by the members left.
    assert "unchanged" not in by_round[died_round]["extra"], by_round[died_round]
    dead = coord.session.members
    assert all(e["extra"].get("data_plane") == "sharded" for e in entries if e["round"] > 0)
    last = max(entries, key=lambda e: e["round"])
    final = (tmp_path / "state" / "checkpoints" / last["file"]).read_bytes()
    assert all(f["blob"] == final for f in done[:3])
    assert [n for n, m in dead.items() if m.name == "m3"]
