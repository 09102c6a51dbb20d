"""Hostile nodes against a real coordinator over iroh: every node token holder is untrusted.

One test per way a valid node token was used to break a session (poisoned weights,
self-reported numbers, held upload slots, a hijacked round 0, unbounded membership, raw
strings, revocation that did not cut connections), plus a few more. Each drives a hostile
client by hand (the async CoordinatorClient, or raw transport streams) next to honest nodes
and checks that the honest nodes' session completes with finite checkpoints that verify, that
status keeps answering, and that the coordinator's log names the node and the reason.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import sys
from pathlib import Path

import msgspec
import pytest
import torch
from lightning_drift_cli.local import free_udp_port
from rich.console import Console
from support import honest_step, node_info, small_fingerprint, small_model, verify_checkpoints

from lightning_drift.aggregate import from_bytes, to_bytes
from lightning_drift.auth import TokenStore
from lightning_drift.coordinator.config import ServeOptions, SessionConfig
from lightning_drift.coordinator.monitor import render_lines, render_table
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.coordinator.session import MemberState
from lightning_drift.errors import AuthError, DriftError, SessionError
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.node.client import CoordinatorClient
from lightning_drift.protocol import (
    MAX_FRAME,
    BarrierReady,
    BarrierSync,
    BlobHeader,
    DeviceInfo,
    Error,
    TrainProgress,
    encode,
)

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT = 120
FP = small_fingerprint()

pytestmark = pytest.mark.slow


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, TIMEOUT))


def coordinator(tmp_path: Path, *, serve: dict | None = None, **cfg) -> Coordinator:
    base = dict(
        epochs=1,
        batch_size=10,
        sync_every=10,
        min_nodes=3,
        dataset_size=900,  # three nodes: three rounds
        heartbeat_timeout=5.0,
        heartbeat_s=0.5,
        deadline_floor=2.0,
        max_strikes=2,
    )
    base.update(cfg)
    opts = dict(
        state_dir=tmp_path / "state",
        port=free_udp_port(),
        tick_s=0.1,
        finish_grace_s=0.3,
        upload_grace_s=1.0,
    )
    opts.update(serve or {})
    return Coordinator(SessionConfig(**base), ServeOptions(**opts))


async def join(coord: Coordinator, name: str = "", token: str = "", **info) -> CoordinatorClient:
    ni = node_info(coord.config.dataset_size, FP)
    for k, v in info.items():
        setattr(ni, k, v)
    return await CoordinatorClient.connect(
        token or coord.node_token, node_info=ni, name=name, timeout=10
    )


async def honest(client: CoordinatorClient, index: int, log: dict | None = None) -> dict:
    """An honest node's whole session: start-up sync, shard, every round; the final weights.
    ``log`` collects what it uploaded, by round."""
    ready, blob = await client.barrier(BarrierSync(round=0), to_bytes(small_model()))
    held = from_bytes(blob)
    a = await client.shard(0)
    for k in range(a.rounds):
        r = a.first_round + k
        up = honest_step(held, r, index)
        if log is not None:
            log.setdefault(r, {})[client.node_key] = up
        ready, blob = await client.barrier(
            BarrierSync(round=r, samples=10, train_seconds=0.5), to_bytes(up)
        )
        assert ready.round == r, ready
        held = from_bytes(blob)
        if ready.finished:
            break
    assert ready.finished
    return held


async def scene(coord: Coordinator, n_honest: int = 2, uploads: dict | None = None):
    """The coordinator running; ``n_honest`` honest nodes ("a", "b", ...) going through the
    whole session in tasks; and one more node, "evil", synced to round 0 and holding its
    epoch-0 shard. Returns (the run task, the honest clients, their tasks, evil, its shard)."""
    await coord.start()
    runner = asyncio.create_task(coord.run())
    hon = [await join(coord, chr(ord("a") + i)) for i in range(n_honest)]
    evil = await join(coord, "evil")
    tasks = [asyncio.create_task(honest(c, i, uploads)) for i, c in enumerate(hon)]
    await evil.barrier(BarrierSync(round=0), to_bytes(small_model()))
    shard = await evil.shard(0)
    return runner, hon, tasks, evil, shard


async def status(coord: Coordinator):
    """The session as an observer sees it: status must keep answering."""
    obs = await CoordinatorClient.connect(coord.observer_token, timeout=10)
    try:
        st = await asyncio.wait_for(obs.status(), 10)
    finally:
        await obs.close()
    assert st.session_id == coord.session.session_id
    # What a person sees renders, whatever the nodes called themselves.
    Console(file=io.StringIO(), width=120).print(render_table(st))
    render_lines(st, now=0)
    return st


async def finish(coord: Coordinator, runner: asyncio.Task, *clients: CoordinatorClient) -> None:
    await asyncio.wait_for(runner, 30)  # the session finished
    for c in clients:
        await c.close()
    await coord.close()


async def wrap_up(coord: Coordinator, runner: asyncio.Task, tasks: list, *clients) -> list:
    """The honest nodes' final weights once their session is done; status still answers."""
    finals = await asyncio.gather(*tasks)
    await status(coord)
    await finish(coord, runner, *clients)
    return finals


