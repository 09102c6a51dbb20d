"""Transport over real iroh endpoints on loopback (relays off): handshake, blobs, bad peers."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from conftest import run_async

from lightning_drift import protocol as p
from lightning_drift import streams, transport
from lightning_drift.errors import AuthError, ConnectTimeout, DriftError, PeerLost, ProtocolError
from lightning_drift.transport import Connection, Endpoint, Stream

pytestmark = pytest.mark.timeout(120)


@contextlib.asynccontextmanager
async def endpoints(n: int = 2) -> AsyncIterator[list[Endpoint]]:
    eps = [await Endpoint.bind() for _ in range(n)]
    try:
        yield eps
    finally:
        for ep in eps:
            await ep.close()


async def serve(ep: Endpoint, handler) -> None:
    """A tiny server: one task per connection running ``handler(conn)``."""
    tasks = set()
    try:
        while (conn := await ep.accept()) is not None:
            task = asyncio.create_task(handler(conn))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
    finally:
        for task in tasks:
            task.cancel()


async def echo_or_refuse(conn: Connection) -> None:
    """Answer Ping with Ping on every stream; a bad frame gets an Error frame and a hang-up."""
    while True:
        try:
            stream = await conn.accept_stream()
        except PeerLost:
            return
        while True:
            try:
                msg = await stream.recv()
            except ProtocolError as exc:
                await stream.send(p.Error(code="protocol", message=str(exc)))
                await stream.finish()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(conn.closed(), 2)  # let the Error frame arrive
                conn.close(2, "protocol error")
                return
            except PeerLost:
                break
            if isinstance(msg, p.Ping):
                await stream.send(p.Ping(session_id=msg.session_id, nonce=msg.nonce + "!"))


async def ping(ep: Endpoint, ticket: str) -> str:
    conn = await ep.dial(ticket, timeout=10)
    try:
        s = await conn.open_stream()
        await s.send(p.Ping(session_id="s", nonce="n"))
        reply = await s.recv()
        assert isinstance(reply, p.Ping)
        return reply.nonce
    finally:
        conn.close()


def test_a_closed_endpoint_frees_its_port_at_once() -> None:
    async def main() -> None:
        first = await Endpoint.bind()
        port = first.addrs()[0].rsplit(":", 1)[1]
        await first.close()
        # The wrapper is still referenced: the port must be free anyway (a restart binds it).
        again = await Endpoint.bind(bind_addr=f"127.0.0.1:{port}")
        assert again.addrs() == [f"127.0.0.1:{port}"]
        await again.close()
        with pytest.raises(DriftError, match="closed"):
            first.ticket()

    run_async(main(), 30)


# ---------------------------------------------------------------------------- handshake


def test_handshake_join_ping_nodeinfo_config_shard() -> None:
    async def handler(conn: Connection) -> None:
        s = await conn.accept_stream()
        join = p.expect(await s.recv(), p.Join)
        assert join.node_key == conn.remote_hex  # the claimed key is the QUIC peer
        await s.send(p.Ping(session_id="sess", nonce="n1"))
        info = p.expect(await s.recv(), p.NodeInfo)
        assert info.nonce == "n1"
        await s.send(
            p.TrainConfig(
                session_id="sess", epochs=2, batch_size=8, sync_every=50, aggregation="mean",
                outer_lr=0.7, outer_momentum=0.9, transfer_dtype="float32", seed=0,
                dataset_size=info.dataset_size, round=0, epoch=0, heartbeat_s=5.0,
                progress_every_s=5.0, has_weights=False, min_nodes=1, lightning_config="",
            )
        )  # fmt: skip
        await s.send(
            p.ShardAssignment(epoch=0, start=0, stop=info.dataset_size, rounds=3, first_round=1)
        )
        with contextlib.suppress(PeerLost):
            await s.recv()

    async def main() -> None:
        async with endpoints() as (srv, cli):
            server = asyncio.create_task(serve(srv, handler))
            conn = await cli.dial(srv.ticket(), timeout=10)
            assert conn.remote_key == srv.key
            s = await conn.open_stream()
            await s.send(p.Join(token="t", node_key=cli.key_hex, drift_version="0.1.0"))
            ping_msg = p.expect(await s.recv(), p.Ping)
            dev = p.DeviceInfo(name="cpu", kind="cpu")
            await s.send(
                p.NodeInfo(
                    nonce=ping_msg.nonce,
                    devices=[dev],
                    train_device="cpu",
                    cpu="x",
                    cpu_count=2,
                    memory=1 << 30,
                    calibration=1.0,
                    torch_version="2",
                    dataset_size=1000,
                )
            )
            cfg = p.expect(await s.recv(), p.TrainConfig)
            shard = p.expect(await s.recv(), p.ShardAssignment)
            assert (cfg.session_id, cfg.epochs, shard.stop, shard.rounds) == ("sess", 2, 1000, 3)
            await s.finish()
            conn.close()
            server.cancel()

    run_async(main(), 60)


# ---------------------------------------------------------------------------- blobs


def test_blob_64mb_into_memory_and_into_file(tmp_path: Path) -> None:
    blob = os.urandom(64 << 20)
    digest = hashlib.sha256(blob).hexdigest()
    got: dict[str, object] = {}

    async def handler(conn: Connection) -> None:
        s = await conn.accept_stream()
        h1, data = await s.recv_blob()
        got["mem"] = (h1, data)
        h2, path = await s.recv_blob(into=tmp_path / "w.safetensors")
        got["file"] = (h2, path)
        await s.send(p.Bye())

    async def main() -> None:
        async with endpoints() as (srv, cli):
            server = asyncio.create_task(serve(srv, handler))
            conn = await cli.dial(srv.ticket(), timeout=10)
            s = await conn.open_stream()
            sent = await s.send_blob(blob, kind="weights", dtype="float32", meta={"round": "3"})
            assert sent.sha256 == digest and sent.size == len(blob)
            src = tmp_path / "src.bin"
            src.write_bytes(blob[: 5 << 20])
            await s.send_blob(src, kind="checkpoint")
            p.expect(await s.recv(), p.Bye)
            conn.close()
            server.cancel()

    run_async(main(), 100)
    h1, data = got["mem"]
    assert isinstance(data, bytes) and data == blob
    assert (h1.sha256, h1.size, h1.dtype, h1.meta) == (digest, 64 << 20, "float32", {"round": "3"})
    h2, path = got["file"]
    assert path == tmp_path / "w.safetensors" and path.read_bytes() == blob[: 5 << 20]
    assert h2.kind == "checkpoint"
    assert sorted(x.name for x in tmp_path.iterdir()) == ["src.bin", "w.safetensors"]


def test_bad_checksum_is_detected_and_no_file_is_left(tmp_path: Path) -> None:
    errors: list[Exception] = []

    async def handler(conn: Connection) -> None:
        for into in (None, tmp_path / "x.bin"):
            s = await conn.accept_stream()
            try:
                await s.recv_blob(into=into)
            except ProtocolError as exc:
                errors.append(exc)
                await s.send(p.Error(code="bad_blob", message=str(exc)))

    async def main() -> None:
        async with endpoints() as (srv, cli):
            server = asyncio.create_task(serve(srv, handler))
            conn = await cli.dial(srv.ticket(), timeout=10)
            data = os.urandom(3 << 20)
            for _ in range(2):
                s = await conn.open_stream()
                await s.send(p.BlobHeader(size=len(data), sha256=hashlib.sha256(b"x").hexdigest()))
                await s.send_raw(data)
                with pytest.raises(ProtocolError, match="bad_blob: blob checksum mismatch"):
                    p.expect(await s.recv(), p.Bye)
            conn.close()
            server.cancel()

    run_async(main(), 60)
    assert len(errors) == 2 and all("checksum mismatch" in str(e) for e in errors)
    assert list(tmp_path.iterdir()) == []


@contextlib.asynccontextmanager
async def stream_pair() -> AsyncIterator[tuple[Stream, asyncio.Future[Stream]]]:
    """A stream opened to a served endpoint, and (as a future) the stream it accepted."""
    async with endpoints() as (srv, cli):
        accepted: asyncio.Future[Stream] = asyncio.get_running_loop().create_future()

        async def handler(conn: Connection) -> None:
            accepted.set_result(await conn.accept_stream())
            await conn.closed()

        server = asyncio.create_task(serve(srv, handler))
        conn = await cli.dial(srv.ticket(), timeout=10)
        try:
            yield await conn.open_stream(), accepted
        finally:
            conn.close()
            server.cancel()


def test_blob_over_max_size_is_refused_before_reading() -> None:
    async def main() -> None:
        async with stream_pair() as (s, accepted):
            await s.send(p.BlobHeader(size=10 << 30, sha256="0" * 64))  # no body follows
            rs = await asyncio.wait_for(accepted, 10)
            with pytest.raises(ProtocolError, match="refused: the limit is 1048576"):
                await asyncio.wait_for(rs.recv_blob(max_size=1 << 20), 10)

    run_async(main(), 60)


def test_a_blobs_start_is_checked_as_it_arrives_not_after_the_body() -> None:
    # The start of an untrusted blob comes in two parts and the body never does: the check
    # sees the start as soon as it is whole (and refuses it), instead of the reader waiting
    # for a body the sender will not send.
    seen: list[int] = []

    def inspect(prefix: bytearray, size: int) -> int:
        seen.append(len(prefix))
        if len(prefix) < 8:
            return 8
        raise ValueError(f"bad start {bytes(prefix[:8])!r}")

    async def main() -> None:
        async with stream_pair() as (s, accepted):
            await s.send(p.BlobHeader(size=10_000, sha256="0" * 64))
            await s.send_raw(b"START")
            rs = await asyncio.wait_for(accepted, 10)
            reading = asyncio.ensure_future(rs.recv_blob(inspect=inspect))
            await asyncio.sleep(0.3)
            await s.send_raw(b"ED!")  # the start is whole; the body never comes
            with pytest.raises(ValueError, match="bad start b'STARTED!'"):
                await asyncio.wait_for(reading, 10)
            assert seen[-1] == 8

    run_async(main(), 60)


class _FakeSend:
    def __init__(self) -> None:
        self.sizes: list[int] = []
        self.data: list[bytes] = []

    async def write_all(self, buf) -> None:
        self.sizes.append(len(buf))
        self.data.append(bytes(buf))


class _FakeRecv:
    """Serves a frame, then blob bytes, recording how much each read asked for."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.asked: list[int] = []

    async def read(self, n: int) -> bytes:
        self.asked.append(n)
        out, self.data = self.data[:100], self.data[100:]  # small pieces: exercises buffering
        return out

    async def read_exact(self, n: int) -> bytes:
        self.asked.append(n)
        out, self.data = self.data[:n], self.data[n:]
        return out


