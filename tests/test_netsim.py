"""The WAN simulator: pacing arithmetic, and real datagrams through a real proxy."""

from __future__ import annotations

import asyncio
import random

import pytest
from netsim import LinkSpec, WanProxy, _Pipe  # benchmarks/netsim.py (see conftest.py)


def test_pipe_paces_at_the_rate_then_adds_the_delay():
    pipe = _Pipe(LinkSpec(delay_s=0.05, rate_bps=8_000), random.Random(0))  # 1000 bytes/s
    assert pipe.schedule(0.0, 100) == 0.1 + 0.05
    assert pipe.schedule(0.0, 100) == pytest.approx(0.2 + 0.05)  # queued behind the first
    assert pipe.schedule(1.0, 100) == pytest.approx(1.1 + 0.05)  # the link was idle again


def test_pipe_drops_when_the_queue_is_full_and_at_the_loss_rate():
    pipe = _Pipe(LinkSpec(rate_bps=8_000, queue_s=0.25), random.Random(0))
    delivered = [pipe.schedule(0.0, 100) for _ in range(5)]
    assert delivered[:3] == pytest.approx([0.1, 0.2, 0.3]) and delivered[3:] == [None, None]
    lossy = _Pipe(LinkSpec(loss=0.3), random.Random(1))
    outcomes = [lossy.schedule(0.0, 10) for _ in range(2000)]
    assert 0.25 < outcomes.count(None) / 2000 < 0.35
    assert lossy.stats.dropped == outcomes.count(None)


def test_datagrams_cross_the_proxy_both_ways_with_the_delay():
    async def main() -> float:
        loop = asyncio.get_running_loop()

        class Echo(asyncio.DatagramProtocol):
            def connection_made(self, t):
                self.t = t

            def datagram_received(self, data, addr):
                self.t.sendto(data.upper(), addr)

        echo_t, _ = await loop.create_datagram_endpoint(Echo, local_addr=("127.0.0.1", 0))
        target = echo_t.get_extra_info("sockname")[:2]
        proxy = await WanProxy(("127.0.0.1", 0), target, LinkSpec(delay_s=0.05)).start()
        got: asyncio.Future[bytes] = loop.create_future()

        class Client(asyncio.DatagramProtocol):
            def datagram_received(self, data, addr):
                if not got.done():
                    got.set_result(data)

        client_t, _ = await loop.create_datagram_endpoint(Client, remote_addr=proxy.address)
        t0 = loop.time()
        client_t.sendto(b"ping")
        assert await asyncio.wait_for(got, 5) == b"PING"
        rtt = loop.time() - t0
        for t in (client_t, echo_t):
            t.close()
        proxy.close()
        return rtt

    assert asyncio.run(main()) >= 0.1  # two one-way delays
