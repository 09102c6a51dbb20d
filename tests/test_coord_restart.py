"""SIGKILL the coordinator process mid-round and restart it with the same state dir.

The round counter and global weights continue from the last completed round, the node
token printed before the kill still works, and nodes (same keys) reconnect and carry on.
A kill before any round has completed keeps the epoch plan: it is saved when it is made.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path

import pytest
import torch
from lightning_drift_cli.local import free_udp_port
from support import Reference
from support import node_info as any_node_info

from lightning_drift.aggregate import DiLoCo, from_bytes, to_bytes
from lightning_drift.coordinator.rounds import RESIDUAL_PREFIX
from lightning_drift.errors import ConnectTimeout, DriftError, PeerLost
from lightning_drift.modelspec import state_fingerprint
from lightning_drift.node.client import CoordinatorClient
from lightning_drift.node.weights import GlobalWeights
from lightning_drift.protocol import BarrierSync

ROOT = Path(__file__).resolve().parents[1]
# Each test starts the coordinator twice and waits inside for up to 240 s (a busy machine).
pytestmark = pytest.mark.timeout(300)


def upload(upload_round: int, i: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * upload_round + i)
    return {"w": torch.randn(8, 4, generator=g), "b": torch.randn(4, generator=g)}


def node_info(calibration: float = 10.0):
    """This file's nodes: the default dataset, the model ``upload`` makes."""
    info = any_node_info(fingerprint=state_fingerprint(upload(0, 0)))
    info.calibration = calibration
    return info


async def start_coordinator(state: Path, port: int | None = None, config: Path | None = None):
    """``drift-coord serve`` on ``state``; port and config omitted when None (a restart)."""
    args = ["--state-dir", str(state)]
    if port is not None:
        args += ["--port", str(port)]
    if config is not None:
        args += ["--config", str(config)]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "lightning_drift_cli.coord", "serve", *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL, cwd=str(ROOT),
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip
    lines = []
    while True:
        line = (await asyncio.wait_for(proc.stdout.readline(), 60)).decode().strip()
        assert line, f"coordinator exited early: {lines}"
        lines.append(line)
        if line.startswith("node token"):
            token = (await proc.stdout.readline()).decode().strip()
            return proc, token, lines


async def connect(
    token: str, secret: bytes, deadline_s: float = 90.0, calibration: float = 10.0
) -> CoordinatorClient:
    """What a node does after losing the coordinator: retry with backoff, same key."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline_s
    delay = 0.1
    while True:
        try:
            return await CoordinatorClient.connect(
                token, node_info=lambda: node_info(calibration), secret=secret, timeout=10
            )
        except (ConnectTimeout, PeerLost):
            if loop.time() > end:
                raise
            await asyncio.sleep(delay)
            delay = min(delay * 2, 1.0)


async def wait_barrier_state(observer_token: str, node: str) -> None:
    obs = await CoordinatorClient.connect(observer_token, timeout=30)
    try:
        end = asyncio.get_running_loop().time() + 60  # generous: a busy machine is slow
        while asyncio.get_running_loop().time() < end:
            st = await obs.status()
            if any(n.node_id == node and n.state == "barrier" for n in st.nodes):
                return
            await asyncio.sleep(0.05)
        raise AssertionError("the coordinator recorded no upload within 60 s")
    finally:
        await obs.close()


def session_config(tmp_path: Path, extra: str = "") -> Path:
    """The restart tests' session: 2 nodes, 1 epoch of 1000 samples, rounds of 10 steps;
    ``extra``: more YAML (coordinator options indented by two spaces, or a model part)."""
    config = tmp_path / "train.yaml"
    config.write_text(
        "coordinator:\n  min_nodes: 2\n  epochs: 1\n  dataset_size: 1000\n  batch_size: 10\n"
        "  sync_every: 10\n  heartbeat_s: 0.5\n  heartbeat_timeout: 10\n" + extra
    )
    return config


async def kill_with_upload_pending(proc, state: Path, client: CoordinatorClient, upload_round: int):
    """``client`` uploads for ``upload_round``; once the coordinator has it, SIGKILL the coordinator.
    The upload's barrier must then fail: the client notices the silence (no coordinator
    Ping), not QUIC's 35 s timeout."""
    pending = asyncio.create_task(
        client.barrier(
            BarrierSync(round=upload_round, samples=10), to_bytes(upload(upload_round, 0))
        )
    )
    observer = (state / "observer.token").read_text().strip()
    await wait_barrier_state(observer, client.node_key)
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    try:
        await asyncio.wait_for(pending, 20)
        raise AssertionError("a barrier answered by a dead coordinator")
    except DriftError:
        pass


