"""The coordinator server with real iroh endpoints on loopback.

In-process tests run the coordinator and async clients on one event loop; the fault test
runs three node processes and SIGKILLs one mid-round. Run as a script, this file is that
node process: ``python tests/test_server.py node TOKEN INDEX [STALL_ROUND]``.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning_drift_cli.local import free_udp_port
from support import node_info

from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.auth import Identity, TokenStore, issue_token
from lightning_drift.coordinator.config import ServeOptions, SessionConfig
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.coordinator.session import MemberState
from lightning_drift.errors import (
    AuthError,
    ConfigError,
    DriftError,
    ProtocolError,
    SessionError,
)
from lightning_drift.modelspec import state_fingerprint
from lightning_drift.node.client import CoordinatorClient
from lightning_drift.protocol import BarrierSync, Error, TrainProgress
from lightning_drift.transport import Endpoint

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 60


def model(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(4, 3, generator=g),
        "b": torch.randn(3, generator=g),
        "steps": torch.tensor([seed], dtype=torch.int64),
    }


FINGERPRINT = state_fingerprint(model(0))  # every model() has the same tensor table


def node_info_for(dataset_size: int):
    return node_info(dataset_size, FINGERPRINT)


def coordinator(tmp_path: Path, **cfg) -> Coordinator:
    base = dict(
        epochs=1,
        batch_size=10,
        sync_every=10,
        min_nodes=1,
        dataset_size=300,
        heartbeat_timeout=5.0,
        heartbeat_s=0.5,
    )
    base.update(cfg)
    opts = ServeOptions(
        state_dir=tmp_path / "state", port=free_udp_port(), tick_s=0.1, finish_grace_s=0.3
    )
    return Coordinator(SessionConfig(**base), opts)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


async def join(coord: Coordinator, n: int, name: str = "") -> CoordinatorClient:
    return await CoordinatorClient.connect(
        coord.node_token, node_info=node_info_for(coord.config.dataset_size), name=name, timeout=10
    )


async def start_sync(clients, init: dict[str, torch.Tensor]) -> bytes:
    """Round 0: the first client's weights become global; everyone gets them; shards."""
    ready, blob = await clients[0].barrier(BarrierSync(round=0), to_bytes(init))
    assert ready.round == 0 and ready.contributed
    for c in clients[1:]:
        r, b = await c.barrier(BarrierSync(round=0), to_bytes(model(99)))
        assert b == blob and not r.contributed
    for c in clients:
        await c.shard(0)
    return blob


