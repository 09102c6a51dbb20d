"""Bulk traffic over real iroh endpoints on loopback: many frames, many streams, one huge blob.

Each test asserts what arrived — order, content, checksums, the aggregate — never how fast.

- thousands of control frames on one connection, both ways at once, and from several
  senders sharing one stream (frames never interleave);
- dozens of barrier streams open at once on one connection, each answered on its own stream
  with its own data; and dozens of nodes uploading to a real coordinator at once, whose
  checkpoint is the exact weighted mean of what they sent;
- a blob larger than 2 GiB (the binding's per-call limit) sent from a file into a file,
  generated in chunks: memory stays flat and the sha256 matches end to end.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import torch
from conftest import run_async
from lightning_drift_cli.local import free_udp_port
from support import node_info

from lightning_drift import protocol as p
from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.coordinator.config import ServeOptions, SessionConfig
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.fsutil import sha256_file
from lightning_drift.modelspec import state_fingerprint
from lightning_drift.node.client import CoordinatorClient
from lightning_drift.transport import CHUNK, Connection, Endpoint

FRAMES = 5000
STREAMS = 48
NODES = 24


@contextlib.asynccontextmanager
async def connected() -> AsyncIterator[tuple[Connection, Connection]]:
    """(the dialler's connection, the acceptor's) between two loopback endpoints."""
    server, client = await Endpoint.bind(), await Endpoint.bind()
    try:
        # The acceptor must be accepting while the dialler's handshake runs.
        accepted, dialled = await asyncio.gather(
            server.accept(), client.dial(server.ticket(), timeout=10)
        )
        assert accepted is not None
        yield dialled, accepted
    finally:
        await client.close()
        await server.close()


def _blob(i: int, size: int) -> bytes:
    """``size`` bytes that differ from stream to stream (and within one)."""
    seed = hashlib.sha256(f"stream {i}".encode()).digest()
    return (seed * (size // len(seed) + 1))[:size]


# -- control frames ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_thousands_of_frames_each_way_on_one_stream_arrive_in_order():
    async def main() -> None:
        async with connected() as (a, b):
            sa = await a.open_stream()
            await sa.send(p.StatusRequest())  # the acceptor sees a stream once it has data
            sb = await b.accept_stream()
            assert isinstance(await sb.recv(), p.StatusRequest)

            async def send(stream, tag: str) -> None:
                for i in range(FRAMES):
                    await stream.send(
                        p.TrainProgress(round=i, epoch=0, step=i, samples=i, loss=i / 7)
                    )
                await stream.send(p.Bye(reason=tag))

            async def receive(stream) -> list[int]:
                steps = []
                while not isinstance(msg := await stream.recv(), p.Bye):
                    assert isinstance(msg, p.TrainProgress), msg
                    assert msg.samples == msg.step and msg.loss == msg.step / 7
                    steps.append(msg.step)
                return steps

            got = await asyncio.gather(send(sa, "a"), send(sb, "b"), receive(sa), receive(sb))
            assert got[2] == list(range(FRAMES)) and got[3] == list(range(FRAMES))

    run_async(main(), timeout=280)


@pytest.mark.timeout(300)
def test_several_senders_on_one_stream_never_interleave_their_frames():
    async def main() -> None:
        async with connected() as (a, b):
            stream = await a.open_stream()
            senders, each = 8, FRAMES // 8

            async def send(k: int) -> None:
                for i in range(each):
                    # Frames of different sizes, so that an interleaving would be seen.
                    await stream.send(p.Error(code=str(k), message=f"{i}:" + "x" * (i % 300)))

            received: dict[str, list[int]] = {str(k): [] for k in range(senders)}

            async def receive() -> None:
                peer = await b.accept_stream()
                for _ in range(senders * each):
                    msg = await peer.recv()
                    assert isinstance(msg, p.Error)
                    i, pad = msg.message.split(":")
                    assert pad == "x" * (int(i) % 300)
                    received[msg.code].append(int(i))

            await asyncio.gather(receive(), *(send(k) for k in range(senders)))
            assert all(steps == list(range(each)) for steps in received.values()), received

    run_async(main(), timeout=280)


# -- barrier streams ------------------------------------------------------------------------------


@pytest.mark.timeout(300)
def test_dozens_of_concurrent_barrier_streams_are_each_answered_with_their_own_data():
    async def main() -> None:
        async with connected() as (node, coord):

            async def answer_every_stream() -> None:
                async def answer(stream) -> None:
                    sync = await stream.recv()
                    assert isinstance(sync, p.BarrierSync)
                    header, blob = await stream.recv_blob()
                    assert (
                        isinstance(blob, bytes)
                        and header.sha256 == hashlib.sha256(blob).hexdigest()
                    )
                    back = blob[::-1]  # what the stream gets back depends on what it sent
                    digest = hashlib.sha256(back).hexdigest()
                    await stream.send(p.BarrierReady(round=sync.round, sha256=digest))
                    await stream.send_blob(back)
                    await stream.finish()

                tasks = [asyncio.create_task(answer(await coord.accept_stream()))
                         for _ in range(STREAMS)]  # fmt: skip
                await asyncio.gather(*tasks)

            async def barrier(i: int) -> None:
                stream = await node.open_stream()
                sent = _blob(i, 64 * 1024 + 97 * i)  # sizes differ; some end mid-chunk
                await stream.send(p.BarrierSync(round=i, samples=i))
                await stream.send_blob(sent)
                ready = await stream.recv()
                assert isinstance(ready, p.BarrierReady) and ready.round == i
                header, back = await stream.recv_blob()
                assert header.sha256 == ready.sha256
                assert back == sent[::-1], f"stream {i} got another stream's answer"

            server = asyncio.create_task(answer_every_stream())
            await asyncio.gather(*(barrier(i) for i in range(STREAMS)))
            await server

    run_async(main(), timeout=280)


@pytest.mark.timeout(300)
def test_dozens_of_nodes_at_one_barrier_give_the_exact_weighted_mean(tmp_path: Path):
    """A real coordinator: NODES nodes upload round 1 at once (uploads are received at most
    ``max_uploads`` at a time); every node gets the same weights, and the checkpoint is the
    samples-weighted mean of the uploads, accumulated in float64 in the order of the
    manifest."""

    def weights(seed: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return {"w": torch.randn(64, 32, generator=g), "b": torch.randn(32, generator=g)}

    async def main() -> None:
        config = SessionConfig(
            epochs=1, batch_size=4, sync_every=1000, min_nodes=NODES, dataset_size=NODES * 40,
            quorum=1.0, heartbeat_timeout=60.0, deadline_floor=120.0,
            max_nodes_per_token=NODES,
        )  # fmt: skip
        opts = ServeOptions(state_dir=tmp_path / "state", port=free_udp_port(), tick_s=0.1)
        coord = Coordinator(config, opts)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        clients: list[CoordinatorClient] = []
        try:
            for i in range(NODES):
                clients.append(
                    await CoordinatorClient.connect(
                        coord.node_token, name=f"n{i}",
                        node_info=node_info(NODES * 40, state_fingerprint(weights(0))),
                        timeout=20, silence_s=120,
                    )
                )  # fmt: skip
            await clients[0].barrier(p.BarrierSync(round=0), to_bytes(weights(0)))
            await asyncio.gather(
                *(c.barrier(p.BarrierSync(round=0), to_bytes(weights(0))) for c in clients[1:])
            )
            shards = await asyncio.gather(*(c.shard(0) for c in clients))
            samples = {c.node_key: s.stop - s.start for c, s in zip(clients, shards, strict=True)}
            uploads = {c.node_key: weights(100 + i) for i, c in enumerate(clients)}
            results = await asyncio.gather(
                *(
                    c.barrier(
                        p.BarrierSync(round=1, samples=samples[c.node_key]),
                        to_bytes(uploads[c.node_key]),
                    )
                    for c in clients
                )
            )
            assert {r.round for r, _ in results} == {1} and all(r.contributed for r, _ in results)
            assert len({blob for _, blob in results}) == 1  # every node got the same weights
            manifest = json.loads((coord.store.directory / "manifest.json").read_text())
            entry = next(e for e in manifest["checkpoints"] if e["round"] == 1)
            order = [node for node, _ in entry["contributors"]]
            assert sorted(order) == sorted(uploads)
            for key in ("w", "b"):
                acc = torch.zeros_like(uploads[order[0]][key], dtype=torch.float64)
                for node in order:
                    acc += uploads[node][key].double() * samples[node]
                expected = (acc / sum(samples.values())).float()
                assert torch.equal(from_bytes(results[0][1])[key], expected), key
        finally:
            for c in clients:
                await c.close()
            coord.shutdown()
            await runner
            await coord.close()

    run_async(main(), timeout=280)


# -- a blob over 2 GiB ---------------------------------------------------------------------------


def _peak_rss() -> int:
    """This process's peak resident memory so far, in bytes (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@pytest.mark.timeout(900)
