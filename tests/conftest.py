"""Shared test helpers. Keep this small: fixtures used by more than one test module only."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


def run_async(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run ``coro`` on a fresh event loop, failing the test if it takes longer than ``timeout``.

    Use it from plain (synchronous) tests: no async test plugin is needed.
    """

    async def _bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(_bounded())