def hand_mean(uploads: dict[str, dict], weights: dict[str, float], order: list[str], base: dict):
    """sum_i w_i x_i in float64 in arrival order, / sum w, cast back; ints: the global value
    in ``base`` plus the lower median of the contributors' increments (never one node's)."""
    out = {}
    ref = uploads[order[0]]
    for k, t in ref.items():
        if t.is_floating_point():
            acc = torch.zeros(t.shape, dtype=torch.float64)
            total = 0.0
            for n in order:
                acc = acc + uploads[n][k].double() * weights[n]
                total += weights[n]
            out[k] = (acc / total).to(t.dtype)
        else:
            inc = sorted(int(uploads[n][k].item()) - int(base[k].item()) for n in order)
            out[k] = base[k] + inc[(len(inc) - 1) // 2]
    return out


def manifest(coord: Coordinator) -> dict:
    return json.loads((coord.store.directory / "manifest.json").read_text())


def entry(coord: Coordinator, completed_round: int) -> dict:
    return next(e for e in manifest(coord)["checkpoints"] if e["round"] == completed_round)


def contributors(e: dict) -> list:
    return [c[0] for c in e["contributors"]]


def test_mean_is_exact_in_manifest_order(tmp_path):
    async def main():
        coord = coordinator(tmp_path, min_nodes=3)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        clients = [await join(coord, i, f"n{i}") for i in range(3)]
        await start_sync(clients, model(0))
        uploads = {c.node_key: model(10 + i) for i, c in enumerate(clients)}
        samples = {c.node_key: 10 * (i + 1) for i, c in enumerate(clients)}
        results = await asyncio.gather(
            *(
                c.barrier(
                    BarrierSync(round=1, samples=samples[c.node_key]),
                    to_bytes(uploads[c.node_key]),
                )
                for c in clients
            )
        )
        blobs = {b for _, b in results}
        assert len(blobs) == 1 and all(r.contributed and r.finished for r, _ in results)
        e = entry(coord, 1)
        order = contributors(e)
        assert sorted(order) == sorted(uploads)
        expect = hand_mean(uploads, {k: float(v) for k, v in samples.items()}, order, model(0))
        ckpt = (coord.store.directory / "round-000001.safetensors").read_bytes()
        assert ckpt == blobs.pop()
        got = from_bytes(ckpt)
        for k in expect:
            assert torch.equal(got[k], expect[k]), k
        await asyncio.wait_for(runner, 10)  # the session finished: run() returns
        for c in clients:
            assert c.finish is not None and c.finish.round == 1
            await c.close()
        await coord.close()

    run(main())


def test_diloco_follows_sgd_and_momentum_is_checkpointed(tmp_path):
    lr, mom = 0.7, 0.9

    async def main():
        coord = coordinator(
            tmp_path,
            aggregation="diloco",
            outer_lr=lr,
            outer_momentum=mom,
            dataset_size=400,
            min_nodes=2,
        )
        await coord.start()
        runner = asyncio.create_task(coord.run())
        clients = [await join(coord, i) for i in range(2)]
        init = model(0)
        await start_sync(clients, init)
        param = {k: v.clone() for k, v in init.items() if v.is_floating_point()}
        opt = torch.optim.SGD(
            list(param.values()), lr=lr, momentum=mom, nesterov=True, foreach=False
        )
        base = init  # the global weights each round starts from
        for open_round in (1, 2):
            uploads = {c.node_key: model(100 * open_round + i) for i, c in enumerate(clients)}
            results = await asyncio.gather(
                *(
                    c.barrier(
                        BarrierSync(round=open_round, samples=7 + i), to_bytes(uploads[c.node_key])
                    )
                    for i, c in enumerate(clients)
                )
            )
            order = contributors(entry(coord, open_round))
            w = {c.node_key: float(7 + i) for i, c in enumerate(clients)}
            mean = hand_mean(uploads, w, order, base)
            for k, p in param.items():
                p.grad = p.detach() - mean[k]
            opt.step()
            got = from_bytes(results[0][1])
            # SGD's formula up to rounding: DiLoCo computes it in float64 without SGD's fused
            # multiply-add, so that its bits do not depend on the CPU's kernels.
            for k, p in param.items():
                torch.testing.assert_close(got[k], p.detach(), rtol=1e-6, atol=1e-6)
            assert torch.equal(got["steps"], mean["steps"])
            base = got
            outer = from_bytes(
                (coord.store.directory / f"round-{open_round:06d}.outer.safetensors").read_bytes()
            )
            for k, p in param.items():
                buf = opt.state[p]["momentum_buffer"]
                assert outer[k].dtype == buf.dtype, (open_round, k)
                torch.testing.assert_close(outer[k], buf, rtol=1e-6, atol=1e-6)
        await asyncio.wait_for(runner, 10)
        for c in clients:
            await c.close()
        await coord.close()

    run(main())


def test_an_upload_with_no_samples_adds_nothing_to_the_mean(tmp_path):
    # A node with nothing left in its shard still meets the barrier; its weights (the last
    # global ones) must not pull the mean back. Round 2: nobody trained, weights carry over.
    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=400)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        clients = [await join(coord, i) for i in range(2)]
        await start_sync(clients, model(0))
        a, b = clients
        ups = {a.node_key: model(10), b.node_key: model(11)}
        r1 = await asyncio.gather(
            a.barrier(BarrierSync(round=1, samples=20), to_bytes(ups[a.node_key])),
            b.barrier(BarrierSync(round=1, samples=0), to_bytes(ups[b.node_key])),
        )
        assert all(r.contributed for r, _ in r1)
        got = from_bytes(r1[0][1])
        for k in ("w", "b"):
            assert torch.equal(got[k], ups[a.node_key][k]), k  # exactly a's weights
        weights = dict(entry(coord, 1)["contributors"])
        assert weights == {a.node_key: 20.0, b.node_key: 0.0}
        r2 = await asyncio.gather(
            *(c.barrier(BarrierSync(round=2, samples=0), to_bytes(model(20))) for c in clients)
        )
        assert r2[0][1] == r1[0][1]  # the round-1 weights, byte for byte
        assert "unchanged" in entry(coord, 2)["extra"]
        await asyncio.wait_for(runner, 10)
        for c in clients:
            await c.close()
        await coord.close()

    run(main())


