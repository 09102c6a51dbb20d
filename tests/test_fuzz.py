"""Property-based fuzzing of every message type through a live coordinator.

Strategies are derived from the protocol itself (the ``Message`` union and each Struct's
fields), so a message added later is fuzzed too. Each example is sent by a fresh peer in one
of the places a node can put it: as the first frame of a connection, on the control stream
of a joined node, on a barrier stream, or on an observer's stream (then some random bytes).
After every example the coordinator must still be up and answering status; after them all,
an honest session must still complete with checkpoints that verify.

Seeded: the examples are the same on every run (the seed is printed).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import typing
from collections.abc import Coroutine
from typing import Any, Literal, get_args, get_origin

import msgspec
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from lightning_drift_cli.local import free_udp_port
from support import honest_step, node_info, small_fingerprint, small_model, verify_checkpoints

from lightning_drift import protocol as p
from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.coordinator.config import ServeOptions, SessionConfig
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.errors import DriftError
from lightning_drift.node.client import CoordinatorClient
from lightning_drift.transport import Endpoint

SEED = 20260707
MESSAGES: tuple[type, ...] = get_args(p.Message)
POSITIONS = ("first", "control", "barrier", "observer")
WEIRD = ["", "[/]", "\x1b[2J\x1b]0;x\x07", "a\nINFO forged", "\u202e", "x" * 5000, "0" * 64]

pytestmark = pytest.mark.slow


def strategy(tp: Any) -> st.SearchStrategy[Any]:
    """Values of type ``tp`` as the protocol declares it, edge cases favoured."""
    origin = get_origin(tp)
    if tp is int:
        edges = st.sampled_from([0, 1, -1, 2**31, 2**53 + 1, 2**62, 2**63 - 1, -(2**63)])
        return st.one_of(edges, st.integers(-(2**63), 2**63 - 1))
    if tp is float:
        edges = st.sampled_from([0.0, -0.0, 5e-324, 1e-300, 1e308, -1e308, 3.4e38, 1e30])
        return st.one_of(edges, st.floats(allow_nan=True, allow_infinity=True))
    if tp is str:
        return st.one_of(st.sampled_from(WEIRD), st.text(max_size=80))
    if tp is bool:
        return st.booleans()
    if tp is bytes:
        return st.one_of(
            st.sampled_from([b"", b"\0" * 64, b"\xff" * 5000]), st.binary(max_size=200)
        )
    if tp is type(None):
        return st.none()
    if origin is Literal:
        return st.one_of(st.sampled_from(get_args(tp)), st.text(max_size=8))
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        return st.one_of(*(strategy(a) for a in get_args(tp)))
    if origin is list:
        return st.lists(strategy(get_args(tp)[0]), max_size=20)
    if origin is tuple:
        return st.tuples(*(strategy(a) for a in get_args(tp)))
    if origin is dict:
        k, v = get_args(tp)
        return st.dictionaries(strategy(k), strategy(v), max_size=4)
    if isinstance(tp, type) and issubclass(tp, msgspec.Struct):
        fields = {f.name: strategy(f.type) for f in msgspec.structs.fields(tp)}
        return st.builds(tp, **fields)
    raise TypeError(f"no fuzz strategy for {tp!r}: add one")


class LoopThread:
    """An event loop in a thread: the coordinator lives in it across hypothesis examples."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()

    def call(self, coro: Coroutine[Any, Any, Any], timeout: float = 60.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Live:
    def __init__(self, tmp_path) -> None:
        self.lt = LoopThread()
        cfg = SessionConfig(
            epochs=1, batch_size=10, sync_every=10, min_nodes=2, dataset_size=600,
            heartbeat_timeout=5.0, heartbeat_s=0.5, deadline_floor=2.0, max_nodes=1000,
            max_nodes_per_token=1000,
        )  # fmt: skip
        opts = ServeOptions(
            state_dir=tmp_path / "state",
            port=free_udp_port(),
            tick_s=0.1,
            finish_grace_s=0.3,
            upload_grace_s=1.0,
            handshake_timeout_s=3.0,
        )
        self.coord = Coordinator(cfg, opts)
        self.lt.call(self.coord.start())
        self.runner = asyncio.run_coroutine_threadsafe(self.coord.run(), self.lt.loop)
        self.observer = self.lt.call(
            CoordinatorClient.connect(self.coord.observer_token, timeout=10)
        )

    def alive(self) -> None:
        """The coordinator is up and a standing observer still gets status."""
        assert not self.runner.done() and self.coord.fatal is None
        st = self.lt.call(asyncio.wait_for(self.observer.status(), 10))
        assert st.session_id == self.coord.session.session_id


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    print(f"fuzz seed {SEED}")
    lv = Live(tmp_path_factory.mktemp("fuzz"))
    yield lv
    lv.lt.call(lv.observer.close())
    lv.runner.cancel()
    lv.lt.call(lv.coord.close())
    lv.lt.stop()


async def deliver(coord: Coordinator, position: str, payload: bytes, junk: bytes) -> None:
    """Send one frame body ``payload`` (then ``junk``) from a fresh peer at ``position``; take
    whatever answer comes (or none) and hang up."""
    frame = p.HEADER.pack(len(payload)) + payload
    ep = await Endpoint.bind()
    client = None
    try:
        if position == "first":
            conn = await ep.dial(coord.ticket, timeout=10)
            stream = await conn.open_stream()
        elif position == "observer":
            client = await CoordinatorClient.connect(coord.observer_token, timeout=10, endpoint=ep)
            stream = client.control
        else:
            client = await CoordinatorClient.connect(
                coord.node_token,
                node_info=node_info(600, small_fingerprint()),
                name="fuzz",
                timeout=10,
                endpoint=ep,
            )
            stream = client.control if position == "control" else await client.conn.open_stream()
        await stream.send_raw(frame + junk)
        with contextlib.suppress(DriftError, asyncio.TimeoutError):
            if position in ("first", "barrier"):
                await asyncio.wait_for(stream.recv(), 3)
            else:  # still answering this peer? (it may have been dropped, rightly)
                await asyncio.wait_for(client.status(), 3)  # type: ignore[union-attr]
    finally:
        if client is not None:
            await client.close("fuzz done")
        await ep.close()


@pytest.mark.parametrize("kind", MESSAGES, ids=lambda c: c.__name__)
def test_every_message_type_anywhere_leaves_the_coordinator_up(live, kind, caplog):
    @seed(SEED)
    @settings(
        max_examples=6,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )
    @given(
        msg=strategy(kind),
        position=st.sampled_from(POSITIONS),
        junk=st.one_of(st.just(b""), st.binary(max_size=64)),
    )
    def attack(msg, position, junk):
        body = p.encode(msg)
        if len(body) > p.MAX_FRAME:
            body = body[: p.MAX_FRAME]
        live.lt.call(deliver(live.coord, position, body, junk))
        live.alive()

    attack()
    assert_no_internal_errors(caplog)


def assert_no_internal_errors(caplog) -> None:
    """Nothing a peer sent reached a code path the coordinator did not expect (those log at
    ERROR with a traceback: connection.failed, barrier.failed, task.failed)."""
    bad = [
        r.getMessage()
        for r in caplog.records
        if r.levelno >= logging.ERROR and r.name.startswith("lightning_drift")
    ]
    assert not bad, bad


def test_bytes_that_are_no_message_leave_the_coordinator_up(live, caplog):
    @seed(SEED)
    @settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        raw=st.one_of(
            st.binary(min_size=1, max_size=200),
            st.sampled_from([b"{}", b"[]", b'{"type":"join"}', b'{"type":"nope"}', b"\xff" * 8]),
        ),
        position=st.sampled_from(POSITIONS),
    )
    def attack(raw, position):
        live.lt.call(deliver(live.coord, position, raw, b""))
        live.alive()

    attack()
    assert_no_internal_errors(caplog)


def test_an_honest_session_completes_after_the_fuzzing(live):
    async def node(i: int) -> dict:
        c = await CoordinatorClient.connect(
            live.coord.node_token,
            node_info=node_info(600, small_fingerprint()),
            name=f"honest{i}",
            timeout=10,
        )
        try:
            ready, blob = await c.barrier(p.BarrierSync(round=0), to_bytes(small_model()))
            held = from_bytes(blob)
            a = await c.shard(0)
            for k in range(a.rounds):
                r = a.first_round + k
                ready, blob = await c.barrier(
                    p.BarrierSync(round=r, samples=10, train_seconds=0.5),
                    to_bytes(honest_step(held, r, i)),
                )
                held = from_bytes(blob)
                if ready.finished:
                    break
            assert ready.finished
            return held
        finally:
            await c.close()

    async def both() -> list[dict]:
        return await asyncio.gather(node(0), node(1))

    finals = live.lt.call(both(), timeout=120)
    assert finals[0].keys() == small_model().keys()
    verify_checkpoints(live.coord.store.directory)
    assert live.coord.session.finished
