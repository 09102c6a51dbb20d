"""A node's connection as the coordinator holds it: a send never waits for ever."""

from __future__ import annotations

import asyncio

from conftest import run_async

from lightning_drift.coordinator.conns import NodeConn


class _Stalled:
    """A control stream whose peer reads nothing: every write waits for window space."""

    def __init__(self) -> None:
        self.sent: list[object] = []
        self.blocked = False

    async def send(self, msg: object) -> None:
        if self.blocked:
            await asyncio.Event().wait()
        self.sent.append(msg)


class _Conn:
    def __init__(self) -> None:
        self.closed: tuple[int, str] | None = None

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)


def test_a_node_that_reads_nothing_is_closed_after_the_send_timeout_not_waited_on():
    async def main() -> None:
        stream, conn = _Stalled(), _Conn()
        nc = NodeConn("a" * 64, conn, stream, send_timeout=0.2)  # type: ignore[arg-type]
        assert await nc.send("ping") and stream.sent == ["ping"] and conn.closed is None
        stream.blocked = True
        results = await asyncio.wait_for(
            asyncio.gather(*(nc.send(f"ping {i}") for i in range(5))), 5
        )
        assert results == [False] * 5  # every queued send ends, none waits for ever
        assert conn.closed == (2, "the node did not read its control stream")

    run_async(main(), timeout=30)
