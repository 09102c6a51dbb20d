"""A node's connection as the coordinator holds it (:class:`NodeConn`), and why its control
stream ended (:class:`Ended`). Its own module so that the server, the gate and the barrier
streams share one definition without importing each other."""

from __future__ import annotations

import asyncio
import enum
import logging
from dataclasses import dataclass
from typing import Any

from lightning_drift.errors import DriftError
from lightning_drift.text import short_id
from lightning_drift.transport import Connection, Stream

log = logging.getLogger(__name__)
SEND_TIMEOUT_S = 30.0  # the default; the server gives the session's heartbeat timeout


class End(enum.Enum):
    """How a node's control stream ended."""

    BYE = "bye"  # the node said Bye: it left
    NODE_ERROR = "node error"  # the node sent an Error
    PROTOCOL = "protocol error"  # it broke the protocol
    LOST = "connection lost"  # the connection went away
    CLOSED = "connection closed"  # it ended otherwise (replaced, coordinator closing)


@dataclass(frozen=True)
class Ended:
    """Why a node's control stream ended: ``end``, and the words for the log."""

    end: End
    reason: str

    @property
    def left(self) -> bool:
        """The node left on its own (it is not lost)."""
        return self.end is End.BYE


class NodeConn:
    """One node's connection and its control stream (sends serialized by a lock)."""

    def __init__(
        self,
        node: str,
        conn: Connection,
        control: Stream,
        token: str = "",
        send_timeout: float = SEND_TIMEOUT_S,
    ) -> None:
        self.node = node
        self.conn = conn
        self.control = control
        self.token = token  # the jti it joined with
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[Any]] = set()
        # A node that stops reading its control stream blocks our writes once QUIC's window
        # is full: past this, the connection is closed rather than piling up waiting sends.
        self.send_timeout = send_timeout

    async def send(self, msg: Any) -> bool:
        try:
            await asyncio.wait_for(self._send(msg), self.send_timeout)
            return True
        except asyncio.TimeoutError:
            log.info(
                "node %s read nothing of its control stream for %gs; closing its connection",
                short_id(self.node),
                self.send_timeout,
            )
            self.conn.close(2, "the node did not read its control stream")
            return False
        except DriftError as exc:
            log.debug(
                "send failed node=%s msg=%s error=%r", short_id(self.node), type(msg).__name__, exc
            )
            return False

    async def _send(self, msg: Any) -> None:
        async with self.lock:
            await self.control.send(msg)


__all__ = ["SEND_TIMEOUT_S", "End", "Ended", "NodeConn"]
