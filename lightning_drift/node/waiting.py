"""The training thread's waits on the network thread: never silent.

A node waits on its coordinator for two things it cannot hurry: an epoch's plan (the session
waits for its start gate, ``--min-nodes``, or for the nodes still training the epoch before)
and a round's global weights (the session waits for the round's other nodes, at most until
its hard deadline drops them). Both end when the coordinator answers, or with an error when
it goes away (heartbeats, then ``reconnect_timeout``). Meanwhile :func:`result` says, every
:data:`EVERY_S` seconds, what the node has been waiting for and how long, so a long wait is
never mistaken for a hang.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")
EVERY_S = 30.0


def result(fut: Future[T], what: str, every: float = EVERY_S) -> T:
    """``fut``'s result (or its error), logging ``what`` it waits for every ``every`` s."""
    started = time.monotonic()
    while True:
        try:
            return fut.result(timeout=every)
        except FutureTimeout:
            log.warning(
                "still waiting for %s after %.0f s (`drift status` shows what the session "
                "waits for)",
                what,
                time.monotonic() - started,
            )


__all__ = ["EVERY_S", "result"]
