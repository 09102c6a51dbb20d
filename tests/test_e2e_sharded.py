"""End to end with the sharded data plane: a real coordinator process and four real node
processes train the char-LM on loopback; the members push, reduce and fetch the round's
pieces between themselves and the coordinator keeps the books."""

from __future__ import annotations

import json
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from e2e.launch import start_node
from lightning_drift_cli.local import LocalCoordinator
from safetensors.torch import load_file
from support import verify_checkpoints

pytestmark = pytest.mark.timeout(600)
N = 4
SHARDED = dict(
    min_nodes=N, batch_size=16, quorum=1.0, keep=1000, transfer_dtype="int8",
    aggregation="diloco", data_plane="sharded", shards=4,
)  # fmt: skip


def _members(coord: LocalCoordinator, tmp: Path, *extra: str, epochs: int) -> list:
    """The four member processes, each keeping a copy of every round it holds."""
    return [
        start_node(
            coord.token,
            tmp,
            f"node-{i}",
            "--round-copies",
            str(tmp / f"copies-{i}"),
            *extra,
            epochs=epochs,
        )  # fmt: skip
        for i in range(N)
    ]


def _wait(procs: list[subprocess.Popen], tmp: Path, coord: LocalCoordinator) -> None:
    for i, p in enumerate(procs):
        code = p.wait(timeout=480)
        assert code == 0, (
            f"node {i} exited {code}:\n{(tmp / f'node-{i}.log').read_text()[-4000:]}\n"
            f"coordinator:\n{coord.log_tail()}"
        )
    assert coord.wait(timeout=60) == 0, coord.log_tail()


def _completed(coord: LocalCoordinator) -> int:
    try:
        return int(json.loads((coord.state_dir / "state.json").read_text())["session"]["completed"])
    except (OSError, ValueError, KeyError):
        return 0


def _until(cond, what: str, coord: LocalCoordinator, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}\n{coord.log_tail()}"
        time.sleep(0.05)


def _exact(coord: LocalCoordinator, tmp: Path, nodes: range) -> None:
    """Each node held every round's checkpoint it was given, byte for byte, and ends on the
    final one."""
    ckpt = coord.checkpoint_dir
    final = load_file(str(coord.latest_checkpoint()))
    for i in nodes:
        report = json.loads((tmp / f"node-{i}" / "report.json").read_text())
        for h in report["history"] if (tmp / f"copies-{i}").exists() else []:
            copy = tmp / f"copies-{i}" / f"round-{h['round']:06d}.safetensors"
            assert copy.read_bytes() == (ckpt / f"round-{h['round']:06d}.safetensors").read_bytes()
        node_final = load_file(str(tmp / f"node-{i}" / "final.safetensors"))
        assert all(torch.equal(node_final[k], final[k]) for k in final), i


def _entries(coord: LocalCoordinator) -> list[dict]:
    return json.loads((coord.checkpoint_dir / "manifest.json").read_text())["checkpoints"]


@pytest.mark.parametrize("dtype", ["int8", "int2 weights", "int3 weights", "topk"])
def test_four_members_end_bit_equal_to_every_checkpoint(tmp_path: Path, dtype: str) -> None:
    codec_name, *where = dtype.split()
    settings = dict(SHARDED, transfer_dtype=codec_name, residual=(where or ["change"])[0])
    with LocalCoordinator(tmp_path / "coord", epochs=1, sync_every=3, **settings) as coord:
        _wait(_members(coord, tmp_path, epochs=1), tmp_path, coord)
    # Every training round was reduced by the members and changed the weights.
    entries = _entries(coord)
    trained = [e for e in entries if e["round"] > 0]
    assert len(trained) >= 3, entries
    for e in trained:
        assert e["extra"].get("data_plane") == "sharded", e
        assert "unchanged" not in e["extra"], (e, coord.log_tail())
    assert len({e["sha256"] for e in entries}) == len(entries), entries
    # The seats' state (DiLoCo's momentum, the residual) came into each checkpoint after its
    # round was answered (the last one may still have been on its way when the session ended).
    assert all(e["outer_file"] for e in trained[:-1]), trained
    verify_checkpoints(coord.checkpoint_dir)
    _exact(coord, tmp_path, range(N))


def test_a_member_killed_mid_session_is_replaced_and_the_others_end_exact(
    tmp_path: Path,
) -> None:
    # SIGKILL one of four member processes once the first round is done: its seats go to the
    # next members of their rankings, the others train on, and end on every checkpoint.
    with LocalCoordinator(
        tmp_path / "coord", epochs=1, sync_every=2, heartbeat_timeout=3, deadline_floor=20,
        **SHARDED,
    ) as coord:  # fmt: skip
        procs = _members(coord, tmp_path, epochs=1)
        _until(lambda: _completed(coord) >= 1, "round 1", coord)
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(30)
        _wait(procs[:-1], tmp_path, coord)
    entries = _entries(coord)
    assert max(e["round"] for e in entries) >= 3, entries
    published = [e for e in entries if e["round"] > 1 and "unchanged" not in e["extra"]]
    assert published, (entries, coord.log_tail())
    _exact(coord, tmp_path, range(N - 1))


def test_a_late_joiner_fetches_the_weights_from_the_members(tmp_path: Path) -> None:
    # Four members train; once the first round is done they pause (a gate file), and a fifth
    # node joins. Its start-up sync is answered with the weights' chunk table: it fetches the
    # chunks from the four members at once (each checked against its sha256), then all five
    # train to the end and hold the final checkpoint.
    gate = tmp_path / "gate"
    gate.mkdir()
    with LocalCoordinator(tmp_path / "coord", epochs=2, sync_every=3, **SHARDED) as coord:
        procs = _members(coord, tmp_path, "--gate", str(gate), epochs=2)
        _until(lambda: _completed(coord) >= 1, "round 1", coord)
        (gate / "hold").touch()
        procs.append(start_node(coord.token, tmp_path, f"node-{N}", epochs=2))
        log = tmp_path / f"node-{N}.log"
        _until(lambda: "weights_fetched" in log.read_text(errors="replace"), "the join", coord)
        (gate / "hold").unlink()
        _wait(procs, tmp_path, coord)
    report = json.loads((tmp_path / f"node-{N}" / "report.json").read_text())
    assert report["history"][0]["payload"] == "chunks", report["history"]
    assert f"holders={N}" in log.read_text(), log.read_text()[-3000:]
    _exact(coord, tmp_path, range(N + 1))


def test_the_coordinator_restarts_and_the_members_go_on_exact(tmp_path: Path) -> None:
    # SIGKILL the coordinator after the second round and start it again on its state
    # directory: the members reconnect, send their commits again and train to the end, and
    # every round they hold is the restarted coordinator's checkpoint, byte for byte.
    coord = LocalCoordinator(
        tmp_path / "coord", epochs=1, sync_every=2, heartbeat_timeout=3, deadline_floor=2,
        stay=True, **SHARDED,
    )  # fmt: skip
    coord.start()
    try:
        procs = _members(coord, tmp_path, epochs=1)
        _until(lambda: _completed(coord) >= 2, "round 2", coord)
        coord.kill()
        coord.start()
        for i, p in enumerate(procs):
            assert p.wait(timeout=480) == 0, (tmp_path / f"node-{i}.log").read_text()[-4000:]
    finally:
        coord.stop()
    entries = _entries(coord)
    assert max(e["round"] for e in entries) >= 4, entries
    after = [e for e in entries if e["round"] > 2 and "unchanged" not in e["extra"]]
    assert after, (entries, coord.log_tail())
    _exact(coord, tmp_path, range(N))