def test_a_delta_against_other_weights_is_left_out(tmp_path):
    # A delta is (local - global) for the global weights the node holds; one taken against
    # some other round's weights cannot be added back and must not reach the mean.
    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=200)  # one round
        await coord.start()
        runner = asyncio.create_task(coord.run())
        clients = [await join(coord, i) for i in range(2)]
        init = model(0)
        await start_sync(clients, init)
        a, b = clients
        step = {k: torch.full_like(v, 0.25) if v.is_floating_point() else v
                for k, v in init.items()}  # fmt: skip
        r1 = await asyncio.gather(
            a.barrier(BarrierSync(round=1, samples=5, delta=True, base_round=0), to_bytes(step)),
            b.barrier(BarrierSync(round=1, samples=5, delta=True, base_round=7), to_bytes(step)),
        )
        (ra, ba), (rb, bb) = r1
        assert ra.contributed and not rb.contributed
        assert "round 7" in rb.reason and "round 0" in rb.reason, rb.reason
        assert ba == bb and ra.round == rb.round == 1  # b still gets the round's result
        assert contributors(entry(coord, 1)) == [a.node_key]
        got = from_bytes(ba)
        for k in ("w", "b"):
            assert torch.equal(got[k], (init[k].double() + 0.25).float()), k
        await asyncio.wait_for(runner, 10)
        for c in clients:
            await c.close()
        await coord.close()

    run(main())


def test_oversized_start_up_weights_are_refused_before_they_are_read(tmp_path):
    # Before round 0 there is no global model to compare with: the start-up upload is bounded
    # by --max-model-mb, refused from its header with the flag named, and the session goes on.
    async def main():
        base = coordinator(tmp_path, min_nodes=2, dataset_size=200)
        opts = ServeOptions(
            state_dir=tmp_path / "state",
            port=free_udp_port(),
            tick_s=0.1,
            finish_grace_s=0.3,
            max_model_bytes=4096,
        )
        coord = Coordinator(base.config, opts)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = [await join(coord, i) for i in range(2)]
        big = {"w": torch.zeros(2048, 2048)}  # 16 MiB: more than QUIC buffers, so it must stop
        with pytest.raises(DriftError) as info:
            await a.barrier(BarrierSync(round=0), to_bytes(big))
        assert "--max-model-mb" in str(info.value) and "4096" in str(info.value), info.value
        assert not coord.session.has_weights
        ready, _ = await b.barrier(BarrierSync(round=0), to_bytes(model(0)))
        assert ready.round == 0 and ready.contributed
        await b.close()
        await a.close()
        runner.cancel()
        await coord.close()

    run(main())