def honest_finished(tmp_path: Path, finals: list) -> list[dict]:
    """The honest nodes ended on finite weights and every checkpoint verifies."""
    assert finals and all(finite(f) for f in finals)
    return verify_checkpoints(tmp_path / "state" / "checkpoints")


def finite(sd: dict) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in sd.values() if t.is_floating_point())


def logged(caplog, *parts: str) -> str:
    """The first coordinator log line holding every one of ``parts``."""
    for rec in caplog.records:
        msg = rec.getMessage()
        if all(p in msg for p in parts):
            return msg
    raise AssertionError(f"no log line with {parts}")


async def until(cond, what: str, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not cond():
        if loop.time() > end:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.05)


async def raw_upload(
    client: CoordinatorClient,
    sync: BarrierSync,
    data: bytes,
    *,
    size: int | None = None,
    sha256: str | None = None,
):
    """A barrier stream by hand: ``sync``, a blob header claiming ``size`` bytes (default the
    data's) and ``sha256`` (default the data's), then ``data`` (all of it or a prefix).
    Returns the stream."""
    stream = await client.conn.open_stream()
    await stream.send(sync)
    await stream.send(
        BlobHeader(size=len(data) if size is None else size, sha256=sha256 or sha256_bytes(data))
    )
    await stream.send_raw(data)
    return stream


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="lightning_drift")


# ---- 1. poisoned weights --------------------------------------------------------------------


def test_poisoned_weights_are_not_published_and_their_node_is_excluded(tmp_path, caplog):
    """A node scaling its weights by 1e30 (and setting num_batches_tracked to 2^62): with the
    plain mean the round's aggregate fails its check, the previous weights stay, the node is
    named and, after max_strikes such rounds, excluded; the honest rounds go on."""

    async def main():
        coord = coordinator(tmp_path)
        uploads: dict = {}
        runner, (a, b), tasks, evil, shard = await scene(coord, uploads=uploads)
        poison = {k: v * 1e30 for k, v in small_model().items()}
        poison["bn.num_batches_tracked"] = torch.tensor(2**62)
        ready, _ = await evil.barrier(BarrierSync(round=1, samples=10), to_bytes(poison))
        assert ready.round == 1  # answered with the weights that stayed
        await status(coord)
        # The second poisoned round is its last: it is excluded as that round completes.
        with contextlib.suppress(DriftError):
            await evil.barrier(BarrierSync(round=2, samples=10), to_bytes(poison))
        await until(lambda: evil.error is not None, "the excluded node's connection is ended")
        assert isinstance(evil.error, SessionError) and evil.error.code == "excluded"
        assert shard.first_round == 1
        finals = await asyncio.gather(*tasks)
        st = await status(coord)
        assert {n.name: n.state for n in st.nodes}["evil"] == "excluded"
        await finish(coord, runner, a, b, evil)
        return finals, uploads, evil.node_key

    finals, uploads, evil = run(main())
    entries = verify_checkpoints(tmp_path / "state" / "checkpoints")
    by_round = {e["round"]: e for e in entries}
    assert "aggregate refused" in by_round[1]["extra"]["unchanged"]
    assert by_round[1]["extra"]["suspects"] == evil
    assert by_round[1]["sha256"] == by_round[0]["sha256"]  # the previous global stayed
    assert "unchanged" not in by_round[3]["extra"]  # the honest round is published
    final = finals[0]
    assert finite(final) and torch.equal(final["w"], finals[1]["w"])
    honest3 = list(uploads[3].values())
    expect = (honest3[0]["w"].double() + honest3[1]["w"].double()) / 2
    assert torch.allclose(final["w"].double(), expect, atol=1e-6)
    assert int(final["bn.num_batches_tracked"]) == 10  # + the median increment, never 2^62
    logged(caplog, "round 1 not published", "moved by", f"suspects: {evil[:8]}")
    logged(caplog, f"node {evil[:8]} excluded", "2 failed uploads")


