"""A joining node takes the global weights from several members at once, chunk by chunk, each
chunk checked by its sha256 in the coordinator's table; real endpoints on loopback."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from dataplane_cases import model
from shardsim import Simulation

from lightning_drift.aggregate import to_bytes
from lightning_drift.dataplane.member import (
    MAX_CHUNKS,
    WEIGHTS,
    Member,
    chunk_table,
    weight_chunks,
)
from lightning_drift.errors import PieceRefused, ProtocolError

BASE = 3  # the base round the weights are of
CHUNKS = 8


async def _held(n: int) -> tuple[Simulation, bytes, list[tuple[str, int]], Member, list[str]]:
    """``n`` members; all but the first hold the weights in CHUNKS chunks; the first joins."""
    sim = Simulation(model(), shards=2)
    await sim.open(n)
    blob = to_bytes(sim.global_sd)
    joiner, *holders = sim.live
    tables = [sim.members[h].hold_weights(BASE, blob, CHUNKS) for h in holders]
    assert all(t == tables[0] for t in tables)
    return sim, blob, tables[0], sim.members[joiner], holders


def test_a_joiner_fetches_the_weights_from_several_members_at_once() -> None:
    async def go():
        sim, blob, table, joiner, holders = await _held(6)
        try:
            assert table == chunk_table(blob, CHUNKS)
            sha = hashlib.sha256(blob).hexdigest()
            got = await joiner.fetch_weights(BASE, table, [joiner.node, *holders], sha256=sha)
            served = {h: sim.members[h].server.bytes_out for h in holders}
            with pytest.raises(ProtocolError, match="do not hash|not describe"):
                await joiner.fetch_weights(BASE, table, holders, sha256="0" * 64)
            return blob, got, served, dict(joiner.client.bytes_in_by_peer), holders
        finally:
            await sim.close()

    blob, got, served, by_peer, holders = asyncio.run(asyncio.wait_for(go(), 120))
    assert got == blob
    assert len(by_peer) >= 4 and set(by_peer) <= {bytes.fromhex(h) for h in holders}
    assert sum(1 for b in served.values() if b > 0) >= 4
    assert sum(served.values()) == len(blob)  # every chunk came once, none from itself


def test_a_corrupt_holder_and_a_dead_one_are_passed_over() -> None:
    async def go():
        sim, blob, table, joiner, holders = await _held(6)
        liar, dead, lost = holders[1], holders[2], holders[3]
        try:
            # The liar holds other bytes of the same size under chunk 1's name (asked of it
            # first); the dead member is first for chunks 2 and 7; a member the coordinator
            # called lost is never asked, though it still serves.
            sha1, size1 = table[1]
            sim.members[liar].store.put(BASE, 1, WEIGHTS, sha1, b"\0" * size1)
            await sim.members[dead].close()
            await sim.members[dead].endpoint.close()
            sim.killed.add(dead)
            joiner.gone.add(lost)
            joiner.client.connect_timeout_s = 5.0
            got = await joiner.fetch_weights(BASE, table, holders)
            return (
                blob,
                got,
                size1,
                sim.members[liar].server.bytes_out,
                sim.members[lost].server.bytes_out,
                joiner.client.bytes_in,
                dict(joiner.client.bytes_in_by_peer),
                (liar, dead),
            )
        finally:
            await sim.close()

    blob, got, size1, liar_out, lost_out, bytes_in, by_peer, (liar, dead) = asyncio.run(
        asyncio.wait_for(go(), 120)
    )
    assert got == blob
    assert liar_out >= size1  # it did serve its corrupt chunk, which was refused
    assert bytes_in == len(blob)  # only verified chunks count
    assert by_peer.get(bytes.fromhex(liar), 0) < liar_out
    assert bytes.fromhex(dead) not in by_peer
    assert lost_out == 0


def test_a_chunk_no_holder_has_fails_the_fetch_naming_it() -> None:
    async def go():
        sim, blob, table, joiner, holders = await _held(4)
        try:
            sha3, size3 = table[3]
            for h in holders:
                sim.members[h].store.discard(BASE, 3, WEIGHTS, sha3)
            with pytest.raises(ProtocolError, match="chunk 3 of round 3") as err:
                await joiner.fetch_weights(BASE, table, holders)
            # Weights are fetched, never pushed: a member refuses them before the body.
            with pytest.raises(PieceRefused, match="fetched, never pushed"):
                await joiner.client.push(joiner.peers[holders[0]], BASE, 0, WEIGHTS, blob[:size3])
            with pytest.raises(ProtocolError, match="no member to fetch"):
                await joiner.fetch_weights(BASE, table, [joiner.node])
            return str(err.value)
        finally:
            await sim.close()

    message = asyncio.run(asyncio.wait_for(go(), 120))
    assert "no_piece" in message or "does not hold" in message


def test_weight_chunks_cover_the_blob_in_near_equal_ranges() -> None:
    blob = bytes(range(256)) * 4 + b"tail"  # 1,028 bytes
    for count in (1, 2, 3, 7, 8, 1000, MAX_CHUNKS):
        chunks = weight_chunks(blob, count)
        assert b"".join(chunks) == blob
        assert len(chunks) == min(count, len(blob))
        assert max(map(len, chunks)) - min(map(len, chunks)) <= 1
        assert min(map(len, chunks)) >= 1
    assert weight_chunks(blob, 1) == [blob]
    assert weight_chunks(b"abc", 10) == [b"a", b"b", b"c"]  # more chunks than bytes
    assert weight_chunks(b"", 4) == [b""]
    table = chunk_table(blob, 3)
    assert table == [(hashlib.sha256(c).hexdigest(), len(c)) for c in weight_chunks(blob, 3)]
    assert sum(size for _, size in table) == len(blob)
    for bad in (0, -1, MAX_CHUNKS + 1):
        with pytest.raises(ValueError, match="chunks"):
            weight_chunks(blob, bad)
        with pytest.raises(ValueError):
            chunk_table(blob, bad)