def test_bad_upload_garbage_and_bad_tokens_do_not_stop_the_session(tmp_path):
    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=200, epochs=2)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = [await join(coord, i) for i in range(2)]
        await start_sync([a, b], model(0))

        # Garbage on a fresh connection: an Error frame, then the connection is dropped.
        ep = await Endpoint.bind()
        conn = await ep.dial(coord.ticket, timeout=10)
        s = await conn.open_stream()
        await s.send_raw(b"\x00\x00\x00\x05hello")
        err = await asyncio.wait_for(s.recv(), 10)
        assert isinstance(err, Error) and err.code == "protocol"
        # A token signed by another key, and a Join whose key is not the peer's.
        other = Identity.generate()
        forged = issue_token(
            other,
            session=coord.session.session_id,
            coordinator=coord.ticket,
            now=0.0,
            ttl_s=1e12,
        )
        with pytest.raises(AuthError):  # refused locally: not signed by the ticket's key
            await CoordinatorClient.connect(forged, node_info=node_info_for(200), timeout=10)
        conn2 = await ep.dial(coord.ticket, timeout=10)
        s2 = await conn2.open_stream()
        from lightning_drift.protocol import Join

        await s2.send(Join(token=coord.node_token, node_key="ab" * 32, drift_version="0"))
        err = await asyncio.wait_for(s2.recv(), 10)
        assert (
            isinstance(err, Error)
            and err.code == "auth"
            and "not the connection's key" in (err.message)
        )
        await ep.close()

        # A NaN upload: Error on its barrier stream, excluded, the round completes without it.
        good = model(5)
        bad = model(6)
        bad["w"][0, 0] = float("nan")
        task = asyncio.create_task(a.barrier(BarrierSync(round=1, samples=10), to_bytes(good)))
        with pytest.raises(SessionError) as info:
            await b.barrier(BarrierSync(round=1, samples=10), to_bytes(bad))
        assert info.value.code == "bad_upload"
        ready, blob = await task
        assert ready.contributed and contributors(entry(coord, 1)) == [a.node_key]
        got = from_bytes(blob)
        for k in good:
            assert torch.equal(got[k], good[k])
        # The bad node is still a member: it gets the round's weights on a re-send.
        r, blob2 = await b.barrier(BarrierSync(round=1, samples=10), to_bytes(model(7)))
        assert blob2 == blob and not r.contributed
        await a.close()
        await b.close()
        runner.cancel()
        await coord.close()

    run(main())


def test_start_up_uploads_while_the_first_weights_are_being_saved(tmp_path):
    # The first start-up upload becomes round 0; the session knows it has weights before
    # they are published (the state file is written in between). A second node's start-up
    # upload in that gap must wait for them, not fail (it used to hit an assertion).
    async def main():
        coord = coordinator(tmp_path, min_nodes=2)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = [await join(coord, i) for i in range(2)]
        saving = asyncio.Event()
        save = coord.rounds.save_session

        async def slow_save() -> None:
            if coord.session.has_weights and not saving.is_set():
                saving.set()
                await asyncio.sleep(1.0)
            await save()

        coord.rounds.save_session = slow_save  # type: ignore[method-assign]
        first = asyncio.create_task(a.barrier(BarrierSync(round=0), to_bytes(model(0))))
        await asyncio.wait_for(saving.wait(), 10)
        assert coord.rounds.current is None  # adopted by the session, not yet published
        rb, blob_b = await asyncio.wait_for(b.barrier(BarrierSync(round=0), to_bytes(model(1))), 10)
        ra, blob_a = await asyncio.wait_for(first, 10)
        assert ra.contributed and not rb.contributed
        assert rb.round == ra.round == 0 and blob_b == blob_a
        runner.cancel()
        for c in (a, b):
            await c.close()
        await coord.close()

    run(main())