def test_diloco_overflow_is_refused_and_honest_uploads_still_count(tmp_path, caplog):
    """±3.4e38 under DiLoCo made the outer step overflow: inf in the checkpoint, every honest
    upload refused from then on. Now the round is not published and the momentum stays."""

    async def main():
        coord = coordinator(tmp_path, aggregation="diloco", max_strikes=1)
        runner, (a, b), tasks, evil, _ = await scene(coord)
        edge = {
            k: torch.full_like(v, 3.4e38)
            for k, v in small_model().items()
            if k != "bn.num_batches_tracked"
        }
        edge["bn.num_batches_tracked"] = torch.tensor(0)
        with contextlib.suppress(DriftError):  # excluded as the round completes (1 strike)
            await evil.barrier(BarrierSync(round=1, samples=10), to_bytes(edge))
        finals = await asyncio.gather(*tasks)
        await finish(coord, runner, a, b, evil)
        return finals, evil.node_key

    finals, evil = run(main())
    entries = verify_checkpoints(tmp_path / "state" / "checkpoints")
    by_round = {e["round"]: e for e in entries}
    assert "aggregate refused" in by_round[1]["extra"]["unchanged"]
    outer1 = from_bytes(
        (tmp_path / "state/checkpoints/round-000001.outer.safetensors").read_bytes()
    )
    assert outer1 == {} or all(float(t.abs().max()) == 0 for t in outer1.values())
    assert sorted(c[0] for c in by_round[3]["contributors"]) != []  # honest rounds counted
    assert all(finite(f) for f in finals)
    logged(caplog, "round 1 not published", f"suspects: {evil[:8]}")


@pytest.mark.parametrize("robust, clip", [("median", 0.0), ("trimmed", 0.0), ("off", 2.0)])
def test_robust_aggregation_keeps_a_poisoned_round_near_the_honest_result(
    tmp_path, caplog, robust, clip
):
    """Three honest nodes and one hostile: every round is published and stays within the
    method's bound of the honest uploads (the honest range per coordinate for median and
    trimmed mean; a clip × the median change for the clip)."""

    async def main():
        coord = coordinator(tmp_path, min_nodes=4, dataset_size=1200, robust=robust, clip=clip)
        uploads: dict = {}
        runner, hon, tasks, evil, shard = await scene(coord, 3, uploads)
        held: dict = {}
        for r in range(shard.first_round, shard.first_round + shard.rounds):
            poison = {
                k: torch.full_like(v, -1e30)
                for k, v in small_model().items()
                if k != "bn.num_batches_tracked"
            }
            poison["bn.num_batches_tracked"] = torch.tensor(2**62)
            ready, blob = await evil.barrier(BarrierSync(round=r, samples=10**9), to_bytes(poison))
            held[r] = from_bytes(blob)
        await asyncio.gather(*tasks)
        await finish(coord, runner, *hon, evil)
        return uploads, held

    uploads, held = run(main())
    entries = verify_checkpoints(tmp_path / "state" / "checkpoints")
    assert all("unchanged" not in e["extra"] for e in entries if e["round"] > 0)
    prev = small_model()
    for r in sorted(held):
        ups = list(uploads[r].values())
        got = held[r]
        for k in ("w", "b"):
            stack = torch.stack([u[k] for u in ups])
            if robust in ("median", "trimmed"):
                lo, hi = stack.min(0).values, stack.max(0).values
                assert bool(((got[k] >= lo - 1e-5) & (got[k] <= hi + 1e-5)).all()), (r, k)
        if clip:
            changes = [
                sum(float(((u[k] - prev[k]).double() ** 2).sum()) for k in ("w", "b")) ** 0.5
                for u in ups
            ]
            moved = sum(float(((got[k] - prev[k]).double() ** 2).sum()) for k in ("w", "b"))
            assert moved**0.5 <= clip * sorted(changes)[1] + 1e-6, r
        assert int(got["bn.num_batches_tracked"]) == 10 * r
        prev = got