def test_blobs_always_travel_in_chunks_of_at_most_one_mib() -> None:
    blob = os.urandom((3 << 20) + 12345)

    async def main() -> None:
        send = _FakeSend()
        await Stream(send, None).send_blob(memoryview(blob))
        frame, rest = send.sizes[0], send.sizes[1:]
        assert max(rest) <= transport.CHUNK and sum(rest) == len(blob) and frame < 300
        header = p.encode_frame(
            p.BlobHeader(size=len(blob), sha256=hashlib.sha256(blob).hexdigest())
        )
        recv = _FakeRecv(header + blob)
        h, data = await Stream(None, recv).recv_blob()
        assert data == blob and h.size == len(blob)
        assert max(recv.asked) <= transport.CHUNK

    run_async(main(), 30)


def test_a_known_digest_is_sent_without_hashing_the_blob_again(monkeypatch) -> None:
    blob = os.urandom(100_000)
    digest = hashlib.sha256(blob).hexdigest()

    def no_hashing(*args: object) -> str:
        raise AssertionError("send_blob hashed a blob whose digest it was given")

    monkeypatch.setattr(streams, "sha256_bytes", no_hashing)

    async def main() -> None:
        send = _FakeSend()
        header = await Stream(send, None).send_blob(blob, sha256=digest)
        assert header.sha256 == digest and header.size == len(blob)
        recv = _FakeRecv(b"".join(send.data))
        h, data = await Stream(None, recv).recv_blob()  # the receiver checks it as always
        assert data == blob and h.sha256 == digest

    run_async(main(), 30)