def test_an_upload_for_the_next_round_while_the_state_file_is_written(tmp_path):
    # Between a round's completion in the session and the publication of its weights the
    # state file is written; the next round is already open then, and an upload for it must
    # wait for that round's accumulator and count, not fail or leave its stream unanswered.
    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=400)  # two rounds
        await coord.start()
        runner = asyncio.create_task(coord.run())
        clients = [await join(coord, i) for i in range(2)]
        await start_sync(clients, model(0))
        a, b = clients
        saving = asyncio.Event()
        save = coord.rounds.save_session

        async def slow_save() -> None:
            if coord.session.completed == 1 and not saving.is_set():
                saving.set()
                await asyncio.sleep(1.0)
            await save()

        coord.rounds.save_session = slow_save  # type: ignore[method-assign]
        r1 = [
            asyncio.create_task(c.barrier(BarrierSync(round=1, samples=10), to_bytes(model(i))))
            for i, c in enumerate(clients)
        ]
        await asyncio.wait_for(saving.wait(), 10)
        assert coord.session.open_round == 2 and coord.rounds.current.completed_round == 0
        early = asyncio.create_task(
            a.barrier(BarrierSync(round=2, samples=10), to_bytes(model(20)))
        )
        (ra, blob1), (rb, _) = await asyncio.wait_for(asyncio.gather(*r1), 10)
        assert ra.round == rb.round == 1
        assert not early.done()  # counted for round 2, which waits for b
        rb2, blob2 = await asyncio.wait_for(
            b.barrier(BarrierSync(round=2, samples=10), to_bytes(model(21))), 10
        )
        ra2, blob2a = await asyncio.wait_for(early, 10)
        assert ra2.round == rb2.round == 2 and ra2.contributed and rb2.contributed
        assert blob2a == blob2 and sorted(contributors(entry(coord, 2))) == sorted(
            [a.node_key, b.node_key]
        )
        await asyncio.wait_for(runner, 10)
        for c in clients:
            await c.close()
        await coord.close()

    run(main())


def test_an_unexpected_error_in_a_barrier_is_answered(tmp_path):
    # A bug while taking an upload answers that barrier with Error(internal) instead of
    # leaving the node waiting forever; the node and the session carry on.
    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=200)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = [await join(coord, i) for i in range(2)]
        await start_sync([a, b], model(0))
        accept = coord.uploads.accept

        async def broken(node, sync, blob, now):
            raise RuntimeError("boom")

        coord.uploads.accept = broken  # type: ignore[method-assign]
        with pytest.raises(SessionError) as info:
            await asyncio.wait_for(
                a.barrier(BarrierSync(round=1, samples=10), to_bytes(model(1))), 10
            )
        assert info.value.code == "internal" and "boom" in str(info.value)
        coord.uploads.accept = accept  # type: ignore[method-assign]
        res = await asyncio.wait_for(
            asyncio.gather(
                *(c.barrier(BarrierSync(round=1, samples=10), to_bytes(model(2))) for c in (a, b))
            ),
            10,
        )
        assert all(r.round == 1 and r.contributed for r, _ in res)
        await asyncio.wait_for(runner, 10)
        await a.close()
        await b.close()
        await coord.close()

    run(main())


def test_a_connection_whose_first_stream_fails_is_closed(tmp_path):
    # accept_stream itself may fail with a protocol error: there is no stream to answer on,
    # so the connection is closed (and nothing else is touched).
    class Conn:
        remote_hex = "cd" * 32
        closed: tuple[int, str] | None = None

        async def accept_stream(self):
            raise ProtocolError("garbage before the first stream")

        def close(self, code: int = 0, reason: str = "") -> None:
            self.closed = (code, reason)

    async def main():
        coord = coordinator(tmp_path)
        conn = Conn()
        await coord.serve_connection(conn)  # type: ignore[arg-type]
        assert conn.closed is not None and conn.closed[0] == 1
        assert coord.session is None  # never started: the handshake went nowhere near it

    run(main())


def test_a_damaged_checkpoint_stops_a_restart_with_what_to_do(tmp_path):
    async def first():
        coord = coordinator(tmp_path)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        c = await join(coord, 0)
        await start_sync([c], model(0))
        await c.close()
        runner.cancel()
        await coord.close()
        return coord.store.directory / "round-000000.safetensors"

    path = run(first())
    path.write_bytes(b"not the checkpoint")

    async def restart():
        with pytest.raises(ConfigError) as info:
            await coordinator(tmp_path).start()
        return str(info.value)

    msg = run(restart())
    assert f"{path} is damaged" in msg and "backup" in msg and "state.json" in msg, msg
    assert "load(" not in msg  # operators get steps, not a Python API


