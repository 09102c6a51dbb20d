"""Compressed rounds through a real coordinator (in process, real iroh endpoints on loopback):
the start-up sync that moves no weights twice, changes both ways that every node rebuilds bit
for bit, and deltas against a stale base that are left out, never applied."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from support import Reference, node_info
from test_server import contributors, coordinator, entry, run

from lightning_drift import codec
from lightning_drift.aggregate import to_bytes
from lightning_drift.errors import SessionError
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.modelspec import state_fingerprint
from lightning_drift.node.client import CoordinatorClient
from lightning_drift.node.weights import GlobalWeights, Received
from lightning_drift.protocol import BarrierReady, BarrierSync


async def barrier(
    client: CoordinatorClient,
    held: GlobalWeights,
    local: dict[str, torch.Tensor],
    open_round: int,
    samples: int = 10,
) -> tuple[BarrierReady, Received, int]:
    """What the strategy does at a barrier: upload, receive, rebuild; also the bytes received."""
    up = held.upload(local, open_round)
    sync = BarrierSync(
        round=open_round,
        samples=samples,
        delta=up.delta,
        base_round=up.base_round,
        base_sha256=up.base_sha256,
    )
    ready, blob = await client.barrier(sync, up.payload)
    got = held.receive(
        ready.round, blob, ready.sha256, payload=ready.payload, contributed=ready.contributed
    )
    return ready, got, len(blob)


async def join(coord, n: int) -> CoordinatorClient:
    """A node announcing this file's model."""
    info = node_info(coord.config.dataset_size, state_fingerprint(model(0)))
    return await CoordinatorClient.connect(coord.node_token, node_info=info, timeout=10)


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    """Big enough that a compressed change is smaller than the weights, header included."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(40, 64, generator=g),
        "b": torch.randn(64, generator=g),
        "steps": torch.tensor([seed], dtype=torch.int64),
    }


def trained(base: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """A node's weights after a round of 'training' from ``base``."""
    g = torch.Generator().manual_seed(seed)
    return {
        k: v + torch.randn(v.shape, generator=g) * 0.05 if v.is_floating_point() else v + 1
        for k, v in base.items()
    }


def test_the_start_up_sync_moves_the_weights_once(tmp_path: Path) -> None:
    async def main():
        coord = coordinator(tmp_path, min_nodes=3)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b, c = [await join(coord, i) for i in range(3)]
        init = model(0)
        # A node with nothing to offer while the coordinator has no weights is asked for them.
        with pytest.raises(SessionError, match="no global weights yet") as err:
            await a.barrier(BarrierSync(round=0, base_sha256=sha256_bytes(to_bytes(init))), b"")
        assert err.value.code == "need_weights"
        # The first node's weights become round 0; it holds them already: nothing comes back.
        held = GlobalWeights("int8")
        ready, got, received = await barrier(a, held, init, 0)
        assert ready.contributed and ready.payload == "same" and received == 0
        assert got.blob == (coord.store.directory / "round-000000.safetensors").read_bytes()
        # A node built the same way uploads nothing and downloads nothing.
        same = sha256_bytes(to_bytes(init))
        ready, blob = await b.barrier(BarrierSync(round=0, base_sha256=same), b"")
        assert ready.payload == "same" and blob == b"" and ready.sha256 == same
        # A node with other weights gets the session's, whole.
        other = sha256_bytes(to_bytes(model(5)))
        ready, blob = await c.barrier(BarrierSync(round=0, base_sha256=other), b"")
        assert ready.payload == "weights" and sha256_bytes(blob) == ready.sha256 == same
        for x in (a, b, c):
            await x.close()
        runner.cancel()
        await coord.close()

    run(main())


@pytest.mark.parametrize("dtype", ["bfloat16", "int8", "topk", "sign", "int2"])
def test_every_round_is_the_change_every_node_rebuilds_bit_for_bit(tmp_path: Path, dtype) -> None:
    rounds = 6

    async def main():
        coord = coordinator(
            tmp_path, min_nodes=2, transfer_dtype=dtype, dataset_size=2 * rounds * 10 * 10
        )
        await coord.start()
        runner = asyncio.create_task(coord.run())
        clients = [await join(coord, i) for i in range(2)]
        helds = [GlobalWeights(dtype) for _ in clients]
        init = model(0)
        for c, h in zip(clients, helds, strict=True):
            await barrier(c, h, init, 0)
            await c.shard(0)
        ref = Reference(init, dtype)
        full = len(to_bytes(init))
        for r in range(1, rounds + 1):
            ups = [trained(ref.glob, 100 * r + i) for i in range(2)]
            payloads: dict[str, bytes] = {}

            async def one(i: int, ups=ups, payloads=payloads, r=r):
                h = helds[i]
                up = h.upload(ups[i], r)
                payloads[clients[i].node_key] = up.payload
                ready, blob = await clients[i].barrier(
                    BarrierSync(
                        round=r,
                        samples=10 + i,
                        delta=up.delta,
                        base_round=up.base_round,
                        base_sha256=up.base_sha256,
                    ),
                    up.payload,
                )
                got = h.receive(ready.round, blob, ready.sha256, payload=ready.payload)
                return ready, got, len(blob)

            res = await asyncio.gather(one(0), one(1))
            order = contributors(entry(coord, r))
            w = {c.node_key: 10.0 + i for i, c in enumerate(clients)}
            expect = ref.round([(payloads[n], w[n]) for n in order])
            ckpt = (coord.store.directory / f"round-{r:06d}.safetensors").read_bytes()
            assert ckpt == expect, r  # the coordinator's round is the reference computation
            for ready, got, received in res:
                assert ready.payload == "delta" and ready.base_round == r - 1
                assert got.blob == ckpt, r  # ... and exactly what every node rebuilt
                assert received < (0.6 if dtype == "bfloat16" else 0.35) * full
        # A node that keeps no copy of the weights (a float32 client) still gets them whole.
        ready, blob = await clients[0].barrier(BarrierSync(round=0), b"")
        assert ready.payload == "weights" and blob == ckpt
        for c in clients:
            await c.close()
        runner.cancel()
        await coord.close()

    run(main())


