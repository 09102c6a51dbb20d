"""A node that waits for its coordinator: the endpoint the coordinator dials.

``drift train --listen --peer COORDINATOR`` (``DriftStrategy(listen=..., peer=...)``) binds
the node's endpoint with its own lasting key and waits; the coordinator, started with this
node's id (or ticket) in ``--peers``, dials it and runs the handshake from Ping on. Only the
coordinator key the node was given gets in: any other peer's connection is closed at once.

The listener keeps at most one connection waiting: a newer one from the coordinator replaces
an older one (a coordinator that restarted dials again), and it also closes the connection in
use, so that the node's runtime moves to the new one at once instead of waiting for the old
one's silence.

The address a listening node is reached at is logged once, on the ``lightning_drift.node.listen``
logger at INFO, which this module sets to INFO (as Lightning does for its own messages): the
person starting the node needs it to start the coordinator.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence

from lightning_drift.errors import ConnectTimeout
from lightning_drift.transport import Connection, Endpoint

log = logging.getLogger(__name__)
log.setLevel(logging.INFO)

DEFAULT_LISTEN = "0.0.0.0:0"  # every interface, a port the system picks


class CoordinatorListener:
    """The endpoint of a node that waits for the coordinator ``coordinator_key`` to dial in.

    Make it with :meth:`bind` (on the event loop that will use it); :meth:`next` gives the
    next connection from the coordinator; :meth:`close` closes the endpoint."""

    def __init__(self, endpoint: Endpoint, coordinator_key: bytes) -> None:
        self.endpoint = endpoint
        self.coordinator_key = bytes(coordinator_key)
        self._waiting: Connection | None = None
        self._arrived = asyncio.Event()
        self.current: Connection | None = None  # the connection the node runs on, if any
        self._task = asyncio.create_task(self._accept())

    @classmethod
    async def bind(
        cls,
        *,
        secret: bytes,
        coordinator_key: bytes,
        mode: str = "local",
        listen: str = DEFAULT_LISTEN,
        relay_urls: Sequence[str] = (),
    ) -> CoordinatorListener:
        """Bind the node's endpoint at ``listen`` (``host:port``; ``""``: the default) and
        start waiting."""
        endpoint = await Endpoint.bind(
            mode=mode, secret=secret, bind_addr=listen or DEFAULT_LISTEN, relay_urls=relay_urls
        )
        self = cls(endpoint, coordinator_key)
        ticket = endpoint.ticket()
        addrs = endpoint.addrs()
        log.info(
            "listening node_id=%s coordinator=%s… ticket=%s addrs=%s: start the coordinator "
            "with --peers %s (or %s@HOST:PORT)",
            endpoint.key_hex,
            self.coordinator_key.hex()[:16],
            ticket,
            ",".join(addrs),
            ticket,
            endpoint.key_hex,
        )
        return self

    @property
    def node_key(self) -> str:
        return self.endpoint.key_hex

    def ticket(self) -> str:
        return self.endpoint.ticket()

    async def _accept(self) -> None:
        while True:
            conn = await self.endpoint.accept()
            if conn is None:  # the endpoint was closed
                self._arrived.set()
                return
            if conn.remote_key != self.coordinator_key:
                log.warning(
                    "refused a connection from %s…: this node waits for coordinator %s…",
                    conn.remote_hex[:16],
                    self.coordinator_key.hex()[:16],
                )
                conn.close(1, "this node waits for another coordinator")
                continue
            for older in (self._waiting, self.current):
                if older is not None:
                    older.close(0, "replaced by a newer connection from the coordinator")
            self._waiting = conn
            self._arrived.set()

    async def next(self, timeout: float) -> Connection:
        """The next connection from the coordinator; ConnectTimeout when none comes in
        ``timeout`` seconds (the node's runtime waits again, as it redials a coordinator)."""
        try:
            await asyncio.wait_for(self._wait(), timeout)
        except asyncio.TimeoutError:
            raise ConnectTimeout(
                f"coordinator {self.coordinator_key.hex()[:16]}… did not dial this node "
                f"({self.node_key[:16]}…) within {timeout:g} s; check that it runs with this "
                "node in its --peers"
            ) from None
        conn, self._waiting = self._waiting, None
        if conn is None:
            raise ConnectTimeout("the node's endpoint was closed while waiting for the coordinator")
        self._arrived.clear()
        self.current = conn
        return conn

    async def _wait(self) -> None:
        while self._waiting is None and not self._task.done():
            await self._arrived.wait()
            if self._waiting is None:
                self._arrived.clear()

    async def close(self) -> None:
        """Stop waiting and close the endpoint (every connection with it). Idempotent."""
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        await self.endpoint.close()


__all__ = ["DEFAULT_LISTEN", "CoordinatorListener"]