def test_revoked_token_is_refused_by_a_running_server_and_observer_status(tmp_path):
    async def main():
        coord = coordinator(tmp_path, min_nodes=5)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a = await join(coord, 0, "alpha")
        obs = await CoordinatorClient.connect(coord.observer_token, timeout=10)
        st = await obs.status()
        assert st.session_id == coord.session.session_id and st.state == "waiting"
        assert [n.name for n in st.nodes] == ["alpha"] and st.nodes[0].state == "ready"
        await obs.close()
        # Join.observe: status with a node token, without becoming a member.
        peek = await CoordinatorClient.connect(coord.node_token, observe=True, timeout=10)
        assert len((await peek.status()).nodes) == 1 and peek.config is None
        await peek.close()
        assert len(coord.session.members) == 1
        jti = next(c.jti for c in coord.state.tokens().issued() if c.role == "node")
        TokenStore(coord.state.path).revoke(jti)  # what `drift-coord revoke` does
        with pytest.raises(AuthError, match="revoked"):
            await join(coord, 1)
        await a.close()
        runner.cancel()
        await coord.close()

    run(main())


def test_an_expired_token_refuses_new_nodes_but_not_a_member_reconnecting(tmp_path):
    # Expiry limits who may join; a member that joined with the token must not be cut off
    # mid-session when it reconnects with it later. The coordinator's clock runs ahead
    # (nodes check a token's expiry with their own clock before they dial).
    async def main():
        coord = coordinator(tmp_path, min_nodes=5)
        ahead = [0.0]
        coord.clock = lambda: time.time() + ahead[0]
        await coord.start()
        runner = asyncio.create_task(coord.run())
        token, claims = coord.state.issue(
            coord.state.identity(),
            session=coord.session.session_id,
            ticket=coord.ticket,
            ttl_s=60.0,
        )
        secret = os.urandom(32)
        ni = node_info_for(coord.config.dataset_size)
        a = await CoordinatorClient.connect(token, node_info=ni, secret=secret, timeout=10)
        await a.close()
        ahead[0] = 120.0  # the token expired a minute ago
        with pytest.raises(AuthError, match="expired"):
            await CoordinatorClient.connect(token, node_info=ni, timeout=10)
        a = await CoordinatorClient.connect(token, node_info=ni, secret=secret, timeout=10)
        assert a.config is not None and a.config.session_id == coord.session.session_id
        assert coord.session.members[a.node_key].state is MemberState.READY
        await a.close()
        # Expired by the node's own clock too: the node dials anyway and the coordinator
        # decides (a node must not refuse itself a reconnect the coordinator would allow).
        ahead[0] = 0.0
        short, _ = coord.state.issue(
            coord.state.identity(),
            session=coord.session.session_id,
            ticket=coord.ticket,
            ttl_s=1.0,
        )
        secret2 = os.urandom(32)
        b = await CoordinatorClient.connect(short, node_info=ni, secret=secret2, timeout=10)
        await b.close()
        await asyncio.sleep(1.5)
        b = await CoordinatorClient.connect(short, node_info=ni, secret=secret2, timeout=10)
        assert b.config is not None
        await b.close()
        with pytest.raises(AuthError, match="expired"):
            await CoordinatorClient.connect(short, node_info=ni, timeout=10)
        # Only the expiry is forgiven: a revoked token still refuses the member.
        TokenStore(coord.state.path).revoke(claims.jti)
        with pytest.raises(AuthError, match="revoked"):
            await CoordinatorClient.connect(token, node_info=ni, secret=secret, timeout=10)
        runner.cancel()
        await coord.close()

    run(main())


