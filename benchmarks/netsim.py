"""A userspace UDP proxy that makes a link look like a WAN: delay, bandwidth cap, loss.

For trying drift over a bad network on one machine (or between network namespaces) where
``tc netem`` is not available. QUIC runs over UDP and iroh authenticates peers by key, not
by address, so a node can dial the proxy's address with the coordinator's key::

    python benchmarks/netsim.py --listen 127.0.0.1:9000 --target 127.0.0.1:7842 \\
        --delay-ms 25 --rate-mbit 50 --loss 0.01

A tool for the benchmarks and the tests, not part of the library: ``benchmarks/wan.py``
imports it as ``netsim`` (its own folder is on ``sys.path``), and so do the tests
(``tests/conftest.py`` puts ``benchmarks/`` on ``sys.path``).

The proxy is one access link shared by all its clients, with one queue per direction: a
datagram leaves ``delay`` after it arrived, no earlier than the link's rate allows after the
previous one, and is dropped with probability ``loss`` (and when more than ``queue_s`` of
data is already waiting, as a full router buffer would). Its sockets ask for large receive
buffers so that the proxy itself, one Python process, loses as little as it can beyond what
it is told to.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import logging
import random
import socket
from collections.abc import Callable
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

Addr = tuple[str, int]


@dataclass
class LinkSpec:
    """One direction of the simulated link."""

    delay_s: float = 0.0
    rate_bps: float = 0.0  # bits per second; 0 = unlimited
    loss: float = 0.0
    queue_s: float = 0.5  # drop when this much transmission time is already queued


@dataclass
class LinkStats:
    forwarded: int = 0
    dropped: int = 0
    bytes: int = 0


@dataclass
class _Pipe:
    """The pacing state of one direction: when the link is next free."""

    spec: LinkSpec
    rng: random.Random
    stats: LinkStats = field(default_factory=LinkStats)
    free_at: float = 0.0

    def schedule(self, now: float, size: int) -> float | None:
        """When a datagram of ``size`` bytes arriving ``now`` is delivered; None if dropped."""
        if self.spec.loss and self.rng.random() < self.spec.loss:
            self.stats.dropped += 1
            return None
        start = max(now, self.free_at)
        if self.spec.rate_bps:
            if start - now > self.spec.queue_s:
                self.stats.dropped += 1
                return None
            self.free_at = start + size * 8 / self.spec.rate_bps
        else:
            self.free_at = start
        self.stats.forwarded += 1
        self.stats.bytes += size
        return self.free_at + self.spec.delay_s


RCVBUF = 8 << 20


class _Side(asyncio.DatagramProtocol):
    def __init__(self, on_datagram: Callable[[bytes, Addr], None]) -> None:
        self.on_datagram = on_datagram
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)

    def datagram_received(self, data: bytes, addr: Addr) -> None:
        self.on_datagram(data, addr)


class WanProxy:
    """Forward UDP between clients of ``listen`` and ``target`` through two simulated pipes."""

    def __init__(
        self,
        listen: Addr,
        target: Addr,
        up: LinkSpec,
        down: LinkSpec | None = None,
        seed: int = 0,
    ) -> None:
        self.listen = listen
        self.target = target
        rng = random.Random(seed)
        self.up = _Pipe(up, rng)
        self.down = _Pipe(down or up, rng)
        self._front: _Side | None = None
        self._backs: dict[Addr, _Side] = {}
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def address(self) -> Addr:
        assert self._front is not None and self._front.transport is not None
        return self._front.transport.get_extra_info("sockname")[:2]

    async def start(self) -> WanProxy:
        self._loop = asyncio.get_running_loop()
        _, self._front = await self._loop.create_datagram_endpoint(
            lambda: _Side(self._from_client), local_addr=self.listen
        )
        return self

    def transports(self) -> list[asyncio.DatagramTransport]:
        """The proxy's open sockets: the one clients send to and one per client towards the
        target (what :meth:`close` closes, and whose kernel drops a benchmark counts)."""
        sides = [self._front, *self._backs.values()]
        return [s.transport for s in sides if s is not None and s.transport is not None]

    def close(self) -> None:
        for transport in self.transports():
            transport.close()

    def _from_client(self, data: bytes, client: Addr) -> None:
        back = self._backs.get(client)
        if back is None:
            assert self._loop is not None
            back = _Side(functools.partial(self._from_target, client=client))
            self._backs[client] = back
            task = self._loop.create_datagram_endpoint(lambda: back, remote_addr=self.target)
            pending = asyncio.ensure_future(task)
            pending.add_done_callback(lambda _f: self._send(self.up, back, data, None))
            return
        self._send(self.up, back, data, None)

    def _from_target(self, data: bytes, _source: Addr, *, client: Addr) -> None:
        assert self._front is not None
        self._send(self.down, self._front, data, client)

    def _send(self, pipe: _Pipe, side: _Side, data: bytes, addr: Addr | None) -> None:
        assert self._loop is not None
        now = self._loop.time()
        at = pipe.schedule(now, len(data))
        if at is None or side.transport is None:
            return
        transport = side.transport
        self._loop.call_at(at, lambda: transport.sendto(data, addr))


def _addr(text: str) -> Addr:
    host, _, port = text.rpartition(":")
    return host, int(port)


async def _main(args: argparse.Namespace) -> None:
    spec = LinkSpec(delay_s=args.delay_ms / 1000, rate_bps=args.rate_mbit * 1e6, loss=args.loss)
    proxy = await WanProxy(_addr(args.listen), _addr(args.target), spec, seed=args.seed).start()
    print(f"wan proxy {proxy.address[0]}:{proxy.address[1]} -> {args.target}", flush=True)
    try:
        while True:
            await asyncio.sleep(5)
            up, down = proxy.up.stats, proxy.down.stats
            log.info(
                "up forwarded=%d dropped=%d bytes=%d down forwarded=%d dropped=%d bytes=%d",
                up.forwarded,
                up.dropped,
                up.bytes,
                down.forwarded,
                down.dropped,
                down.bytes,
            )
    finally:
        proxy.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--listen", default="127.0.0.1:0")
    ap.add_argument("--target", required=True)
    ap.add_argument("--delay-ms", type=float, default=25.0, help="one-way delay")
    ap.add_argument("--rate-mbit", type=float, default=0.0, help="0 = unlimited")
    ap.add_argument("--loss", type=float, default=0.0, help="drop probability per datagram")
    ap.add_argument("--seed", type=int, default=0)
    logging.basicConfig(level=logging.INFO)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_main(ap.parse_args()))


if __name__ == "__main__":
    main()
