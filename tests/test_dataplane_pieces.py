"""Pieces of the sharded data plane between members, over real iroh endpoints on loopback:
push and fetch, who may connect, what is refused before its body, what is caught by sha256."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import pytest
from conftest import run_async

from lightning_drift import protocol as p
from lightning_drift.dataplane.pieces import (
    MAX_CONNS_PER_PEER,
    PieceClient,
    PieceServer,
    PieceStore,
)
from lightning_drift.errors import PeerLost, PieceRefused, ProtocolError
from lightning_drift.peers import parse_peer
from lightning_drift.transport import Endpoint

pytestmark = pytest.mark.timeout(90)

FAST = {"answer_timeout_s": 3.0, "grace_s": 3.0}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def name(ep: Endpoint) -> str:
    """The peer name a client dials ``ep`` by: ID@HOST:PORT."""
    return f"{ep.key_hex}@{ep.addrs()[0]}"


async def until(check: Callable[[], bool], timeout: float = 5.0) -> None:
    """Wait until ``check()`` holds; fail the test when it does not within ``timeout``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition never held"
        await asyncio.sleep(0.01)


@dataclass
class Member:
    """A member's data-plane side: its endpoint, its server, its client, what it was told."""

    endpoint: Endpoint
    server: PieceServer
    client: PieceClient
    sizes: dict[tuple[int, int, str], int | str] = field(default_factory=dict)
    asked: list[tuple[bytes, int, int, str]] = field(default_factory=list)
    taken: list[tuple[bytes, int, int, str, str, bytes]] = field(default_factory=list)

    @property
    def key(self) -> bytes:
        return self.endpoint.key


@contextlib.asynccontextmanager
async def members(n: int, store_bytes: int = 1 << 24) -> AsyncIterator[list[Member]]:
    """``n`` members on loopback, each allowing every other; everything closed at the end."""
    eps: list[Endpoint] = []
    out: list[Member] = []
    try:
        for _ in range(n):
            eps.append(await Endpoint.bind())
        for ep in eps:
            sizes: dict[tuple[int, int, str], int | str] = {}
            asked: list[tuple[bytes, int, int, str]] = []
            taken: list[tuple[bytes, int, int, str, str, bytes]] = []

            def expect(peer, upload_round, shard, kind, sizes=sizes, asked=asked):
                asked.append((peer, upload_round, shard, kind))
                return sizes.get((upload_round, shard, kind), "not expected here")

            def on_piece(*args, taken=taken):
                taken.append(args)

            server = PieceServer(
                ep,
                PieceStore(store_bytes),
                expect,
                on_piece,
                allowed=[e.key for e in eps if e is not ep],
                **FAST,
            )
            client = PieceClient(ep, connect_timeout_s=3.0, **FAST)
            out.append(Member(ep, server, client, sizes, asked, taken))
        yield out
    finally:
        for m in out:
            await m.client.close()
            await m.server.close()
        for ep in eps:
            await ep.close()


def test_push_then_fetch_round_trip() -> None:
    change, result = b"c" * 5000 + b"!", bytes(range(256)) * 40

    async def main() -> None:
        async with members(3) as (a, b, c):
            a.sizes[(4, 0, "change")] = len(change)
            a.sizes[(4, 1, "result")] = len(result)
            await b.client.push(name(a.endpoint), 4, 0, "change", change)
            await b.client.push(parse_peer(name(a.endpoint)), 4, 1, "result", result)
            assert a.taken == [
                (b.key, 4, 0, "change", sha(change), change),
                (b.key, 4, 1, "result", sha(result), result),
            ]
            assert a.server.store.has(4, 0, "change", sha(change))
            assert a.server.bytes_in == len(change) + len(result) == b.client.bytes_out
            assert a.server.bytes_in_by_peer == {b.key: len(change) + len(result)}

            got = await c.client.fetch(name(a.endpoint), 4, 1, "result", sha(result), len(result))
            again = await b.client.fetch(name(a.endpoint), 4, 0, "change", sha(change), 5001)
            assert (got, again) == (result, change)
            assert c.client.bytes_in == len(result) and b.client.bytes_in == len(change)
            # the server counts a piece once its last write returned, maybe after the client
            # has read it
            await until(lambda: a.server.bytes_out == len(result) + len(change))
            assert a.server.bytes_out_by_peer == {c.key: len(result), b.key: len(change)}

    run_async(main(), 60)