def test_three_rounds_three_node_processes_one_killed_mid_round(tmp_path):
    """Node 2 stops inside round 2 and is SIGKILLed; the survivors finish rounds 2 and 3."""

    async def main():
        coord = coordinator(tmp_path, min_nodes=3, dataset_size=900, heartbeat_timeout=2.0)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        procs = []
        for i in range(3):
            args = [sys.executable, __file__, "node", coord.node_token, str(i)]
            if i == 2:
                args.append("2")
            procs.append(
                await asyncio.create_subprocess_exec(
                    *args, stdout=asyncio.subprocess.PIPE, cwd=str(ROOT)
                )
            )
        victim = procs[2]
        while True:
            line = (await victim.stdout.readline()).decode()
            assert line, "node 2 exited before its stall point"
            if line.startswith("stalled"):
                break
        victim.send_signal(signal.SIGKILL)
        await victim.wait()
        await asyncio.wait_for(runner, 30)  # the session finished its rounds
        outs = []
        for p in procs[:2]:
            out, _ = await asyncio.wait_for(p.communicate(), 20)
            assert p.returncode == 0
            outs.append(out.decode().split())
        await coord.close()
        return outs

    outs = run(main())
    st = json.loads((tmp_path / "state" / "state.json").read_text())["session"]
    assert st["completed"] == 3 and st["finished"]
    m = json.loads((tmp_path / "state" / "checkpoints" / "manifest.json").read_text())
    rounds = {e["round"]: e for e in m["checkpoints"]}
    assert len(rounds[1]["contributors"]) == 3
    assert len(rounds[2]["contributors"]) == 2 and len(rounds[3]["contributors"]) == 2
    final = rounds[3]["sha256"]
    assert all(o[-1] == final for o in outs)  # survivors hold exactly the final checkpoint
    lost = [m for m in st["roster"]["members"].values() if m["state"] == "lost"]
    assert len(lost) == 1 and "heartbeat timeout" in lost[0]["reason"]


# ---- the node process ---------------------------------------------------------------------


async def node_main(token: str, index: int, stall: int | None) -> None:
    client = await CoordinatorClient.connect(
        token, node_info=lambda: node_info_for(900), name=f"n{index}", timeout=10
    )
    try:
        ready, blob = await client.barrier(BarrierSync(round=0), to_bytes(model(0)))
        a = await client.shard(0)
        sha = ready.sha256
        for k in range(a.rounds):
            open_round = a.first_round + k
            if open_round == stall:
                print("stalled", flush=True)
                await asyncio.sleep(3600)
            sd = from_bytes(blob)
            sd["w"] = sd["w"] + 0.01 * (index + 1)
            await client.progress(
                TrainProgress(round=open_round, epoch=0, step=k, samples=10, samples_per_s=100.0)
            )
            ready, blob = await client.barrier(
                BarrierSync(round=open_round, samples=10 * (index + 1), train_seconds=0.1),
                to_bytes(sd),
            )
            sha = ready.sha256
            print(f"round {ready.round} {sha}", flush=True)
            if ready.finished:
                break
        print(sha, flush=True)
    finally:
        await client.close()


if __name__ == "__main__" and len(sys.argv) > 1 and sys.argv[1] == "node":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    stall_round = int(sys.argv[4]) if len(sys.argv) > 4 else None
    asyncio.run(node_main(sys.argv[2], int(sys.argv[3]), stall_round))


def test_a_coordinator_whose_ticker_fails_stops_with_the_reason_instead_of_waiting_for_ever(
    tmp_path,
):
    """Every deadline and heartbeat decision is the ticker's: a bug that ends it would leave
    the session waiting for ever, so the coordinator stops, says why, and closes the nodes'
    connections (they reconnect to its restart)."""

    async def main():
        coord = coordinator(tmp_path, min_nodes=1)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a = await join(coord, 0)
        await start_sync([a], model(0))

        def broken(now):
            raise RuntimeError("tick bug")

        coord.session.tick = broken  # type: ignore[method-assign]
        await asyncio.wait_for(runner, 10)  # run() returns: the coordinator stopped
        assert coord.fatal and "the ticker stopped" in coord.fatal and "tick bug" in coord.fatal
        with pytest.raises(DriftError):
            await asyncio.wait_for(a.status(), 10)
        await a.close()
        await coord.close()

    run(main())