# ---------------------------------------------------------------------------- bad peers


def test_garbage_and_oversized_frames_get_an_error_while_others_keep_working() -> None:
    async def main() -> None:
        async with endpoints() as (srv, cli):
            server = asyncio.create_task(serve(srv, echo_or_refuse))
            ticket = srv.ticket()
            good = await cli.dial(ticket, timeout=10)
            gs = await good.open_stream()
            for bad in (
                b"\x00\x00\x00\x05hello",  # not JSON
                b"\x00\x00\x00\x0f" + b'{"type":"nope"}',  # unknown message type
                (p.MAX_FRAME + 1).to_bytes(4, "big"),  # oversized: no body follows at all
            ):
                conn = await cli.dial(ticket, timeout=10)
                s = await conn.open_stream()
                await s.send_raw(bad)
                with pytest.raises(ProtocolError, match="peer refused: protocol: "):
                    p.expect(await asyncio.wait_for(s.recv(), 10), p.Ping)
                conn.close()
                # the other connection to the same endpoint is unaffected
                await gs.send(p.Ping(session_id="s", nonce="g"))
                assert p.expect(await asyncio.wait_for(gs.recv(), 10), p.Ping).nonce == "g!"
            assert await ping(cli, ticket) == "n!"
            good.close()
            server.cancel()

    run_async(main(), 60)