def test_a_delta_against_a_stale_base_is_left_out_never_applied(tmp_path: Path) -> None:
    async def main():
        coord = coordinator(tmp_path, min_nodes=2, transfer_dtype="int8", dataset_size=800)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = [await join(coord, i) for i in range(2)]
        ha, hb = GlobalWeights("int8"), GlobalWeights("int8")
        init = model(0)
        for c, h in ((a, ha), (b, hb)):
            await barrier(c, h, init, 0)
            await c.shard(0)
        round0 = hb.base_sha256
        (_, got1, _), _ = await asyncio.gather(
            barrier(a, ha, trained(init, 1), 1), barrier(b, hb, trained(init, 2), 1)
        )
        # Round 2: b sends a change from round 0's weights (as if it had missed round 1).
        stale = codec.encode(codec.difference(trained(init, 3), init), "int8").payload
        b_sync = BarrierSync(round=2, samples=10, delta=True, base_round=0, base_sha256=round0)
        b_task = asyncio.create_task(b.barrier(b_sync, stale))
        await asyncio.sleep(0.3)
        _, a_got, _ = await barrier(a, ha, trained(got1.weights, 4), 2)
        b_ready, b_blob = await b_task
        assert not b_ready.contributed
        assert "delta against round 0's weights" in b_ready.reason
        assert contributors(entry(coord, 2)) == [a.node_key]
        # The round is a's alone: the stale change was not applied to anything.
        assert b_ready.sha256 == sha256_bytes(a_got.blob)
        # Round 3: the right round named, but other weights (sha256) than the current ones.
        c_sync = BarrierSync(round=3, samples=10, delta=True, base_round=2, base_sha256=round0)
        c_task = asyncio.create_task(b.barrier(c_sync, stale))
        await asyncio.sleep(0.3)
        await barrier(a, ha, trained(a_got.weights, 5), 3)
        c_ready, _ = await c_task
        assert not c_ready.contributed and "left out of round 3" in c_ready.reason
        assert contributors(entry(coord, 3)) == [a.node_key]
        events = "\n".join(coord.events)
        assert "global weights of round 2 are" in events
        # A change that names no base at all is refused outright.
        with pytest.raises(SessionError, match="must name the round") as err:
            await b.barrier(BarrierSync(round=4, samples=10, delta=True), stale)
        assert err.value.code == "bad_upload"
        for c in (a, b):
            await c.close()
        runner.cancel()
        await coord.close()

    run(main())


def test_a_mask_of_minus_infinity_is_carried_bit_for_bit_through_real_rounds(tmp_path: Path):
    # An additive causal mask: the start-up sync takes it, and neither the int8 changes nor
    # DiLoCo's outer step turn its -inf into NaN; every node and the checkpoint hold it as is.
    mask = torch.triu(torch.full((8, 8), float("-inf")), 1)
    init = {**model(0), "mask": mask.clone()}

    async def main():
        coord = coordinator(
            tmp_path, min_nodes=2, transfer_dtype="int8", aggregation="diloco", dataset_size=800
        )
        await coord.start()
        runner = asyncio.create_task(coord.run())
        info = node_info(coord.config.dataset_size, state_fingerprint(init))
        clients = [
            await CoordinatorClient.connect(coord.node_token, node_info=info, timeout=10)
            for _ in range(2)
        ]
        helds = [GlobalWeights("int8") for _ in clients]
        for c, h in zip(clients, helds, strict=True):
            await barrier(c, h, init, 0)
            await c.shard(0)
        glob = init
        for r in (1, 2):
            res = await asyncio.gather(
                *(
                    barrier(c, h, {**trained(glob, 10 * r + i), "mask": mask.clone()}, r)
                    for i, (c, h) in enumerate(zip(clients, helds, strict=True))
                )
            )
            ckpt = (coord.store.directory / f"round-{r:06d}.safetensors").read_bytes()
            for ready, got, _ in res:
                assert ready.contributed and ready.payload == "delta", ready.reason
                assert got.blob == ckpt
                assert torch.equal(got.weights["mask"], mask)
            glob = res[0][1].weights
            assert not torch.equal(glob["w"], init["w"])
        for c in clients:
            await c.close()
        runner.cancel()
        await coord.close()

    run(main())
