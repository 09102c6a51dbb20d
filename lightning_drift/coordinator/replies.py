"""The two ways the coordinator says no on a stream: answer one barrier stream with an
``Error`` and keep the connection (:func:`answer_error`), or send an ``Error`` and drop the
whole connection (:func:`refuse`). Shared by the connection shell (``server.py``), the
barrier streams (``barrier.py``) and the dialing loop; here so that none imports another
for them."""

from __future__ import annotations

import asyncio
import contextlib

from lightning_drift.errors import DriftError
from lightning_drift.protocol import Error
from lightning_drift.transport import Connection, Stream


async def answer_error(stream: Stream, code: str, message: str) -> None:
    """Answer a barrier stream with an Error and end it (the connection stays)."""
    with contextlib.suppress(DriftError):
        await stream.send(Error(code=code, message=message))
        await stream.finish()


async def refuse(conn: Connection, stream: Stream, code: str, message: str) -> None:
    """Send an Error frame, then drop the connection (a short wait lets the frame leave)."""
    with contextlib.suppress(DriftError, asyncio.TimeoutError):
        await asyncio.wait_for(stream.send(Error(code=code, message=message)), 2)
        await asyncio.wait_for(stream.finish(), 2)
    await asyncio.sleep(0.05)
    conn.close(1, code)


__all__ = ["answer_error", "refuse"]
