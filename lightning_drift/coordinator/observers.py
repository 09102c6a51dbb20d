"""An observer's connection (``drift status``, the live view): status requests answered until
it leaves, and never held for ever.

An observer sends a ``StatusRequest`` (or a ``Ping``) now and then and reads the answer. One
that sends nothing for :func:`idle_s` (four heartbeat timeouts, at least
:data:`IDLE_MIN_S`), or reads nothing of an answer for a heartbeat timeout, is closed: an
observer token's holder cannot keep connections, and their tasks, open by doing nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from lightning_drift.errors import ProtocolError
from lightning_drift.protocol import MAX_FRAME, Bye, Ping, SessionStatus, StatusRequest, encode
from lightning_drift.transport import Connection, Stream

IDLE_MIN_S = 120.0  # an observer sending nothing for longer is closed (at least)


def fitted(st: SessionStatus) -> SessionStatus:
    """``st`` within the frame limit: half its nodes dropped until it fits, then the
    operator's YAML (too large alone to show)."""
    while len(encode(st)) > MAX_FRAME - 1024 and st.nodes:
        del st.nodes[len(st.nodes) // 2 :]
    if len(encode(st)) > MAX_FRAME - 1024:
        st.lightning_config = ""
    return st


def idle_s(heartbeat_timeout: float) -> float:
    """How long an observer may send nothing and stay."""
    return max(IDLE_MIN_S, 4 * heartbeat_timeout)


async def serve(
    conn: Connection, stream: Stream, status: Callable[[], SessionStatus], heartbeat_timeout: float
) -> None:
    """Answer one observer's requests with ``status()`` until it says Bye or is closed."""
    idle = idle_s(heartbeat_timeout)
    while True:
        try:
            msg = await asyncio.wait_for(stream.recv(), idle)
        except asyncio.TimeoutError:
            conn.close(0, f"observer idle for {idle:g}s")
            return
        if isinstance(msg, StatusRequest):
            try:
                await asyncio.wait_for(stream.send(status()), heartbeat_timeout)
            except asyncio.TimeoutError:
                conn.close(0, "the observer read nothing")
                return
        elif isinstance(msg, Ping):
            continue
        elif isinstance(msg, Bye):
            conn.close(0, "")
            return
        else:
            raise ProtocolError(f"observers may send StatusRequest, not {type(msg).__name__}")


__all__ = ["IDLE_MIN_S", "fitted", "idle_s", "serve"]