def test_sigkill_and_restart_continues_from_last_completed_round(tmp_path):
    state = tmp_path / "state"
    port = free_udp_port()
    config = session_config(tmp_path, "model:\n  hidden: 8\n")
    secrets_ = [os.urandom(32), os.urandom(32)]

    async def main():
        proc, token, _ = await start_coordinator(state, port, config)
        try:
            a, b = [await connect(token, s) for s in secrets_]
            assert "hidden: 8" in a.config.lightning_config
            await a.barrier(BarrierSync(round=0), to_bytes(upload(0, 0)))
            await b.barrier(BarrierSync(round=0), to_bytes(upload(0, 0)))
            sa = await a.shard(0)
            await b.shard(0)
            assert sa.rounds == 5
            for open_round in (1, 2):
                res = await asyncio.gather(
                    a.barrier(
                        BarrierSync(round=open_round, samples=10), to_bytes(upload(open_round, 0))
                    ),
                    b.barrier(
                        BarrierSync(round=open_round, samples=20), to_bytes(upload(open_round, 1))
                    ),
                )
                assert res[0][0].round == open_round
            blob2 = res[0][1]
            # Round 3: A's upload is in, B's is not; then the coordinator dies.
            await kill_with_upload_pending(proc, state, a, 3)
            await a.close()
            await b.close()

            proc, token2, _ = await start_coordinator(state, port, config)
            assert token2 == token  # the same standing token, still valid
            a, b = [await connect(token, s) for s in secrets_]
            assert a.config.round == 2 and a.config.has_weights  # continues from round 2
            # Nodes re-send their round-3 uploads; the round completes from those.
            res = await asyncio.gather(
                a.barrier(BarrierSync(round=3, samples=10), to_bytes(upload(3, 0))),
                b.barrier(BarrierSync(round=3, samples=20), to_bytes(upload(3, 1))),
            )
            ready, blob3 = res[0]
            assert ready.round == 3 and ready.contributed
            for open_round in (4, 5):
                res = await asyncio.gather(
                    a.barrier(
                        BarrierSync(round=open_round, samples=10), to_bytes(upload(open_round, 0))
                    ),
                    b.barrier(
                        BarrierSync(round=open_round, samples=20), to_bytes(upload(open_round, 1))
                    ),
                )
            assert res[0][0].finished
            await a.close()
            await b.close()
            assert await asyncio.wait_for(proc.wait(), 20) == 0  # exits when done
            return blob2, blob3, a.node_key, b.node_key
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    blob2, blob3, ka, kb = asyncio.run(asyncio.wait_for(main(), 240))
    ckpt = state / "checkpoints"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    rounds = {e["round"]: e for e in manifest["checkpoints"]}
    assert sorted(rounds) == [1, 2, 3, 4, 5]
    assert (ckpt / "round-000002.safetensors").read_bytes() == blob2
    assert (ckpt / "round-000003.safetensors").read_bytes() == blob3
    # Round 3 is the weighted mean of exactly the re-sent uploads, in manifest order.
    order = [c[0] for c in rounds[3]["contributors"]]
    ups = {ka: (upload(3, 0), 10.0), kb: (upload(3, 1), 20.0)}
    got = from_bytes(blob3)
    for k in got:
        acc = torch.zeros(got[k].shape, dtype=torch.float64)
        for n in order:
            acc = acc + ups[n][0][k].double() * ups[n][1]
        assert torch.equal(got[k], (acc / 30.0).to(torch.float32))
    st = json.loads((state / "state.json").read_text())["session"]
    assert st["completed"] == 5 and st["finished"]


