"""End to end with the sharded data plane: a real coordinator process and four real node
processes train the char-LM on loopback; the members push, reduce and fetch the round's
pieces between themselves and the coordinator keeps the books."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
import torch
from e2e.launch import start_node
from lightning_drift_cli.local import LocalCoordinator
from safetensors.torch import load_file

pytestmark = pytest.mark.timeout(600)


def _wait(procs, tmp: Path, coord: LocalCoordinator) -> None:
    for i, p in enumerate(procs):
        code = p.wait(timeout=480)
        assert code == 0, (
            f"node {i} exited {code}:\n{(tmp / f'node-{i}.log').read_text()[-4000:]}\n"
            f"coordinator:\n{coord.log_tail()}"
        )


def test_four_members_end_bit_equal_to_every_checkpoint(tmp_path: Path) -> None:
    n = 4
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=n, epochs=1, batch_size=16, sync_every=3, quorum=1.0,
        keep=1000, transfer_dtype="int8", aggregation="diloco", data_plane="sharded", shards=4,
    ) as coord:  # fmt: skip
        procs = [
            start_node(
                coord.token,
                tmp_path,
                f"node-{i}",
                "--round-copies",
                str(tmp_path / f"copies-{i}"),
                epochs=1,
            )  # fmt: skip
            for i in range(n)
        ]
        _wait(procs, tmp_path, coord)
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    ckpt = coord.checkpoint_dir
    final = load_file(str(coord.latest_checkpoint()))
    # Every training round was reduced by the members and changed the weights.
    entries = json.loads((ckpt / "manifest.json").read_text())["checkpoints"]
    trained = [e for e in entries if e["round"] > 0]
    assert len(trained) >= 3, entries
    for e in trained:
        assert e["extra"].get("data_plane") == "sharded", e
        assert "unchanged" not in e["extra"], (e, coord.log_tail())
    assert len({e["sha256"] for e in entries}) == len(entries), entries
    for i in range(n):
        report = json.loads((tmp_path / f"node-{i}" / "report.json").read_text())
        training = [h for h in report["history"] if h["round"] > 0]
        assert len(training) >= 3, report["history"]
        for h in report["history"]:
            copy = tmp_path / f"copies-{i}" / f"round-{h['round']:06d}.safetensors"
            theirs = ckpt / f"round-{h['round']:06d}.safetensors"
            assert copy.read_bytes() == theirs.read_bytes(), h
        node_final = load_file(str(tmp_path / f"node-{i}" / "final.safetensors"))
        for k in final:
            assert torch.equal(node_final[k], final[k]), k


def test_a_member_killed_mid_session_is_replaced_and_the_others_end_exact(
    tmp_path: Path,
) -> None:
    # SIGKILL one of four member processes once the first round is done: its seats go to the
    # next members of their rankings, the others train on, and end on every checkpoint.
    n = 4
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=n, epochs=1, batch_size=16, sync_every=2, quorum=1.0,
        keep=1000, transfer_dtype="int8", aggregation="diloco", data_plane="sharded", shards=4,
        heartbeat_timeout=3, deadline_floor=2,
    ) as coord:  # fmt: skip
        procs = [
            start_node(
                coord.token,
                tmp_path,
                f"node-{i}",
                "--round-copies",
                str(tmp_path / f"copies-{i}"),
                epochs=1,
            )  # fmt: skip
            for i in range(n)
        ]
        state = coord.state_dir / "state.json"
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline:
            done = json.loads(state.read_text()).get("session", {}) if state.exists() else {}
            if done.get("completed", 0) >= 1:
                break
            time.sleep(0.05)
        procs[-1].send_signal(signal.SIGKILL)
        procs[-1].wait(30)
        _wait(procs[:-1], tmp_path, coord)
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    ckpt = coord.checkpoint_dir
    entries = json.loads((ckpt / "manifest.json").read_text())["checkpoints"]
    assert max(e["round"] for e in entries) >= 3, entries
    published = [e for e in entries if e["round"] > 1 and "unchanged" not in e["extra"]]
    assert published, (entries, coord.log_tail())
    final = load_file(str(coord.latest_checkpoint()))
    for i in range(n - 1):
        report = json.loads((tmp_path / f"node-{i}" / "report.json").read_text())
        for h in report["history"]:
            copy = tmp_path / f"copies-{i}" / f"round-{h['round']:06d}.safetensors"
            assert copy.read_bytes() == (ckpt / f"round-{h['round']:06d}.safetensors").read_bytes()
        node_final = load_file(str(tmp_path / f"node-{i}" / "final.safetensors"))
        assert all(torch.equal(node_final[k], final[k]) for k in final)


def test_a_late_joiner_fetches_the_weights_from_the_members(tmp_path: Path) -> None:
    # Four members train; once the first round is done they pause (a gate file), and a fifth
    # node joins. Its start-up sync is answered with the weights' chunk table: it fetches the
    # chunks from the four members at once (each checked against its sha256), then all five
    # train to the end and hold the final checkpoint.
    n = 4
    gate = tmp_path / "gate"
    gate.mkdir()
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=n, epochs=2, batch_size=16, sync_every=3, quorum=1.0,
        keep=1000, transfer_dtype="int8", aggregation="diloco", data_plane="sharded", shards=4,
    ) as coord:  # fmt: skip
        procs = [
            start_node(coord.token, tmp_path, f"node-{i}", "--gate", str(gate), epochs=2)
            for i in range(n)
        ]
        state = coord.state_dir / "state.json"
        _until(lambda: _completed(state) >= 1, "round 1", coord)
        (gate / "hold").touch()
        procs.append(start_node(coord.token, tmp_path, f"node-{n}", epochs=2))
        log = tmp_path / f"node-{n}.log"
        _until(lambda: "weights_fetched" in log.read_text(errors="replace"), "the join", coord)
        (gate / "hold").unlink()
        _wait(procs, tmp_path, coord)
        assert coord.wait(timeout=60) == 0, coord.log_tail()
    final = load_file(str(coord.latest_checkpoint()))
    report = json.loads((tmp_path / f"node-{n}" / "report.json").read_text())
    assert report["history"][0]["payload"] == "chunks", report["history"]
    assert f"holders={n}" in log.read_text(), log.read_text()[-3000:]
    for i in range(n + 1):
        node_final = load_file(str(tmp_path / f"node-{i}" / "final.safetensors"))
        assert all(torch.equal(node_final[k], final[k]) for k in final), i


def _completed(state: Path) -> int:
    try:
        return int(json.loads(state.read_text())["session"].get("completed", 0))
    except (OSError, ValueError, KeyError):
        return 0


def _until(cond, what: str, coord: LocalCoordinator, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"never: {what}\n{coord.log_tail()}"
        time.sleep(0.05)
