"""NodeRuntime against a real coordinator in this process (real iroh endpoints on loopback,
no Lightning): what the blocking API tells the coordinator about the node."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from lightning_drift_cli.local import free_udp_port
from support import node_info as _node_info

from lightning_drift.aggregate import to_bytes
from lightning_drift.auth import Identity
from lightning_drift.coordinator.config import ServeOptions, SessionConfig
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.coordinator.state import StateDir
from lightning_drift.modelspec import state_fingerprint
from lightning_drift.node.runtime import NodeRuntime
from lightning_drift.node.weights import GlobalWeights, WeightsMismatch
from lightning_drift.protocol import BarrierSync


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g)}


@pytest.fixture
def joined(tmp_path: Path) -> Iterator[NodeRuntime]:
    """A NodeRuntime joined (by the coordinator's id, no token) to a coordinator serving on a
    thread of this process."""
    node = Identity.generate()
    port = free_udp_port()
    ckey = StateDir(tmp_path / "state").identity().public_hex
    opts = ServeOptions(
        state_dir=tmp_path / "state",
        port=port,
        tick_s=0.1,
        finish_grace_s=0.3,
        peers=[node.public_hex],
    )
    config = dict(epochs=1, batch_size=10, sync_every=10, min_nodes=1, dataset_size=300)
    coord = Coordinator(SessionConfig(heartbeat_timeout=5.0, heartbeat_s=0.5, **config), opts)

    async def serve() -> None:
        await coord.start()
        try:
            await coord.run()
        finally:
            await coord.close()

    loop = asyncio.new_event_loop()
    server = threading.Thread(target=loop.run_until_complete, args=(serve(),))
    server.start()
    try:
        fingerprint = state_fingerprint(weights(0))
        with NodeRuntime(
            None,
            lambda: _node_info(300, fingerprint),
            peer=f"{ckey}@127.0.0.1:{port}",
            secret=node.seed,
            connect_timeout=10,
            reconnect_timeout=30,
        ) as runtime:
            runtime.start()
            yield runtime
    finally:
        loop.call_soon_threadsafe(coord.shutdown)
        server.join(30)
        loop.close()


def test_the_resume_round_moves_only_after_the_rounds_weights_verified(joined):
    """A reconnect's Join.resume_round names weights the node holds: after an answer whose
    weights fail their sha256, it still names none; after a verified one, that round."""
    held = GlobalWeights()

    def mismatch(ready, blob):
        raise WeightsMismatch(f"round {ready.round}: forced mismatch")

    def verify(ready, blob):
        return held.receive(ready.round, blob, ready.sha256, payload=ready.payload)

    start = BarrierSync(round=0)
    with pytest.raises(WeightsMismatch):
        joined.hand_off(lambda: (start, to_bytes(weights(0))), mismatch).result(60)
    assert joined.resume_round == -1
    got = joined.hand_off(lambda: (start, b""), verify).result(60)
    assert got.weights.round == 0
    assert joined.resume_round == 0