def test_many_push_to_one_and_one_pushes_to_many() -> None:
    async def main() -> None:
        async with members(4) as ms:
            hub, others = ms[0], ms[1:]
            for i in range(len(others)):
                hub.sizes[(1, i, "change")] = 3000 + i
            await asyncio.gather(
                *(
                    m.client.push(name(hub.endpoint), 1, i, "change", bytes([i]) * (3000 + i))
                    for i, m in enumerate(others)
                )
            )
            assert sorted((t[0], t[2]) for t in hub.taken) == sorted(
                (m.key, i) for i, m in enumerate(others)
            )
            assert hub.server.bytes_in == sum(3000 + i for i in range(len(others)))

            for m in others:
                m.sizes[(2, 7, "result")] = 2048
            piece = b"r" * 2048
            await asyncio.gather(
                *(hub.client.push(name(m.endpoint), 2, 7, "result", piece) for m in others)
            )
            assert all(m.server.store.get(2, 7, "result", sha(piece)) == piece for m in others)
            assert hub.client.bytes_out == 3 * 2048
            assert set(hub.client.bytes_out_by_peer) == {m.key for m in others}

    run_async(main(), 60)


def test_a_peer_not_allowed_is_refused_and_a_removed_one_cut_off() -> None:
    async def main() -> None:
        async with members(3) as (a, b, c):
            a.sizes[(1, 0, "change")] = 100
            a.server.allow([b.key])  # c is not a member of a's session
            with pytest.raises(PeerLost, match="not allowed"):
                await c.client.push(name(a.endpoint), 1, 0, "change", b"x" * 100)
            await b.client.push(name(a.endpoint), 1, 0, "change", b"y" * 100)
            assert a.taken and a.taken[0][0] == b.key

            idle = await b.endpoint.dial_peer(parse_peer(name(a.endpoint)), timeout=3)
            stream = await idle.open_stream()  # served, so the server holds the connection
            await stream.send(p.PieceGet(round=9, shard=0, kind="change", sha256="0" * 64, size=1))
            assert isinstance(await asyncio.wait_for(stream.recv(), 5), p.Error)
            a.server.allow([c.key])  # b leaves the session: its connections are closed
            assert "cut off" in await asyncio.wait_for(idle.closed(), 5)
            with pytest.raises(PeerLost, match="cut off|not allowed"):
                await b.client.push(name(a.endpoint), 1, 0, "change", b"z" * 100)
            assert not a.server.store.has(1, 0, "change", sha(b"z" * 100))
            assert len(a.taken) == 1
            await c.client.push(name(a.endpoint), 1, 0, "change", b"w" * 100)
            assert a.taken[-1][0] == c.key

    run_async(main(), 60)


def test_a_member_holds_at_most_a_few_connections_open_to_another() -> None:
    async def main() -> None:
        async with members(2) as (a, b):
            held = []
            for _ in range(MAX_CONNS_PER_PEER):
                conn = await b.endpoint.dial_peer(parse_peer(name(a.endpoint)), timeout=3)
                stream = await conn.open_stream()  # served: the server now counts it
                await stream.send(
                    p.PieceGet(round=1, shard=0, kind="change", sha256="0" * 64, size=1)
                )
                assert isinstance(await asyncio.wait_for(stream.recv(), 5), p.Error)
                held.append(conn)
            extra = await b.endpoint.dial_peer(parse_peer(name(a.endpoint)), timeout=3)
            assert "too many connections" in await asyncio.wait_for(extra.closed(), 5)
            held[0].close(0, "done")
            await asyncio.sleep(0.5)  # the server sees it go and frees its place
            again = await b.endpoint.dial_peer(parse_peer(name(a.endpoint)), timeout=3)
            stream = await again.open_stream()
            await stream.send(p.PieceGet(round=1, shard=0, kind="change", sha256="0" * 64, size=1))
            assert isinstance(await asyncio.wait_for(stream.recv(), 5), p.Error)

    run_async(main(), 60)


def test_an_unexpected_piece_is_refused_before_its_body() -> None:
    async def main() -> None:
        async with members(2) as (a, b):
            a.sizes[(3, 2, "change")] = "not an aggregator of shard 2"
            body = b"q" * (2 << 20)
            with pytest.raises(PieceRefused, match="not an aggregator of shard 2"):
                await b.client.push(name(a.endpoint), 3, 2, "change", body)
            assert a.asked == [(b.key, 3, 2, "change")]
            assert a.server.bytes_in == 0 and a.server.store.nbytes == 0 and not a.taken
            assert b.client.bytes_out == 0

            # The connection survives a refusal: a wanted piece goes through next.
            a.sizes[(3, 2, "change")] = 10
            await b.client.push(name(a.endpoint), 3, 2, "change", b"0123456789")
            assert a.server.bytes_in == 10

    run_async(main(), 60)