def test_epoch_plan_survives_a_kill_before_round_one_completes(tmp_path):
    """The epoch plan is saved when it is made: a coordinator killed during round 1 (after
    the start-up sync, before any round has completed) hands out the same shards again."""
    state = tmp_path / "state"
    port = free_udp_port()
    config = session_config(tmp_path)
    secrets_ = [os.urandom(32), os.urandom(32)]
    fields = ("epoch", "start", "stop", "rounds", "first_round", "seed", "share")

    def shard_of(a) -> dict:
        return {f: getattr(a, f) for f in fields}

    async def main():
        proc, token, _ = await start_coordinator(state, port, config)
        try:
            a = await connect(token, secrets_[0], calibration=300.0)
            await a.barrier(BarrierSync(round=0), to_bytes(upload(0, 0)))
            # B (a third of A's calibration) joins after the round-0 state was written, so a
            # plan made again from that state would give A the whole epoch instead.
            b = await connect(token, secrets_[1], calibration=100.0)
            await b.barrier(BarrierSync(round=0), to_bytes(upload(0, 0)))
            before = {c.node_key: shard_of(await c.shard(0)) for c in (a, b)}
            assert before[a.node_key]["stop"] - before[a.node_key]["start"] == 750
            assert before[b.node_key]["stop"] - before[b.node_key]["start"] == 250
            assert {s["rounds"] for s in before.values()} == {5}
            assert {s["first_round"] for s in before.values()} == {1}
            # Round 1: A's upload is in, B's is not; then the coordinator dies.
            await kill_with_upload_pending(proc, state, a, 1)
            await a.close()
            await b.close()
            saved = json.loads((state / "state.json").read_text())["session"]
            assert saved["completed"] == 0 and saved["has_weights"]
            assert saved["epochs"]["plan"] is not None
            assert {n: {f: v[f] for f in fields} for n, v in saved["epochs"]["assignments"].items()} == before

            proc, token2, _ = await start_coordinator(state, port, config)
            assert token2 == token
            a, b = [await connect(token, s) for s in secrets_]
            assert a.config.round == 0 and a.config.has_weights
            after = {c.node_key: shard_of(await c.shard(0)) for c in (a, b)}
            assert after == before  # the plan made before the kill, not a new one
            res = await asyncio.gather(
                a.barrier(BarrierSync(round=1, samples=10), to_bytes(upload(1, 0))),
                b.barrier(BarrierSync(round=1, samples=20), to_bytes(upload(1, 1))),
            )
            for ready, _ in res:
                assert ready.round == 1 and ready.contributed and not ready.finished
            await a.close()
            await b.close()
            return before, a.node_key, b.node_key
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    before, ka, kb = asyncio.run(asyncio.wait_for(main(), 240))
    manifest = json.loads((state / "checkpoints" / "manifest.json").read_text())
    rounds = {e["round"]: e for e in manifest["checkpoints"]}
    assert sorted(rounds) == [0, 1]
    assert {c[0] for c in rounds[1]["contributors"]} == {ka, kb}
    st = json.loads((state / "state.json").read_text())["session"]
    assert st["completed"] == 1
    assert {n: {f: v[f] for f in fields} for n, v in st["epochs"]["assignments"].items()} == before


def test_diloco_restart_restores_the_weights_and_the_outer_momentum(tmp_path):
    """After a kill, a restart given only --state-dir hands out exactly the latest checkpoint
    and its next DiLoCo step continues from the momentum saved with it."""
    state = tmp_path / "state"
    lr, mom = 0.7, 0.9
    config = session_config(
        tmp_path, f"  aggregation: diloco\n  outer_lr: {lr}\n  outer_momentum: {mom}\n"
    )
    ckpt = state / "checkpoints"
    secrets_ = [os.urandom(32), os.urandom(32)]
    samples = (10, 20)
    init = upload(0, 0)
    param = {k: v.clone() for k, v in init.items()}
    opt = torch.optim.SGD(list(param.values()), lr=lr, momentum=mom, nesterov=True, foreach=False)

    def outer_step(completed_round: int, ups: dict[str, dict[str, torch.Tensor]]) -> None:
        """The coordinator's step by hand: the sample-weighted mean in float64 in manifest
        order, then one Nesterov SGD step on the pseudo-gradient (global - mean)."""
        manifest = json.loads((ckpt / "manifest.json").read_text())
        entry = next(e for e in manifest["checkpoints"] if e["round"] == completed_round)
        for k, p in param.items():
            acc = torch.zeros(p.shape, dtype=torch.float64)
            for node, w in entry["contributors"]:
                acc = acc + ups[node][k].double() * w
            mean = (acc / sum(samples)).to(p.dtype)
            p.grad = p.detach() - mean
        opt.step()

    def check(completed_round: int, blob: bytes) -> None:
        assert (ckpt / f"round-{completed_round:06d}.safetensors").read_bytes() == blob
        got = from_bytes(blob)
        outer = from_bytes((ckpt / f"round-{completed_round:06d}.outer.safetensors").read_bytes())
        # SGD's formula up to rounding (DiLoCo computes it in float64 without SGD's fused
        # multiply-add, so that its bits do not depend on the CPU's kernels); a momentum lost
        # in the restart would be off by far more than this.
        for k, p in param.items():
            buf = opt.state[p]["momentum_buffer"]
            torch.testing.assert_close(got[k], p.detach(), rtol=1e-6, atol=1e-6)
            assert outer[k].dtype == buf.dtype, (completed_round, k)
            torch.testing.assert_close(outer[k], buf, rtol=1e-6, atol=1e-6)

    async def train_round(clients, open_round: int) -> bytes:
        ups = {c.node_key: upload(open_round, i) for i, c in enumerate(clients)}
        res = await asyncio.gather(
            *(
                c.barrier(
                    BarrierSync(round=open_round, samples=samples[i]), to_bytes(ups[c.node_key])
                )
                for i, c in enumerate(clients)
            )
        )
        assert all(r.round == open_round and r.contributed for r, _ in res)
        outer_step(open_round, ups)
        return res[0][1]

    async def main():
        proc, token, _ = await start_coordinator(state, free_udp_port(), config)
        try:
            clients = [await connect(token, s) for s in secrets_]
            await clients[0].barrier(BarrierSync(round=0), to_bytes(init))
            await clients[1].barrier(BarrierSync(round=0), to_bytes(upload(0, 1)))
            for c in clients:
                await c.shard(0)
            for open_round in (1, 2):
                check(open_round, await train_round(clients, open_round))
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            for c in clients:
                await c.close()

            proc, token2, _ = await start_coordinator(state)  # the address from the state dir
            assert token2 == token
            clients = [await connect(token, s) for s in secrets_]
            ready, blob = await clients[0].barrier(BarrierSync(round=0), to_bytes(upload(9, 9)))
            assert ready.round == 2 and not ready.contributed
            assert blob == (ckpt / "round-000002.safetensors").read_bytes()
            check(3, await train_round(clients, 3))
            for c in clients:
                await c.close()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    asyncio.run(asyncio.wait_for(main(), 240))  # two coordinator start-ups, on a busy machine