def test_a_stream_maps_only_the_errors_its_halves_are_said_to_raise() -> None:
    class Broken(Exception):
        pass

    class BrokenSend:
        async def write_all(self, buf) -> None:
            raise Broken("gone")

    def mapped(exc: BaseException, doing: str) -> DriftError:
        return PeerLost(f"{doing}: mapped {exc}")

    async def main() -> None:
        s = Stream(BrokenSend(), None, io_errors=(Broken,), map_error=mapped)
        with pytest.raises(PeerLost, match="sending: mapped gone"):
            await s.send(p.Ping(session_id="s", nonce="n"))
        with pytest.raises(Broken):  # not said to be the halves' error: not ours to map
            await Stream(BrokenSend(), None).send_raw(b"x")

    run_async(main(), 10)


def test_oversized_frame_message_names_the_limit() -> None:
    async def main() -> None:
        send = _FakeSend()
        recv = _FakeRecv((p.MAX_FRAME + 1).to_bytes(4, "big") + b"x" * 10)
        s = Stream(send, recv)
        with pytest.raises(ProtocolError, match="exceeds the 1048576-byte limit"):
            await s.recv()
        assert sum(recv.asked) <= streams.READ_AHEAD  # the body was never asked for
        with pytest.raises(PeerLost, match="unusable"):
            await s.recv()

    run_async(main(), 10)


def test_peer_ending_the_stream_is_peer_lost() -> None:
    async def main() -> None:
        async with endpoints() as (srv, cli):
            streams: asyncio.Queue[Stream] = asyncio.Queue()

            async def handler(conn: Connection) -> None:
                with contextlib.suppress(PeerLost):
                    while True:
                        await streams.put(await conn.accept_stream())

            server = asyncio.create_task(serve(srv, handler))
            conn = await cli.dial(srv.ticket(), timeout=10)
            s = await conn.open_stream()
            await s.send(p.Bye(reason="x"))
            await s.send_raw(b"\x00\x00\x00\x10{")  # half a frame, then the end
            await s.finish()
            rs = await asyncio.wait_for(streams.get(), 10)
            assert p.expect(await rs.recv(), p.Bye).reason == "x"
            with pytest.raises(PeerLost, match="inside a frame"):
                await asyncio.wait_for(rs.recv(), 10)
            # a closed connection: accept_stream raises PeerLost quickly
            s2 = await conn.open_stream()
            await s2.send(p.Bye())
            rs2 = await asyncio.wait_for(streams.get(), 10)
            conn.close(0, "done")
            with pytest.raises(PeerLost):  # the Bye may or may not arrive before the close
                for _ in range(2):
                    await asyncio.wait_for(rs2.recv(), 10)
            server.cancel()

    run_async(main(), 60)


# ---------------------------------------------------------------------------- dialing


def test_wrong_alpn_is_refused_quickly() -> None:
    async def main() -> None:
        async with endpoints() as (srv, cli):
            server = asyncio.create_task(serve(srv, echo_or_refuse))
            t0 = time.monotonic()
            with pytest.raises(ConnectTimeout, match="no connection"):
                await cli.dial(srv.ticket(), timeout=10, alpn=b"other/0")
            assert time.monotonic() - t0 < 5
            assert await ping(cli, srv.ticket()) == "n!"  # drift/0 still works
            server.cancel()

    run_async(main(), 60)


def test_wrong_coordinator_key_is_refused() -> None:
    async def main() -> None:
        async with endpoints() as (srv, cli):
            server = asyncio.create_task(serve(srv, echo_or_refuse))
            with pytest.raises(AuthError, match="expected"):
                await cli.dial(srv.ticket(), timeout=10, expect_key=os.urandom(32))
            conn = await cli.dial(srv.ticket(), timeout=10, expect_key=srv.key)
            assert conn.remote_hex == srv.key_hex
            conn.close()
            server.cancel()

    run_async(main(), 60)


def test_dial_to_a_dead_address_times_out_quickly() -> None:
    async def main() -> None:
        dead = await Endpoint.bind()
        ticket = dead.ticket()
        await dead.close()
        async with endpoints(1) as (cli,):
            t0 = time.monotonic()
            with pytest.raises(ConnectTimeout, match="within 0.5 s"):
                await cli.dial(ticket, timeout=0.5)
            assert time.monotonic() - t0 < 3

    run_async(main(), 30)


def test_ticket_key_and_secret() -> None:
    async def main() -> None:
        seed = bytes(range(32))
        ep = await Endpoint.bind(secret=seed)
        try:
            import nacl.signing

            assert ep.key == bytes(nacl.signing.SigningKey(seed).verify_key)
            assert transport.ticket_key(ep.ticket()) == ep.key
            assert ep.addrs()[0].startswith("127.0.0.1:")
        finally:
            await ep.close()
        assert await ep.accept() is None  # closed endpoints accept nothing

    run_async(main(), 30)
    for bad in ("", "endpointgarbage", "eyJhbGc"):
        with pytest.raises(AuthError, match="malformed ticket"):
            transport.ticket_key(bad)