def test_a_declared_size_other_than_expected_is_refused() -> None:
    async def main() -> None:
        async with members(2) as (a, b):
            a.sizes[(1, 0, "result")] = 100
            with pytest.raises(PieceRefused, match="200 bytes declared, 100 expected"):
                await b.client.push(name(a.endpoint), 1, 0, "result", b"s" * 200)
            assert a.server.bytes_in == 0 and len(a.server.store) == 0

    run_async(main(), 60)


def test_a_piece_that_is_not_its_sha256_is_refused_and_not_stored() -> None:
    data, other = b"d" * 1000, b"e" * 1000

    async def main() -> None:
        async with members(2) as (a, b):
            a.sizes[(1, 0, "change")] = 1000
            conn = await b.endpoint.dial_peer(parse_peer(name(a.endpoint)), timeout=3)

            async def put(declared: str, header_sha: str) -> p.PieceAck:
                stream = await conn.open_stream()
                await stream.send(
                    p.PiecePut(round=1, shard=0, kind="change", sha256=declared, size=1000)
                )
                with contextlib.suppress(PeerLost):
                    await stream.send_blob(data, sha256=header_sha)
                ack = p.expect(await asyncio.wait_for(stream.recv(), 5), p.PieceAck)
                assert isinstance(ack, p.PieceAck)
                return ack

            # PiecePut names other bytes than the blob header: refused before the body
            ack = await put(sha(other), sha(data))
            assert not ack.ok and "not the piece" in ack.reason
            assert a.server.bytes_in == 0
            # both name other bytes than arrive: the body is read, its digest refuses it
            ack = await put(sha(other), sha(other))
            assert not ack.ok and "checksum mismatch" in ack.reason
            assert a.server.store.nbytes == 0 and not a.taken
            assert not a.server.store.has(1, 0, "change", sha(other))
            conn.close()

    run_async(main(), 60)


def test_fetching_a_piece_not_held_is_a_clear_refusal() -> None:
    async def main() -> None:
        async with members(2) as (a, b):
            a.server.store.put(5, 1, "result", sha(b"held"), b"held")
            with pytest.raises(PieceRefused, match="does not hold piece round=5 shard=0") as e:
                await b.client.fetch(name(a.endpoint), 5, 0, "result", sha(b"held"), 4)
            assert e.value.code == "no_piece"
            with pytest.raises(PieceRefused, match="does not hold") as e:  # another size
                await b.client.fetch(name(a.endpoint), 5, 1, "result", sha(b"held"), 5)
            assert e.value.code == "no_piece" and b.client.bytes_in == 0

    run_async(main(), 60)


def test_fetch_catches_bytes_that_are_not_the_named_sha256() -> None:
    good, forged = b"g" * 4096, b"f" * 4096

    async def main() -> None:
        async with members(2) as (a, b):
            a.server.store.put(2, 3, "result", sha(good), forged)  # a liar's store
            with pytest.raises(ProtocolError, match="checksum mismatch"):
                await b.client.fetch(name(a.endpoint), 2, 3, "result", sha(good), len(good))
            assert b.client.bytes_in == 0

    run_async(main(), 60)


def test_store_evicts_older_rounds_first_and_forgets_before_a_round() -> None:
    store = PieceStore(max_bytes=100)
    store.put(1, 0, "change", "a" * 64, b"1" * 40)
    store.put(1, 1, "change", "b" * 64, b"1" * 20)
    store.put(2, 0, "result", "c" * 64, b"2" * 30)
    assert store.nbytes == 90
    store.put(3, 0, "change", "d" * 64, b"3" * 30)  # pushes out round 1's oldest piece
    assert not store.has(1, 0, "change", "a" * 64) and store.has(1, 1, "change", "b" * 64)
    assert store.nbytes == 80
    with pytest.raises(PieceRefused, match="no room") as e:  # round 1 is older: no room
        store.put(1, 2, "change", "e" * 64, b"1" * 30)
    assert e.value.code == "store_full" and store.nbytes == 80
    store.put(3, 1, "change", "f" * 64, b"3" * 60)  # pushes out rounds 1 and 2
    assert store.nbytes == 90 and len(store) == 2
    assert store.get(3, 1, "change", "f" * 64) == b"3" * 60
    with pytest.raises(PieceRefused):  # round 3's pieces are never pushed out for round 3
        store.put(3, 2, "change", "g" * 64, b"3" * 20)
    store.put(4, 0, "result", "h" * 64, b"4" * 5)
    assert store.forget_before(4) == 90
    store.put(4, 0, "result", "h" * 64, b"4" * 5)  # the same piece again replaces it
    assert store.nbytes == 5 and len(store) == 1 and store.has(4, 0, "result", "h" * 64)