# ---- 2. self-reported numbers ---------------------------------------------------------------


def test_self_reported_numbers_cannot_stall_crash_or_take_the_epoch(tmp_path, caplog):
    """A node reporting a tiny rate (never uploading), one reporting a calibration and rates of
    1e308 and train_seconds=5e-324: rounds close at a bounded deadline, the next epoch is
    planned, shares stay bounded, and status keeps answering (also after they left)."""

    async def main():
        coord = coordinator(tmp_path, min_nodes=4, dataset_size=1200, epochs=2)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = await join(coord, "a"), await join(coord, "b")
        slow = await join(coord, "slow")
        big = await join(coord, "big", calibration=1e308)
        tasks = [asyncio.create_task(honest_epochs(c, i, 2)) for i, c in enumerate((a, b))]
        for c in (slow, big):
            await c.barrier(BarrierSync(round=0), to_bytes(small_model()))
        shares = {c.node_key: (await c.shard(0)).share for c in (slow, big)}
        assert shares[big.node_key] <= 4 / 7 + 1e-9  # at most PACE_FACTOR x the median node
        await slow.progress(
            TrainProgress(round=1, epoch=0, step=0, samples=0, samples_per_s=1e-300)
        )
        await big.progress(TrainProgress(round=1, epoch=0, step=0, samples=0, samples_per_s=1e308))
        ready, blob = await big.barrier(
            BarrierSync(round=1, samples=10**12, train_seconds=5e-324), to_bytes(small_model())
        )
        st = await status(coord)
        json.dumps(msgspec.to_builtins(st), allow_nan=False)  # every number is finite
        await big.close()  # gone: its numbers must not break status either
        await status(coord)
        finals = await asyncio.gather(*tasks)
        st = await status(coord)
        json.dumps(msgspec.to_builtins(st), allow_nan=False)
        await finish(coord, runner, a, b, slow)
        return finals, slow.node_key

    finals, slow = run(main())
    honest_finished(tmp_path, finals)
    logged(caplog, "deadline passed", "left behind", slow[:8])
    logged(caplog, "planned epoch 1")
    logged(caplog, "NodeInfo bounded: calibration 1e+308 → 1e+06")
    logged(caplog, "barrier.bounded", "train_seconds 4.94e-324 → 0.001")


async def honest_epochs(client: CoordinatorClient, index: int, epochs: int) -> dict:
    ready, blob = await client.barrier(BarrierSync(round=0), to_bytes(small_model()))
    held = from_bytes(blob)
    for epoch in range(epochs):
        a = await client.shard(epoch)
        for k in range(a.rounds):
            r = a.first_round + k
            ready, blob = await client.barrier(
                BarrierSync(round=r, epoch=epoch, samples=10, train_seconds=0.5),
                to_bytes(honest_step(held, r, index)),
            )
            held = from_bytes(blob)
            if ready.finished:
                return held
    return held


# ---- 3. upload slots --------------------------------------------------------------------------