def test_compressed_diloco_restart_keeps_the_momentum_and_the_download_residual(tmp_path):
    """With int8 changes both ways, a SIGKILL between rounds loses neither DiLoCo's momentum
    nor the coordinator's download residual: they are saved with every checkpoint, and the
    round after the restart is exactly the one an uninterrupted coordinator would make."""
    state = tmp_path / "state"
    lr, mom = 0.7, 0.9
    config = session_config(
        tmp_path,
        f"  aggregation: diloco\n  outer_lr: {lr}\n  outer_momentum: {mom}\n"
        "  transfer_dtype: int8\n",
    )
    ckpt = state / "checkpoints"
    secrets_ = [os.urandom(32), os.urandom(32)]
    samples = (10, 20)
    init = upload(0, 0)
    ref = Reference(init, "int8", DiLoCo(lr=lr, momentum=mom))
    helds = [GlobalWeights("int8"), GlobalWeights("int8")]

    def check_outer(completed_round: int) -> None:
        outer = from_bytes((ckpt / f"round-{completed_round:06d}.outer.safetensors").read_bytes())
        assert ref.outer is not None
        for k, v in ref.outer.state_dict().items():
            assert torch.equal(outer[k], v), (completed_round, k)
        residual = ref.residual.state_dict()
        assert residual and any(bool(v.abs().sum() > 0) for v in residual.values())
        for k, v in residual.items():
            assert torch.equal(outer[RESIDUAL_PREFIX + k], v), (completed_round, k)

    async def train_round(clients, open_round: int) -> None:
        payloads: dict[str, bytes] = {}

        async def one(i: int):
            # Each node's weights after a round of "training" from the global weights.
            local = {k: v + 0.1 * upload(open_round, i)[k] for k, v in ref.glob.items()}
            up = helds[i].upload(local, open_round)
            payloads[clients[i].node_key] = up.payload
            ready, blob = await clients[i].barrier(
                BarrierSync(
                    round=open_round,
                    samples=samples[i],
                    delta=up.delta,
                    base_round=up.base_round,
                    base_sha256=up.base_sha256,
                ),
                up.payload,
            )
            assert ready.contributed and ready.payload == "delta", ready
            return helds[i].receive(ready.round, blob, ready.sha256, payload=ready.payload)

        got = await asyncio.gather(one(0), one(1))
        manifest = json.loads((ckpt / "manifest.json").read_text())
        entry = next(e for e in manifest["checkpoints"] if e["round"] == open_round)
        weight = {c.node_key: float(samples[i]) for i, c in enumerate(clients)}
        expect = ref.round([(payloads[n], weight[n]) for n, _ in entry["contributors"]])
        assert (ckpt / f"round-{open_round:06d}.safetensors").read_bytes() == expect
        assert all(g.blob == expect for g in got)
        check_outer(open_round)

    async def main():
        proc, token, _ = await start_coordinator(state, free_udp_port(), config)
        try:
            clients = [await connect(token, s) for s in secrets_]
            for c, held in zip(clients, helds, strict=True):
                up = held.offer(init)
                ready, blob = await c.barrier(
                    BarrierSync(round=0, base_sha256=up.base_sha256), up.payload
                )
                held.receive(ready.round, blob, ready.sha256, payload=ready.payload)
            for c in clients:
                await c.shard(0)
            for open_round in (1, 2):
                await train_round(clients, open_round)
            proc.send_signal(signal.SIGKILL)
            await proc.wait()
            for c in clients:
                await c.close()

            proc, _, _ = await start_coordinator(state)
            clients = [await connect(token, s) for s in secrets_]
            await train_round(clients, 3)
            for c in clients:
                await c.close()
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    asyncio.run(asyncio.wait_for(main(), 240))
