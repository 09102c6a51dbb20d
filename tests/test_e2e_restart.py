"""Fault injection end to end: the coordinator is SIGKILLed mid-session while real Lightning
nodes train; it restarts on the same state dir and the nodes reconnect on their own and finish."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from e2e.launch import kill_all, log_tail, start_node
from lightning_drift_cli.local import LocalCoordinator
from safetensors.torch import load_file

from lightning_drift.errors import DriftError
from lightning_drift.node.client import CoordinatorClient

pytestmark = pytest.mark.timeout(480)


def _completed_rounds(coord: LocalCoordinator) -> list[int]:
    try:
        return sorted(c["round"] for c in coord.manifest()["checkpoints"])
    except (OSError, ValueError, KeyError):
        return []


def _mid_round(coord: LocalCoordinator) -> bool:
    """True while a training round is open and some node's upload for it is already counted
    (the coordinator holds part of the round in memory only)."""

    async def ask() -> bool:
        obs = await CoordinatorClient.connect(coord.observer_token, timeout=10)
        try:
            st = await obs.status()
        finally:
            await obs.close()
        return st.round >= 1 and any(n.state == "barrier" for n in st.nodes)

    try:
        return asyncio.run(ask())
    except DriftError:
        return False


def test_nodes_ride_through_a_coordinator_kill(tmp_path: Path) -> None:
    # The coordinator is SIGKILLed in the middle of a round (one node's upload counted, the
    # round not complete) while the nodes train on with their rounds in flight.
    epochs = 3
    coord = LocalCoordinator(
        tmp_path / "coord", min_nodes=2, epochs=epochs, batch_size=16, sync_every=6, quorum=1.0
    )
    coord.start()
    token_before = coord.token
    procs = [
        start_node(coord.token, tmp_path, f"n{i}", "--max-chars", "40000", epochs=epochs)
        for i in range(2)
    ]
    try:
        # Kill once a training round (beyond the start-up round 0) is durable and the next one
        # is half gathered.
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not _mid_round(coord):
            assert all(p.poll() is None for p in procs), "a node exited before the kill"
            time.sleep(0.1)
        before = _completed_rounds(coord)
        assert max(before) >= 1, coord.log_tail()
        coord.kill()
        time.sleep(1.0)  # let the nodes notice and start retrying
        coord.start()
        assert coord.token == token_before  # the token printed before the kill is still it
        codes = [p.wait(timeout=360) for p in procs]
        for i, code in enumerate(codes):
            assert code == 0, log_tail(tmp_path, f"n{i}") + coord.log_tail()
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    finally:
        kill_all(procs)
        coord.stop()

    after = _completed_rounds(coord)
    # Rounds went on from where they were; the last one is later than anything before the kill.
    assert max(after) > max(before)
    final = load_file(str(coord.latest_checkpoint()))
    for i in range(2):
        report = json.loads((tmp_path / f"n{i}" / "report.json").read_text())
        assert len(report["val_losses"]) == epochs
        assert any(h["overlapped"] for h in report["history"])  # rounds were in flight
        node_final = load_file(str(tmp_path / f"n{i}" / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k
    # The token issued before the kill still admits a node after the restart.
    from lightning_drift_cli.common import fetch_status  # noqa: F401  (import check only)

    assert (coord.state_dir / "node.token").read_text().strip() == token_before


def _has_rejoined(coord: LocalCoordinator, name: str) -> bool:
    """True once a node named ``name`` (a restarted one: ``name#2``) trains in the session."""

    async def ask() -> bool:
        obs = await CoordinatorClient.connect(coord.observer_token, timeout=10)
        try:
            st = await obs.status()
        finally:
            await obs.close()
        return any(n.name == name and n.state in ("training", "barrier") for n in st.nodes)

    try:
        return asyncio.run(ask())
    except DriftError:
        return False


def _restart_b(coord: LocalCoordinator, gate: Path, b, start_b2, tmp_path: Path):
    """Kill ``b`` (if it still runs) and start its second process with ``start_b2()``; node a
    (started with ``--gate gate``) is held after its batches from just before the kill until
    b2 trains in the session, so the session cannot end while b2 imports torch and
    calibrates, however busy the machine. Returns b2 and the last round completed at the
    kill."""
    gate.mkdir(exist_ok=True)
    (gate / "hold").touch()
    if b.poll() is None:
        b.kill()
    b.wait(timeout=30)
    round_at_kill = max(_completed_rounds(coord))
    b2 = start_b2()
    deadline = time.monotonic() + 300
    while not _has_rejoined(coord, "b#2"):
        assert b2.poll() is None, log_tail(tmp_path, "b2")
        assert time.monotonic() < deadline, "b2 never trained in the session\n" + coord.log_tail()
        time.sleep(0.3)
    (gate / "release").touch()
    return b2, round_at_kill


def _b_restarts_while_a_trains_on(tmp_path: Path, epochs: int):
    """A started coordinator where a lost node does not stop the session (quorum 1/2, a short
    heartbeat), and how to start its char-LM nodes."""
    coord = LocalCoordinator(
        tmp_path / "coord",
        min_nodes=2,
        epochs=epochs,
        batch_size=16,
        sync_every=6,
        quorum=0.5,
        heartbeat_timeout=3.0,
        deadline_floor=1.0,
    )
    coord.start()

    def node(name: str, out: str, *extra: str) -> subprocess.Popen:
        return start_node(
            coord.token, tmp_path, out, "--max-chars", "40000", *extra, name=name, epochs=epochs
        )

    return coord, node


def test_a_killed_node_resumes_from_its_checkpoint_and_rejoins(tmp_path: Path) -> None:
    # Node b is SIGKILLed after its first epoch's checkpoint; node a trains on alone (quorum
    # 1/2 once b is lost). b restarts from last.ckpt with ckpt_path and rejoins the session at
    # the coordinator's current round and epoch, then both end on the final checkpoint.
    epochs = 3
    coord, node = _b_restarts_while_a_trains_on(tmp_path, epochs)
    ckpt = tmp_path / "b-ckpt"
    # a keeps the session going while b restarts (b's new process imports torch and
    # calibrates first: the session must not be over by then, hence a's gate).
    gate = tmp_path / "gate"
    a = node("a", "a", "--slow", "0.6", "--gate", str(gate))
    b = node("b", "b1", "--ckpt-dir", str(ckpt))
    procs = [a, b]
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not (ckpt / "last.ckpt").exists():
            assert b.poll() is None, (tmp_path / "b1.log").read_text()[-3000:]
            time.sleep(0.2)
        time.sleep(0.5)  # let the checkpoint file be complete
        b2, round_at_kill = _restart_b(
            coord,
            gate,
            b,
            lambda: node("b", "b2", "--ckpt-dir", str(ckpt), "--resume", str(ckpt / "last.ckpt")),
            tmp_path,
        )
        procs.append(b2)
        for p, log in ((a, "a"), (b2, "b2")):
            assert p.wait(timeout=360) == 0, (tmp_path / f"{log}.log").read_text()[-4000:]
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    finally:
        kill_all(procs)
        coord.stop()

    report = json.loads((tmp_path / "b2" / "report.json").read_text())
    # The resumed node's first sync brought it the coordinator's weights of a round at least
    # as late as the one completed when it was killed (it rejoined, it did not start over).
    assert report["history"][0]["round"] >= round_at_kill
    assert report["epochs_run"] == epochs
    final = load_file(str(coord.latest_checkpoint()))
    for out in ("a", "b2"):
        node_final = load_file(str(tmp_path / out / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k


def test_a_node_coming_back_after_the_end_gets_the_final_weights(tmp_path: Path) -> None:
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=1, epochs=1, sync_every=6, stay=True
    ) as coord:
        first = start_node(coord.token, tmp_path, "first")
        assert first.wait(timeout=240) == 0, log_tail(tmp_path, "first")
        late = start_node(coord.token, tmp_path, "late")
        assert late.wait(timeout=240) == 0, log_tail(tmp_path, "late")
        final = load_file(str(coord.latest_checkpoint()))
    report = json.loads((tmp_path / "late" / "report.json").read_text())
    assert report["shards"] == []  # nothing left to train
    for out in ("first", "late"):
        node_final = load_file(str(tmp_path / out / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k


def test_a_node_killed_mid_overlap_resumes_from_its_checkpoint_and_ends_exact(tmp_path: Path):
    # Node b saves a Lightning checkpoint while one of its rounds is in flight (its weights are
    # local, mid-round ones) and is SIGKILLed at once. It restarts from that checkpoint, rejoins
    # at the coordinator's round, and both nodes end on the final checkpoint bit for bit.
    epochs = 3
    coord, node = _b_restarts_while_a_trains_on(tmp_path, epochs)
    ckpt = tmp_path / "b-ckpt"
    gate = tmp_path / "gate"
    # a keeps the session going while b restarts.
    a = node("a", "a", "--slow", "0.4", "--gate", str(gate))
    b = node("b", "b1", "--ckpt-dir", str(ckpt), "--die-in-flight", "1")
    procs = [a, b]
    try:
        assert b.wait(timeout=300) == -signal.SIGKILL, log_tail(tmp_path, "b1")
        saved = torch.load(ckpt / "in-flight.ckpt", weights_only=False)["drift"]
        # Saved mid-overlap: based on round >= 1, with samples trained since its snapshot.
        assert saved["round"] >= 1 and saved["samples_since_round"] > 0, saved
        b2, round_at_kill = _restart_b(
            coord,
            gate,
            b,
            lambda: node("b", "b2", "--resume", str(ckpt / "in-flight.ckpt")),
            tmp_path,
        )
        procs.append(b2)
        for p, log in ((a, "a"), (b2, "b2")):
            assert p.wait(timeout=360) == 0, log_tail(tmp_path, log)
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    finally:
        kill_all(procs)
        coord.stop()

    report = json.loads((tmp_path / "b2" / "report.json").read_text())
    assert report["history"][0]["round"] >= round_at_kill  # it rejoined, it did not start over
    final = load_file(str(coord.latest_checkpoint()))
    for out in ("a", "b2"):
        node_final = load_file(str(tmp_path / out / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k