def test_a_request_the_coordinator_never_answers_ends_with_an_error_naming_it(
    tmp_path, monkeypatch
):
    """Status and stop requests are answered at once; one that is not (lost on the way, a
    coordinator stuck saving) ends after a bound with PeerLost naming it, which a node's
    runtime turns into a reconnect, never a wait for ever."""
    from lightning_drift.errors import PeerLost
    from lightning_drift.node import client as client_module
    from lightning_drift.protocol import StatusRequest

    monkeypatch.setattr(client_module, "ANSWER_S", 0.5)

    async def main():
        coord = coordinator(tmp_path, min_nodes=1)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a = await join(coord, 0)
        assert a.answer_s == 6 * 0.5  # six of the session's heartbeats
        assert (await asyncio.wait_for(a.status(), 10)).session_id
        send = a.control.send

        async def losing(msg):  # the request is lost on the way
            if not isinstance(msg, StatusRequest):
                await send(msg)

        monkeypatch.setattr(a.control, "send", losing)
        started = time.monotonic()
        with pytest.raises(PeerLost, match="did not answer a status request within 3 s"):
            await asyncio.wait_for(a.status(), 20)
        assert time.monotonic() - started < 15
        await a.close()
        coord.shutdown()
        await asyncio.wait_for(runner, 10)
        await coord.close()

    run(main())


def test_an_idle_observer_is_closed_and_a_busy_one_stays(tmp_path, monkeypatch):
    from lightning_drift.coordinator import observers

    monkeypatch.setattr(observers, "IDLE_MIN_S", 0.5)
    assert observers.idle_s(0.5) == 2.0  # four heartbeat timeouts

    async def main():
        coord = coordinator(tmp_path, heartbeat_timeout=0.5, heartbeat_s=0.1)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        busy = await CoordinatorClient.connect(coord.observer_token, timeout=10)
        idle = await CoordinatorClient.connect(coord.observer_token, timeout=10)
        end = time.monotonic() + 4.0
        while time.monotonic() < end:  # one asks every 0.5 s, the other says nothing
            assert (await asyncio.wait_for(busy.status(), 10)).session_id
            await asyncio.sleep(0.5)
        with pytest.raises(DriftError):
            await asyncio.wait_for(idle.status(), 10)
        assert (await asyncio.wait_for(busy.status(), 10)).session_id
        for c in (busy, idle):
            await c.close()
        coord.shutdown()
        await asyncio.wait_for(runner, 10)
        await coord.close()

    run(main())


def test_a_barrier_waiting_for_its_round_ends_when_the_coordinator_closes_the_connection(
    tmp_path,
):
    """The coordinator drops a node (lost, or past a round's hard deadline) while the node
    waits for that round: the wait ends with the connection's error (a node reconnects then),
    not a read that never learns its stream is gone."""

    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=200, deadline_floor=600.0)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = [await join(coord, i) for i in range(2)]
        await start_sync([a, b], model(0))
        waiting = asyncio.ensure_future(
            a.barrier(BarrierSync(round=1, samples=10), to_bytes(model(1)))
        )
        end = time.monotonic() + 20
        while a.node_key not in coord.session.arrivals:  # b never comes: a waits
            assert time.monotonic() < end and not waiting.done()
            await asyncio.sleep(0.05)
        coord.conns[a.node_key].conn.close(2, "lost: dropped by the test")
        with pytest.raises(DriftError):
            await asyncio.wait_for(waiting, 15)
        for c in (a, b):
            await c.close()
        coord.shutdown()
        await asyncio.wait_for(runner, 10)
        await coord.close()

    run(main())