def test_a_slow_upload_holds_no_slot_and_is_dropped_below_the_minimum_rate(tmp_path, caplog):
    """An upload trickling in holds no slot: honest uploads of the same round are taken
    meanwhile, with one decoding slot. Then one byte every half second is dropped below the
    minimum rate (too_slow) and the round goes on without it."""

    async def main():
        # Round 1: a start-up grace long enough that only the slot question is asked.
        coord = coordinator(
            tmp_path, serve={"max_uploads": 1, "min_upload_rate": 4096, "upload_grace_s": 300.0}
        )
        runner, (a, b), tasks, evil, _ = await scene(coord)
        blob = to_bytes(honest_step(small_model(), 1, 9))  # a change: it shows training
        sha = sha256_bytes(blob)
        stream = await raw_upload(
            evil, BarrierSync(round=1, samples=10), blob[:1], size=len(blob), sha256=sha
        )

        def honest_in() -> bool:
            return {a.node_key, b.node_key} <= set(coord.session.arrivals)

        await until(lambda: evil.node_key in coord.uploading, "the slow upload was admitted")
        await until(honest_in, "the honest uploads of round 1 were taken")
        assert evil.node_key in coord.uploading  # while the slow one is still arriving
        await stream.send_raw(blob[1:])  # it completes: round 1 has all three
        ready = await asyncio.wait_for(stream.recv(), 30)
        assert isinstance(ready, BarrierReady) and ready.round == 1 and ready.contributed
        # Round 2: the rate applies after half a second; one byte every half second is dropped.
        coord.options.upload_grace_s = 0.5
        stream = await raw_upload(
            evil, BarrierSync(round=2, samples=10), blob[:1], size=len(blob), sha256=sha
        )

        async def trickle():
            for byte in blob[1:]:
                await asyncio.sleep(0.5)
                await stream.send_raw(bytes([byte]))

        dripping = asyncio.create_task(trickle())
        err = await asyncio.wait_for(stream.recv(), 30)
        assert isinstance(err, Error) and err.code == "too_slow", err
        assert "--min-upload-rate" in err.message
        dripping.cancel()
        finals = await wrap_up(coord, runner, tasks, a, b, evil)
        return finals, evil.node_key

    finals, evil = run(main())
    entries = honest_finished(tmp_path, finals)
    by_round = {e["round"]: [c[0] for c in e["contributors"]] for e in entries}
    assert evil in by_round[1] and evil not in by_round[2]
    logged(caplog, f"node {evil[:8]} upload for round 2 refused", "too slow")


def test_admission_comes_before_any_upload_byte_is_read(tmp_path, caplog):
    """Verdicts from the BarrierSync alone; sizes and the tensor table from the header; one
    upload at a time per node."""

    async def main():
        coord = coordinator(tmp_path, max_strikes=5)
        runner, (a, b), tasks, evil, _ = await scene(coord)
        # A round that is not open: refused without a byte of the (never sent) blob.
        stream = await evil.conn.open_stream()
        await stream.send(BarrierSync(round=99))
        err = await asyncio.wait_for(stream.recv(), 10)
        assert isinstance(err, Error) and err.code == "bad_round"
        # Another model: refused from its safetensors header, before its body is sent.
        other = to_bytes(dict(small_model(), w=torch.zeros(100, 4)))
        head = other[: 8 + int.from_bytes(other[:8], "little")]
        stream = await raw_upload(evil, BarrierSync(round=1), head, size=len(other))
        err = await asyncio.wait_for(stream.recv(), 10)
        assert isinstance(err, Error) and err.code == "bad_upload"
        assert "not the session's model" in err.message and "'w' has shape (100, 4)" in err.message
        # A terabyte declared: refused from the header, nothing reserved.
        stream = await raw_upload(evil, BarrierSync(round=1), b"", size=1 << 40)
        err = await asyncio.wait_for(stream.recv(), 10)
        assert isinstance(err, Error) and err.code == "too_large"
        finals = await wrap_up(coord, runner, tasks, a, b, evil)
        return finals, evil.node_key

    finals, evil = run(main())
    honest_finished(tmp_path, finals)
    logged(caplog, f"node {evil[:8]} upload for round 1 refused", "not the session's model")


def test_one_upload_at_a_time_per_node(tmp_path):
    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=400)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, evil = await join(coord, "a"), await join(coord, "evil")
        task = asyncio.create_task(honest(a, 0))
        await evil.barrier(BarrierSync(round=0), to_bytes(small_model()))
        await evil.shard(0)
        blob = to_bytes(small_model())
        first = await raw_upload(evil, BarrierSync(round=1, samples=10), blob[:10], size=len(blob))
        await until(lambda: evil.node_key in coord.uploading, "the first upload is arriving")
        second = await raw_upload(evil, BarrierSync(round=1, samples=10), blob)
        err = await asyncio.wait_for(second.recv(), 10)
        assert isinstance(err, Error) and "one barrier upload at a time" in err.message
        del first
        final = await task
        await finish(coord, runner, a, evil)
        return final

    assert finite(run(main()))
    verify_checkpoints(tmp_path / "state" / "checkpoints")