def test_a_blob_over_2_gib_goes_file_to_file_with_flat_memory(tmp_path: Path):
    size = (2 << 30) + 3 * CHUNK + 12345  # past the binding's 2 GiB limit, ends mid-chunk
    src, dst = tmp_path / "big.bin", tmp_path / "received.bin"
    try:
        _send_file_to_file(src, dst, size)
    finally:  # pytest keeps the last runs' folders: 4 GiB each would pile up
        src.unlink(missing_ok=True)
        dst.unlink(missing_ok=True)


def _send_file_to_file(src: Path, dst: Path, size: int) -> None:
    with src.open("wb") as f:  # generated in chunks, never whole
        block = 0
        while f.tell() < size:
            piece = hashlib.sha256(block.to_bytes(8, "big")).digest() * (CHUNK // 32)
            f.write(piece[: size - f.tell()])
            block += 1
    want = sha256_file(src)
    before = _peak_rss()

    async def main() -> None:
        async with connected() as (a, b):
            stream = await a.open_stream()

            async def receive() -> tuple[p.BlobHeader, object]:
                peer = await b.accept_stream()
                return await peer.recv_blob(into=dst)

            sent, (header, path) = await asyncio.gather(stream.send_blob(src), receive())
            assert sent.size == header.size == size and header.sha256 == sent.sha256 == want
            assert path == dst

    run_async(main(), timeout=850)
    assert dst.stat().st_size == size
    assert sha256_file(dst) == want
    assert not list(dst.parent.glob(".*.part"))  # the temporary file was renamed, not left
    grew = _peak_rss() - before
    assert grew < 1 << 30, f"peak memory grew by {grew >> 20} MiB for a {size >> 20} MiB blob"
