"""Reaching the coordinator at an address other than the token's (a forwarded port, a proxy):
the key the token names is still what is checked.

On one machine iroh moves a connection to the direct path once it learns the coordinator's
real address, so here the proxy carries the handshake and whatever precedes the switch; the
WAN simulation with namespaces, where the proxy is the only path, is benchmarks/wan.py."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from e2e.launch import log_tail, start_node
from lightning_drift_cli.local import LocalCoordinator, free_udp_port
from safetensors.torch import load_file

pytestmark = pytest.mark.timeout(300)

NETSIM = Path(__file__).resolve().parents[1] / "benchmarks" / "netsim.py"


def test_nodes_dial_through_a_proxy_address_and_train_exactly(tmp_path: Path) -> None:
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=2, epochs=1, batch_size=16, sync_every=8, quorum=1.0
    ) as coord:
        port = free_udp_port()
        proxy_log = open(tmp_path / "proxy.log", "w")
        proxy = subprocess.Popen(
            [sys.executable, str(NETSIM),
             "--listen", f"127.0.0.1:{port}", "--target", f"127.0.0.1:{coord.port}",
             "--delay-ms", "20", "--rate-mbit", "40", "--loss", "0.02", "--seed", "1"],
            stdout=proxy_log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            nodes = [
                start_node(coord.token, tmp_path, f"n{i}", "--via", f"127.0.0.1:{port}")
                for i in range(2)
            ]
            for i, p in enumerate(nodes):
                assert p.wait(timeout=240) == 0, log_tail(tmp_path, f"n{i}")
            assert coord.wait(timeout=60) == 0, coord.log_tail()
            time.sleep(5.5)  # the proxy logs its counters every 5 s
        finally:
            proxy.terminate()
            proxy.wait(timeout=10)
            proxy_log.close()
        final = load_file(str(coord.latest_checkpoint()))
    for i in range(2):
        node_final = load_file(str(tmp_path / f"n{i}" / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k
    counters = re.findall(r"up forwarded=(\d+) dropped=(\d+)", (tmp_path / "proxy.log").read_text())
    assert counters, (tmp_path / "proxy.log").read_text()
    forwarded, _dropped = map(int, counters[-1])
    assert forwarded > 0  # the nodes came in through the proxy's address


def test_an_address_that_leads_to_another_coordinator_is_refused(tmp_path: Path) -> None:
    import asyncio

    from lightning_drift.errors import AuthError, ConnectTimeout
    from lightning_drift.node.client import CoordinatorClient

    with LocalCoordinator(tmp_path / "a") as a, LocalCoordinator(tmp_path / "b") as b:

        async def dial() -> None:
            await CoordinatorClient.connect(
                a.observer_token, observe=True, timeout=10, via=[f"127.0.0.1:{b.port}"]
            )

        # QUIC's handshake itself fails (iroh checks the server's key in TLS); were it to
        # succeed, the client's own key check would refuse the peer with AuthError.
        with pytest.raises((ConnectTimeout, AuthError), match="wrong key|expected"):
            asyncio.run(dial())