# ---- 4. round 0 -----------------------------------------------------------------------------


def test_round_zero_belongs_to_the_operator_with_init(tmp_path, caplog):
    """--init seeds the global weights: another model's start-up upload is neither adopted nor
    accepted later, a node announcing another model is refused, honest nodes get the init."""
    init = {k: v + 1 for k, v in small_model(5).items()}
    path = tmp_path / "init.safetensors"
    path.write_bytes(to_bytes(init))

    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=600, serve={"init": path})
        await coord.start()
        assert coord.session.has_weights and coord.session.model_fingerprint == FP
        runner = asyncio.create_task(coord.run())
        with pytest.raises(SessionError) as refused:
            await join(coord, "other", model_fingerprint="cd" * 32)
        assert refused.value.code == "model_mismatch"
        evil = await join(coord, "evil")  # announces the right model...
        other = {"w": torch.zeros(100, 4)}  # ...and offers another one at round 0
        ready, blob = await evil.barrier(BarrierSync(round=0), to_bytes(other))
        assert not ready.contributed and from_bytes(blob)["w"].shape == (8, 4)
        a, b = await join(coord, "a"), await join(coord, "b")
        first = await a.barrier(BarrierSync(round=0), to_bytes(small_model()))
        assert torch.equal(from_bytes(first[1])["w"], init["w"])  # the operator's weights
        await evil.close()
        finals = await asyncio.gather(honest(a, 0), honest(b, 1))
        await status(coord)
        await finish(coord, runner, a, b)
        return finals

    finals = run(main())
    entries = verify_checkpoints(tmp_path / "state" / "checkpoints")
    assert entries[0]["contributors"] == [["operator", 1.0]]
    assert entries[0]["extra"]["init"] == str(path)
    assert all(finite(f) for f in finals)
    logged(caplog, "round 0: initial weights from", str(path))
    logged(caplog, "refused", "fingerprint")


def test_round_zero_without_init_pins_the_first_nodes_model(tmp_path, caplog):
    """The first admitted node's fingerprint is pinned: an empty or other fingerprint is
    refused, and start-up weights of another model are refused from their header, even when
    they come first."""

    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=600)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        with pytest.raises(SessionError) as refused:
            await join(coord, "blank", model_fingerprint="")
        assert refused.value.code == "bad_input" and "fingerprint" in str(refused.value)
        evil = await join(coord, "evil")  # the model the session will train, it says
        with pytest.raises(SessionError) as refused:
            await join(coord, "other", model_fingerprint="cd" * 32)
        assert refused.value.code == "model_mismatch"
        hijack = {"w": torch.zeros(100, 4), "b": torch.zeros(4)}
        with pytest.raises(SessionError) as bad:
            await evil.barrier(BarrierSync(round=0), to_bytes(hijack))
        assert bad.value.code == "bad_upload" and "not the model the nodes announced" in str(
            bad.value
        )
        assert not coord.session.has_weights
        a, b = await join(coord, "a"), await join(coord, "b")
        await evil.close()
        finals = await asyncio.gather(honest(a, 0), honest(b, 1))
        await status(coord)
        await finish(coord, runner, a, b)
        return finals, evil.node_key

    finals, evil = run(main())
    entries = verify_checkpoints(tmp_path / "state" / "checkpoints")
    assert entries[0]["contributors"][0][0] != evil
    assert finals[0]["w"].shape == (8, 4) and all(finite(f) for f in finals)
    logged(caplog, f"node {evil[:8]} upload for round 0 refused", "not the model")


# ---- 5. membership ----------------------------------------------------------------------------


