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

    def __init__(self, node: str, conn: Connection, control: Stream, token: str = "") -> None:
        self.node = node
        self.conn = conn
        self.control = control
        self.token = token  # the jti it joined with
        self.lock = asyncio.Lock()
        self.tasks: set[asyncio.Task[Any]] = set()

    async def send(self, msg: Any) -> bool:
        try:
            async with self.lock:
                await self.control.send(msg)
            return True
        except DriftError as exc:
            log.debug(
                "send failed node=%s msg=%s error=%r", short_id(self.node), type(msg).__name__, exc
            )
            return False


__all__ = ["End", "Ended", "NodeConn"]
