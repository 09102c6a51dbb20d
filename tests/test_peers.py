"""Peers named by endpoint id, without tokens, in both directions (real iroh endpoints on
loopback, a real coordinator, async clients; no Lightning):

- a node dials a coordinator named by id and joins without a token: admitted only when its
  key is on the coordinator's ``--peers`` list;
- a coordinator dials the listed nodes that listen, and runs the handshake from Ping on;
  a listening node accepts only the coordinator key it was given, and a coordinator that
  comes back (a new connection) replaces the old one.
"""

from __future__ import annotations

import asyncio
import os
import threading
from pathlib import Path

import pytest
import torch
from lightning_drift_cli.local import free_udp_port
from support import node_info as _node_info

from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.auth import Identity
from lightning_drift.coordinator.config import SETTING, ServeOptions, SessionConfig, read_option
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.coordinator.state import StateDir
from lightning_drift.errors import AuthError, ConfigError, ConnectTimeout
from lightning_drift.modelspec import state_fingerprint
from lightning_drift.node.client import CoordinatorClient
from lightning_drift.node.listen import CoordinatorListener
from lightning_drift.node.runtime import NodeRuntime
from lightning_drift.peers import parse_peer, split_peers
from lightning_drift.protocol import BarrierSync
from lightning_drift.transport import Endpoint, peer_key

TIMEOUT = 60
KEY = "ab" * 32


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def coordinator(tmp_path: Path, peers: list[str], **cfg) -> Coordinator:
    config = dict(epochs=1, batch_size=10, sync_every=10, min_nodes=1, dataset_size=300)
    config.update(cfg)
    opts = ServeOptions(
        state_dir=tmp_path / "state",
        port=free_udp_port(),
        tick_s=0.1,
        finish_grace_s=0.3,
        peers=peers,
    )
    return Coordinator(SessionConfig(heartbeat_timeout=5.0, heartbeat_s=0.5, **config), opts)


def coordinator_key(tmp_path: Path) -> str:
    """The key a coordinator on ``tmp_path / "state"`` will have (made before it starts, as
    ``drift-coord id`` does, so nodes can be told it first)."""
    return StateDir(tmp_path / "state").identity().public_hex


def weights(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(4, 3, generator=g)}


def node_info(dataset_size: int):
    """A test node's NodeInfo announcing the model of :func:`weights`."""
    return _node_info(dataset_size, state_fingerprint(weights(0)))


# -- naming a peer ---------------------------------------------------------------------------------


def test_a_peer_is_an_id_an_id_at_an_address_or_a_ticket():
    assert parse_peer(f" {KEY.upper()} ") == parse_peer(KEY)
    bare = parse_peer(KEY)
    assert bare.key_hex == KEY and not bare.has_address
    at = parse_peer(f"{KEY}@127.0.0.1:7842")
    assert at.addr == "127.0.0.1:7842" and at.has_address and peer_key(at) == bytes.fromhex(KEY)
    assert parse_peer(f"{KEY}@[::1]:9").addr == "[::1]:9"
    assert parse_peer("endpointabc").ticket == "endpointabc"
    for bad in ("4e110", KEY + "0", f"{KEY}@host", f"{KEY}@host:0", f"{KEY}@:80", ""):
        with pytest.raises(ConfigError, match="endpoint id|HOST:PORT"):
            parse_peer(bad)
    assert split_peers([f"{KEY},{'cd' * 32}", f" {'ef' * 32} ", ""]) == [KEY, "cd" * 32, "ef" * 32]


def test_the_peers_option_takes_comma_lists_and_refuses_bad_entries(tmp_path):
    s = SETTING["peers"]
    assert read_option(s, f"{KEY},{'cd' * 32}") == [KEY, "cd" * 32]
    assert read_option(s, [KEY, f"{'cd' * 32}@10.0.0.2:7850"])[1].endswith(":7850")
    with pytest.raises(ConfigError, match="--peers has a bad entry: peer 'nope'"):
        ServeOptions(state_dir=tmp_path, peers=["nope"])


def test_a_bare_id_cannot_be_dialled_in_local_mode():
    async def main():
        ep = await Endpoint.bind(mode="local")
        try:
            with pytest.raises(ConfigError, match="no address, and local mode has no discovery"):
                await ep.dial_peer(parse_peer(KEY), timeout=2)
        finally:
            await ep.close()

    run(main())


# -- a node dials in without a token -------------------------------------------------------------


def test_a_listed_node_joins_without_a_token_and_others_are_refused(tmp_path):
    listed, stranger = Identity.generate(), Identity.generate()

    async def main():
        coord = coordinator(tmp_path, [listed.public_hex])
        await coord.start()
        runner = asyncio.create_task(coord.run())
        at = f"{coord.endpoint.key_hex}@127.0.0.1:{coord.options.port}"
        try:
            with pytest.raises(AuthError, match="not on this coordinator's --peers list"):
                await CoordinatorClient.join_peer(
                    at, node_info=node_info(300), secret=stranger.seed, timeout=10
                )
            client = await CoordinatorClient.join_peer(
                at, node_info=node_info(300), secret=listed.seed, name="listed", timeout=10
            )
            assert client.config is not None and client.config.session_id
            assert coord.status().nodes[0].node_id == listed.public_hex
            assert coord.status().nodes[0].name == "listed"
            # The same key may also just look (status), still without a token.
            observer = await CoordinatorClient.join_peer(
                at, observe=True, secret=listed.seed, timeout=10
            )
            assert (await observer.status()).session_id == client.config.session_id
            await observer.close()
            ready, blob = await client.barrier(BarrierSync(round=0), to_bytes(weights(1)))
            assert ready.round == 0 and ready.contributed
            assert torch.equal(from_bytes(blob)["w"], weights(1)["w"])
            await client.close()
        finally:
            coord.shutdown()
            await runner
            await coord.close()

    run(main())