def test_membership_is_capped_pruned_and_named_uniquely(tmp_path, caplog):
    async def main():
        coord = coordinator(
            tmp_path, min_nodes=2, dataset_size=600, max_nodes=3, max_nodes_per_token=2,
            forget_after_s=0.5,
        )  # fmt: skip
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = await join(coord, "box"), await join(coord, "box")
        with pytest.raises(SessionError) as refused:
            await join(coord, "third")  # the same token
        assert refused.value.code == "too_many_nodes" and "--max-nodes-per-token" in str(
            refused.value
        )
        own, _ = coord.state.issue(
            coord.state.identity(), session=coord.session.session_id, ticket=coord.ticket
        )
        other, _ = coord.state.issue(
            coord.state.identity(), session=coord.session.session_id, ticket=coord.ticket
        )
        c = await join(coord, "c", token=own)
        with pytest.raises(SessionError) as refused:
            await join(coord, "d", token=other)
        assert refused.value.code == "too_many_nodes" and "--max-nodes" in str(refused.value)
        st = await status(coord)
        assert sorted(n.name for n in st.nodes) == ["box", "box#2", "c"]
        await c.close()  # it leaves: forgotten after the grace
        await until(lambda: c.node_key not in coord.session.members, "the left member is dropped")
        st = await status(coord)
        assert c.node_key not in {n.node_id for n in st.nodes}
        finals = await asyncio.gather(honest(a, 0), honest(b, 1))
        await finish(coord, runner, a, b)
        return finals

    assert all(finite(f) for f in run(main()))
    verify_checkpoints(tmp_path / "state" / "checkpoints")
    logged(caplog, "refused (too_many_nodes", "maximum of 3 live nodes")


# ---- 6. strings -------------------------------------------------------------------------------


def test_strings_from_nodes_reach_no_terminal_or_log_raw(tmp_path, caplog):
    """Escape sequences, newlines, rich markup and a near-megabyte name: status answers and
    renders, the log stays one line per record, and `drift-coord status` works."""
    evil_name = "\x1b[2J\x1b]0;owned\x07[/]\nINFO lightning_drift forged line" + "x" * 900_000

    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=600)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, b = await join(coord, "a"), await join(coord, "b")
        evil = await join(
            coord,
            evil_name,
            devices=[DeviceInfo(name="gpu\nERROR forged\x1b[31m[bold]", kind="cuda[/]")] * 50,
            train_device="cuda:0\n[/]",
            hostname="\u202eevil",
        )
        tasks = [asyncio.create_task(honest(c, i)) for i, c in enumerate((a, b))]
        st = await status(coord)
        shown = next(n for n in st.nodes if n.node_id == evil.node_key)
        assert len(shown.name) <= 64 and "\x1b" not in shown.name and "\n" not in shown.name
        assert "\n" not in shown.device and "\x1b" not in shown.device
        await evil.control.send(Error(code="x\ny", message="bye\nERROR forged\x1b[2J" * 1000))
        await until(lambda: coord.session.members[evil.node_key].state is not MemberState.JOINED
                    and not coord.session.members[evil.node_key].live(), "the node is gone")  # fmt: skip
        finals = await asyncio.gather(*tasks)
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "lightning_drift_cli.coord", "status",
            "--state-dir", str(tmp_path / "state"),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=str(ROOT),
        )  # fmt: skip
        out, err = await asyncio.wait_for(proc.communicate(), 60)
        assert proc.returncode == 0, err.decode()
        assert b"\x1b[2J" not in out and b"forged line" not in out.split(b"\n")[0]
        await finish(coord, runner, a, b, evil)
        return finals

    finals = run(main())
    honest_finished(tmp_path, finals)
    for rec in caplog.records:
        msg = rec.getMessage()
        assert "\n" not in msg and "\x1b" not in msg and "\u202e" not in msg, msg[:200]
        assert len(msg) < 4000, msg[:200]
    logged(caplog, "lost", "node error", "bye ERROR forged")
    logged(caplog, "NodeInfo bounded", "devices cut to 16", "train_device cleaned")


# ---- 7. revocation ----------------------------------------------------------------------------


