"""Shared test helpers. Keep this small: fixtures used by more than one test module only."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Awaitable
from pathlib import Path
from typing import TypeVar

import pytest

T = TypeVar("T")

# The benchmarks' tools that tests share (the WAN proxy, `import netsim`) live in benchmarks/,
# outside the library. Appended, so nothing of the tests' own is shadowed.
_BENCHMARKS = str(Path(__file__).resolve().parents[1] / "benchmarks")
if _BENCHMARKS not in sys.path:
    sys.path.append(_BENCHMARKS)


def run_async(coro: Awaitable[T], timeout: float = 60.0) -> T:
    """Run ``coro`` on a fresh event loop, failing the test if it takes longer than ``timeout``.

    Use it from plain (synchronous) tests: no async test plugin is needed.
    """

    async def _bounded() -> T:
        return await asyncio.wait_for(coro, timeout)

    return asyncio.run(_bounded())


@pytest.fixture(autouse=True)
def _own_user_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test (and every process it starts) gets its own per-user folder: a remembered
    token or a node key never lands in the real home, nor leaks from one test to the next."""
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path_factory.mktemp("user-state")))