# -- the coordinator dials a listening node --------------------------------------------------------


def test_the_coordinator_dials_a_listening_node_and_redials_it(tmp_path):
    node = Identity.generate()
    ckey = coordinator_key(tmp_path)

    async def main():
        listener = await CoordinatorListener.bind(
            secret=node.seed, coordinator_key=bytes.fromhex(ckey), listen="127.0.0.1:0"
        )
        coord = coordinator(tmp_path, [listener.ticket()])
        await coord.start()
        assert coord.endpoint.key_hex == ckey
        runner = asyncio.create_task(coord.run())
        try:
            client = await CoordinatorClient.accept(
                listener, node_info=node_info(300), name="listener", timeout=15
            )
            assert client.config is not None
            assert coord.status().nodes[0].node_id == node.public_hex
            assert coord.status().nodes[0].name == "listener"  # from NodeInfo: no Join came
            ready, _ = await client.barrier(BarrierSync(round=0), to_bytes(weights(2)))
            assert ready.round == 0 and ready.contributed
            # The connection breaks: the coordinator dials again, the node accepts again.
            client.conn.close(2, "cut")
            await client.close()
            again = await CoordinatorClient.accept(listener, node_info=node_info(300), timeout=15)
            assert again.config is not None and again.config.has_weights
            r, blob = await again.barrier(BarrierSync(round=0), to_bytes(weights(3)))
            assert r.round == 0 and not r.contributed  # round 0 was node 1's weights
            assert torch.equal(from_bytes(blob)["w"], weights(2)["w"])
            await again.close()
        finally:
            coord.shutdown()
            await runner
            await coord.close()
            await listener.close()

    run(main())


def test_a_listening_node_lets_in_only_its_coordinator(tmp_path):
    node, other = Identity.generate(), Identity.generate()
    ckey = coordinator_key(tmp_path)

    async def main():
        listener = await CoordinatorListener.bind(
            secret=node.seed, coordinator_key=bytes.fromhex(ckey), listen="127.0.0.1:0"
        )
        rogue = await Endpoint.bind(mode="local", secret=other.seed)
        try:
            conn = await rogue.dial_peer(parse_peer(listener.ticket()), timeout=10)
            assert "another coordinator" in await asyncio.wait_for(conn.closed(), 10)
            with pytest.raises(ConnectTimeout, match="did not dial this node"):
                await listener.next(timeout=1.0)
        finally:
            await rogue.close()
            await listener.close()

    run(main())


def test_a_listening_runtime_trains_through_the_coordinators_dial(tmp_path):
    """NodeRuntime(listen=..., peer=...): the blocking API the strategy uses, with a fixed key
    (the one the coordinator was given)."""
    node = Identity.generate()
    ckey = coordinator_key(tmp_path)
    port = free_udp_port()

    async def serve(coord: Coordinator) -> None:
        await coord.start()
        try:
            await coord.run()
        finally:
            await coord.close()

    coord = coordinator(tmp_path, [f"{node.public_hex}@127.0.0.1:{port}"])
    coord_loop = asyncio.new_event_loop()
    server = threading.Thread(target=coord_loop.run_until_complete, args=(serve(coord),))
    server.start()
    try:
        with NodeRuntime(
            None,
            lambda: node_info(300),
            peer=ckey,
            listen=f"127.0.0.1:{port}",
            secret=node.seed,
            connect_timeout=10,
            reconnect_timeout=30,
        ) as runtime:
            assert runtime.node_key == node.public_hex
            config = runtime.start()
            assert config.session_id == coord.session.session_id
            ready, blob = runtime.barrier(BarrierSync(round=0), to_bytes(weights(4)))
            assert ready.round == 0 and torch.equal(from_bytes(blob)["w"], weights(4)["w"])
            shard = runtime.shard(0)
            assert (shard.start, shard.stop) == (0, 300)
    finally:
        coord_loop.call_soon_threadsafe(coord.shutdown)
        server.join(30)
        coord_loop.close()
    assert not server.is_alive()


def test_a_node_needs_a_token_or_its_coordinators_id():
    with pytest.raises(ConfigError, match="token, or the coordinator's id"):
        NodeRuntime(None, lambda: node_info(1))
    with pytest.raises(ConfigError, match="needs no token"):
        NodeRuntime("eyJ", lambda: node_info(1), peer=KEY, listen="127.0.0.1:0")
    with pytest.raises(ConfigError, match="waits for the coordinator named by peer"):
        NodeRuntime(None, lambda: node_info(1), listen="127.0.0.1:0")


def test_a_token_must_name_the_peer_it_is_pinned_to(tmp_path):
    async def main():
        coord = coordinator(tmp_path, [])
        await coord.start()
        try:
            with pytest.raises(AuthError, match="not the peer"):
                await CoordinatorClient.connect(
                    coord.node_token, node_info=node_info(300), expect_key=os.urandom(32)
                )
        finally:
            await coord.close()

    run(main())