def test_revocation_closes_the_tokens_open_connections(tmp_path, caplog):
    async def main():
        coord = coordinator(tmp_path, min_nodes=2, dataset_size=600)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        ident = coord.state.identity()
        sid = coord.session.session_id
        tok, claims = coord.state.issue(ident, session=sid, ticket=coord.ticket)
        otok, oclaims = coord.state.issue(ident, session=sid, ticket=coord.ticket, role="observer")
        a, b = await join(coord, "a"), await join(coord, "b")
        evil = await join(coord, "evil", token=tok)
        watcher = await CoordinatorClient.connect(otok, timeout=10)
        await watcher.status()
        tasks = [asyncio.create_task(honest(c, i)) for i, c in enumerate((a, b))]
        store = TokenStore(coord.state.path)  # what `drift-coord revoke` does, while it runs
        store.revoke(claims.jti)
        store.revoke(oclaims.jti)
        await until(lambda: evil.error is not None, "the revoked node's connection is closed")
        assert isinstance(evil.error, (AuthError, DriftError))
        with pytest.raises(DriftError):
            await asyncio.wait_for(watcher.status(), 10)
        with pytest.raises(AuthError, match="revoked"):
            await join(coord, "evil-again", token=tok)
        finals = await wrap_up(coord, runner, tasks, a, b, evil, watcher)
        return finals, evil.node_key, claims.jti

    finals, evil, jti = run(main())
    honest_finished(tmp_path, finals)
    logged(caplog, f"node {evil[:8]} disconnected", f"token {jti} was revoked")


# ---- more -----------------------------------------------------------------------------------


def test_a_barrier_stream_that_says_nothing_is_dropped(tmp_path, caplog):
    async def main():
        coord = coordinator(
            tmp_path, min_nodes=1, dataset_size=400, serve={"handshake_timeout_s": 2.0}
        )
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, evil = await join(coord, "a"), await join(coord, "evil")
        task = asyncio.create_task(honest(a, 0))
        await evil.barrier(BarrierSync(round=0), to_bytes(small_model()))
        await evil.shard(0)
        streams = [await evil.conn.open_stream() for _ in range(5)]
        for s in streams:
            await s.send_raw(b"\x00")  # opened, then silence
        await until(lambda: evil.error is not None, "the silent streams end the connection")
        final = await task
        await finish(coord, runner, a, evil)
        return final

    assert finite(run(main()))
    logged(caplog, "dropped: protocol error", "no BarrierSync on a barrier stream in time")
    verify_checkpoints(tmp_path / "state" / "checkpoints")


def test_a_node_cannot_pass_off_a_blob_as_barrier_ready(tmp_path, caplog):
    """Frames meant for the other direction are refused on every stream a node opens."""

    async def main():
        coord = coordinator(tmp_path, min_nodes=1, dataset_size=400)
        await coord.start()
        runner = asyncio.create_task(coord.run())
        a, evil = await join(coord, "a"), await join(coord, "evil")
        task = asyncio.create_task(honest(a, 0))
        stream = await evil.conn.open_stream()
        await stream.send(BarrierReady(round=1, sha256="0" * 64))
        try:  # the refusal, unless the connection's end overtakes it
            err = await asyncio.wait_for(stream.recv(), 10)
            assert isinstance(err, Error) and err.code == "protocol"
        except DriftError:
            pass
        await until(lambda: evil.error is not None, "the connection is dropped")
        final = await task
        await finish(coord, runner, a, evil)
        return final

    assert finite(run(main()))
    logged(caplog, "dropped: protocol error", "starts with BarrierSync, not BarrierReady")


def test_status_never_exceeds_the_frame_limit(tmp_path):
    """However many members a session has had, and whatever they called themselves."""

    async def main():
        coord = coordinator(tmp_path, max_nodes=5000, max_nodes_per_token=5000)
        await coord.start()
        s = coord.session
        for i in range(3000):
            node = f"{i:064x}"
            s.join(node, boundary_name(i), 0.0)
            if i % 2:
                s.lost(node, "gone " * 100, 1.0)
        st = coord.status()
        body = encode(st)
        assert len(body) <= MAX_FRAME
        assert st.nodes[0].state == "joined"  # live members first
        await coord.close()
        return len(st.nodes)

    assert 0 < run(main()) <= 256


def boundary_name(i: int) -> str:
    from lightning_drift.coordinator.boundary import NAME_MAX, clean_text

    return clean_text(f"node {i} " + "ß" * 200, NAME_MAX)
