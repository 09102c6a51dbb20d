"""Peers by id, end to end through the command lines: a coordinator and two `drift train`
nodes as real processes on loopback, no token anywhere.

- The coordinator dials: the nodes start first with ``drift train --listen --peer C`` (C from
  ``drift-coord id``) and print their tickets; ``drift train --peers T1,T2 --epochs 1`` runs
  the coordinator, which opens the connections and sends Ping.
- The nodes dial: ``drift train --peers ID1,ID2 --epochs 1`` (the ids from ``drift id``)
  admits exactly those keys without a token; the nodes join with ``drift train --peer C@ADDR``,
  and a node whose key is not listed is refused.

Either way both nodes end holding exactly the coordinator's final checkpoint.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning_drift_cli.local import free_udp_port
from safetensors.torch import load_file

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TIMEOUT = 300.0
# A small char-LM on a small text: one round per epoch, a minute on two shared cores.
NODE_ARGS = [
    "--max-chars", "7600", "--d-model", "16", "--n-layers", "1", "--block-size", "32",
    "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--no-progress",
]  # fmt: skip


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _drift(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_drift_cli.drift", *args]


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)


class Procs:
    """Processes started in their own folders, each logging to ``<name>.log``."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str]) -> Path:
        folder = self.tmp / name
        folder.mkdir(exist_ok=True)
        log = open(self.tmp / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            cmd, cwd=folder, env=_env(), stdout=log, stderr=subprocess.STDOUT
        )
        return folder

    def log(self, name: str) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")

    def logs(self) -> str:
        return "\n".join(f"--- {n}:\n{self.log(n)[-2500:]}" for n in self.procs)

    def wait_for(self, name: str, pattern: str) -> re.Match[str]:
        """The first match of ``pattern`` in ``name``'s log, once it appears."""
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            found = re.search(pattern, self.log(name))
            if found:
                return found
            assert self.procs[name].poll() is None, f"{name} exited:\n{self.logs()}"
            time.sleep(0.2)
        raise AssertionError(f"no {pattern!r} in {name}'s log:\n{self.logs()}")

    def wait_all(self) -> None:
        """Every process exits 0; the first to fail fails the test with the logs."""
        deadline = time.monotonic() + TIMEOUT
        while True:
            codes = {n: p.poll() for n, p in self.procs.items()}
            failed = {n: c for n, c in codes.items() if c not in (None, 0)}
            assert not failed, f"exit codes {failed}:\n{self.logs()}"
            if all(c == 0 for c in codes.values()):
                return
            assert time.monotonic() < deadline, f"still running {codes}:\n{self.logs()}"
            time.sleep(0.3)

    def kill(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.kill()
                p.wait(timeout=30)


def _text(tmp: Path) -> Path:
    text = tmp / "text.txt"
    text.write_bytes(bytes(range(32, 127)) * 80)  # 7600 bytes: 213 training windows of 32
    return text


def _assert_all_hold_final(coord_dir: Path, node_dirs: list[Path]) -> None:
    """Both nodes' last.ckpt equal the coordinator's final checkpoint, and both contributed."""
    ckpts = coord_dir / "drift-state" / "checkpoints"
    final_path = ckpts / (ckpts / "latest").read_text().strip()
    final = load_file(str(final_path))
    for folder in node_dirs:
        state = torch.load(str(folder / "last.ckpt"), map_location="cpu", weights_only=False)
        for k, ref in final.items():
            assert torch.equal(state["state_dict"][k], ref), f"{folder.name}: {k} differs"
        assert state["drift"]["round"] == int(final_path.name.split("-")[1].split(".")[0])
    manifest = (ckpts / "manifest.json").read_text()
    assert manifest.count('"contributors"') >= 2  # round 0 and the epoch's round


def test_the_coordinator_dials_nodes_that_listen(tmp_path: Path) -> None:
    text = _text(tmp_path)
    coord_dir = tmp_path / "coord"
    coord_dir.mkdir()
    r = _run([sys.executable, "-m", "lightning_drift_cli.coord", "id"], cwd=coord_dir)
    assert r.returncode == 0, r.stderr
    coordinator = r.stdout.strip()
    assert re.fullmatch(r"[0-9a-f]{64}", coordinator), r.stdout

    procs = Procs(tmp_path)
    try:
        tickets, ids, dirs = [], [], []
        for name in ("a", "b"):
            dirs.append(
                procs.start(
                    name,
                    _drift(
                        "train",
                        "--listen",
                        "127.0.0.1:0",
                        "--peer",
                        coordinator,
                        "--key-file",
                        str(tmp_path / f"{name}.key"),
                        "--name",
                        name,
                        "--dataset-path",
                        str(text),
                        "--checkpoint-dir",
                        ".",
                        *NODE_ARGS,
                    ),
                )  # fmt: skip
            )
            found = procs.wait_for(name, r"listening node_id=([0-9a-f]{64}) .*?ticket=(\S+)")
            ids.append(found.group(1))
            tickets.append(found.group(2))
        assert ids[0] != ids[1]
        procs.start(
            "coord",
            _drift(
                "train", "--peers", ",".join(tickets), "--epochs", "1",
                "--port", str(free_udp_port()),
            ),
        )  # fmt: skip
        procs.wait_all()
    finally:
        procs.kill()
    assert f"coordinator key {coordinator}" in procs.log("coord")
    assert procs.log("coord").count("peer.dialled") >= 2
    _assert_all_hold_final(coord_dir, dirs)


def test_nodes_named_by_id_join_without_a_token(tmp_path: Path) -> None:
    text = _text(tmp_path)
    ids = []
    for name in ("a", "b", "stranger"):
        r = _run(_drift("id", "--key-file", str(tmp_path / f"{name}.key")), cwd=tmp_path)
        assert r.returncode == 0, r.stderr
        ids.append(r.stdout.strip())
    port = free_udp_port()
    procs = Procs(tmp_path)
    try:
        # The seed's line: peers named by id, no token (and a port of this test's own).
        coord_dir = procs.start(
            "coord", _drift("train", "--peers", f"{ids[0]},{ids[1]}", "--epochs", "1",
                            "--port", str(port))
        )  # fmt: skip
        coordinator = procs.wait_for("coord", r"coordinator key ([0-9a-f]{64})").group(1)
        at = f"{coordinator}@127.0.0.1:{port}"
        # A key that is not listed is refused; a listed one is let in (here: to look).
        r = _run(_drift("status", "--peer", at, "--key-file", str(tmp_path / "stranger.key")),
                 cwd=tmp_path)  # fmt: skip
        assert r.returncode == 1, (r.stdout, r.stderr)
        assert "is not on this coordinator's --peers list" in r.stderr, r.stderr
        r = _run(_drift("status", "--peer", at, "--key-file", str(tmp_path / "a.key"), "--json"),
                 cwd=tmp_path)  # fmt: skip
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert json.loads(r.stdout)["state"] == "waiting"
        dirs = [
            procs.start(
                name,
                _drift(
                    "train",
                    "--peer",
                    at,
                    "--key-file",
                    str(tmp_path / f"{name}.key"),
                    "--name",
                    name,
                    "--dataset-path",
                    str(text),
                    "--checkpoint-dir",
                    ".",
                    *NODE_ARGS,
                ),
            )  # fmt: skip
            for name in ("a", "b")
        ]
        procs.wait_all()
    finally:
        procs.kill()
    _assert_all_hold_final(coord_dir, dirs)
