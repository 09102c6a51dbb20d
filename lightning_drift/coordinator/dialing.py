"""The coordinator dialing the nodes of its ``--peers`` list.

A listed node the coordinator has an address for (any id in internet mode) is dialled
whenever it is not connected, until the session has finished; once connected, it is served
as if it had dialled (the handshake from Ping on). A node that is down or not listening yet
is tried again with a growing wait, at most every 30 s. The boundary is here because this is
the one loop where the coordinator opens connections rather than accepts them: the server
hands it how to tell that a node is connected and how to serve a new connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

from lightning_drift.errors import DriftError
from lightning_drift.peers import PeerName
from lightning_drift.text import short_id
from lightning_drift.transport import Connection, Endpoint, Stream

log = logging.getLogger(__name__)

DIAL_TIMEOUT_S = 10.0  # one dial of a --peers node
DIAL_BACKOFF_MAX_S = 30.0  # the longest wait between two dials of a node that is not there


async def keep_dialing(
    endpoint: Endpoint,
    key: str,
    peer: PeerName,
    *,
    done: Callable[[], bool],
    connected: Callable[[str], bool],
    serve: Callable[[Connection, Stream], Awaitable[None]],
    tick_s: float,
) -> None:
    """Dial ``peer`` (node id ``key``) whenever it is not ``connected``, until ``done``;
    ``serve`` each connection made (it returns when the connection ends)."""
    delay = 1.0
    while not done():
        if connected(key):  # connected (it may have dialled in itself)
            await asyncio.sleep(tick_s)
            continue
        try:
            conn = await endpoint.dial_peer(peer, timeout=DIAL_TIMEOUT_S)
        except DriftError as exc:
            log.debug("peer.dial_failed node=%s retry_in=%.0fs error=%s", short_id(key), delay, exc)
            await asyncio.sleep(delay)
            delay = min(2 * delay, DIAL_BACKOFF_MAX_S)
            continue
        delay = 1.0
        log.info("peer.dialled node=%s", short_id(key))
        try:
            stream = await conn.open_stream()
        except DriftError:
            conn.close(1, "no stream")
            continue
        await serve(conn, stream)


__all__ = ["DIAL_BACKOFF_MAX_S", "DIAL_TIMEOUT_S", "keep_dialing"]
