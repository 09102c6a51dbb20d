"""End to end through the command lines: a real coordinator process and two real node
processes on loopback, one started as a plain LightningCLI program with a YAML config
(``python examples/cli.py fit --config tests/e2e/tiny.yaml``, token in ``DRIFT_TOKEN``), the
other with ``drift join``. Both must finish on exactly the coordinator's final checkpoint.

Each node runs in its own folder: the YAML's ModelCheckpoint writes ``checkpoints/last.ckpt``
relative to it, and the test compares that file's state dict with the coordinator's last
``round-NNNNNN.safetensors`` tensor by tensor.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from lightning_drift_cli.local import LocalCoordinator
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "e2e" / "tiny.yaml"
CLI = REPO / "examples" / "cli.py"
NODE_TIMEOUT = 240.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]


def _env(**extra: str) -> dict[str, str]:
    """The test's environment without any DRIFT_TOKEN of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if k != "DRIFT_TOKEN"}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Nodes:
    """Node processes started in their own folders, each logging to ``<folder>.log``."""

    def __init__(self, tmp: Path, coord: LocalCoordinator) -> None:
        self.tmp = tmp
        self.coord = coord
        self.procs: dict[str, subprocess.Popen[bytes]] = {}

    def start(self, name: str, cmd: list[str], env: dict[str, str]) -> Path:
        folder = self.tmp / name
        folder.mkdir()
        log = open(self.tmp / f"{name}.log", "wb")
        self.procs[name] = subprocess.Popen(
            cmd, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT
        )
        return folder

    def log(self, name: str, chars: int = 4000) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-chars:]

    def wait_all(self) -> None:
        """Every node exits 0 within NODE_TIMEOUT. The first one to fail fails the test at
        once with its log (the others would only wait for it at the start-up barrier)."""
        deadline = time.monotonic() + NODE_TIMEOUT
        try:
            while True:
                codes = {name: proc.poll() for name, proc in self.procs.items()}
                for name, code in codes.items():
                    assert code in (None, 0), (
                        f"node {name} exited {code}; its log:\n{self.log(name)}\n"
                        f"coordinator:\n{self.coord.log_tail()}"
                    )
                running = [name for name, code in codes.items() if code is None]
                if not running:
                    return
                if time.monotonic() > deadline:
                    logs = "\n".join(f"--- {n}:\n{self.log(n, 2500)}" for n in running)
                    raise AssertionError(
                        f"node(s) {running} did not finish within {NODE_TIMEOUT:.0f} s:\n"
                        f"{logs}\ncoordinator:\n{self.coord.log_tail()}"
                    )
                time.sleep(0.2)
        finally:
            self.kill()

    def kill(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=30)


def _drift(*args: str) -> list[str]:
    return [sys.executable, "-m", "lightning_drift_cli.drift", *args]


def _final_state(folder: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """The state dict and the ``drift`` record of the node's ``checkpoints/last.ckpt``."""
    path = folder / "checkpoints" / "last.ckpt"
    assert path.is_file(), f"no {path}; the folder holds {sorted(map(str, folder.rglob('*')))}"
    # Our own file, written by Lightning: it holds more than tensors (loops, callbacks).
    ckpt = torch.load(str(path), map_location="cpu", weights_only=False)
    return ckpt["state_dict"], ckpt.get("drift", {})


def _assert_all_hold_final(coord: LocalCoordinator, folders: dict[str, Path]) -> dict:
    """Every node's last checkpoint is the coordinator's final one, bit for bit."""
    assert coord.wait(timeout=60) == 0, coord.log_tail()
    final_path = coord.latest_checkpoint()
    final = load_file(str(final_path))
    final_round = int(final_path.name.split("-")[1].split(".")[0])
    manifest = coord.manifest()
    entry = next(c for c in manifest["checkpoints"] if c["round"] == final_round)
    assert final_round == max(c["round"] for c in manifest["checkpoints"])
    sessions = set()
    for name, folder in folders.items():
        state, drift = _final_state(folder)
        assert state.keys() == final.keys(), (name, sorted(state), sorted(final))
        for k, ref in final.items():
            assert state[k].dtype == ref.dtype, (name, k)
            assert torch.equal(state[k], ref), f"node {name}: {k} differs from {final_path.name}"
        assert drift.get("round") == final_round, (name, drift)
        sessions.add(drift.get("session"))
    assert len(sessions) == 1 and "" not in sessions, sessions
    # Both nodes contributed to the last round.
    assert len(entry["contributors"]) == len(folders), entry
    return entry


def _metrics(folder: Path) -> list[dict[str, str]]:
    """Rows of the node's CSVLogger file (tests/e2e/tiny.yaml writes logs/metrics.csv)."""
    path = folder / "logs" / "metrics.csv"
    assert path.is_file(), f"no {path}"
    with path.open() as f:
        return list(csv.DictReader(f))


def _assert_learned_and_covered(folders: dict[str, Path], samples: int, epochs: int) -> None:
    """Validation loss falls on every node; each epoch's shards add up to the dataset."""
    shard_sizes: dict[int, list[float]] = {}
    for name, folder in folders.items():
        rows = _metrics(folder)
        val = [float(r["val_loss"]) for r in rows if r.get("val_loss")]
        assert len(val) == epochs and val[-1] < val[0], (name, val)
        for r in rows:
            if r.get("drift/shard_size"):
                shard_sizes.setdefault(int(float(r["drift/epoch"])), []).append(
                    float(r["drift/shard_size"])
                )
    assert sorted(shard_sizes) == list(range(epochs)), shard_sizes
    for epoch, sizes in shard_sizes.items():
        assert len(sizes) == len(folders) and sum(sizes) == samples, (epoch, sizes)


def test_lightning_cli_and_drift_join_end_on_the_final_checkpoint(tmp_path: Path) -> None:
    """Node A: a plain LightningCLI program; node B: ``drift join --config``; same YAML."""
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=2, epochs=2, batch_size=16, sync_every=4
    ) as coord:
        nodes = Nodes(tmp_path, coord)
        lightning_cli = [sys.executable, str(CLI), "fit", "--config", str(TINY)]
        try:
            a = nodes.start(
                "a",
                [*lightning_cli, "--trainer.strategy.init_args.name", "cli-node"],
                _env(DRIFT_TOKEN=coord.token),
            )
            b = nodes.start(
                "b", _drift("join", "--token", coord.token, "--config", str(TINY)), _env()
            )
            nodes.wait_all()
        finally:
            nodes.kill()
        entry = _assert_all_hold_final(coord, {"a": a, "b": b})
    assert entry["epoch"] == 1  # the second (last) epoch of the session
    _assert_learned_and_covered({"a": a, "b": b}, samples=256, epochs=2)
    # Not on a terminal, `drift-coord serve` shows its view as plain key=value lines.
    view = coord.log_path.read_text()
    assert "state=waiting" in view and " device=cpu " in view, view[-3000:]


def test_drift_join_without_config_takes_the_coordinators(tmp_path: Path) -> None:
    """``drift-coord serve --config`` with a ``coordinator:`` mapping plus a LightningCLI part:
    ``drift join --token T`` alone trains that config, and the session's epochs win over the
    trainer's ``max_epochs``."""
    config = yaml.safe_load(TINY.read_text())
    config["trainer"]["max_epochs"] = 1  # the coordinator's epochs: 2 must win
    config = {
        "coordinator": {"min_nodes": 2, "epochs": 2, "batch_size": 16, "sync_every": 4},
        **config,
    }
    path = tmp_path / "session.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    with LocalCoordinator(tmp_path / "coord", config=path) as coord:
        nodes = Nodes(tmp_path, coord)
        try:
            folders = {
                name: nodes.start(name, _drift("join", "--token", coord.token), _env())
                for name in ("a", "b")
            }
            nodes.wait_all()
        finally:
            nodes.kill()
        entry = _assert_all_hold_final(coord, folders)
    assert entry["epoch"] == 1  # two epochs were trained, as the coordinator's config says


def _files_holding(folder: Path, secret: str) -> list[str]:
    """Every file under ``folder`` whose bytes contain ``secret``."""
    needle = secret.encode()
    return [str(p) for p in folder.rglob("*") if p.is_file() and needle in p.read_bytes()]


def test_the_token_is_written_nowhere(tmp_path: Path) -> None:
    """Node A: a LightningCLI program whose YAML holds the token (SaveConfigCallback on);
    node B: ``drift join --token T``. Both end on the final checkpoint, and no file under
    either node's folder and none of their output holds the token: the saved config.yaml
    masks it, and LightningCLI does not echo drift's own arguments."""
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=2, epochs=1, batch_size=16, sync_every=4
    ) as coord:
        token = coord.token
        config = yaml.safe_load(TINY.read_text())
        config["trainer"]["strategy"]["init_args"]["token"] = token
        with_token = tmp_path / "secret.yaml"  # the user's own file, outside the run folders
        with_token.write_text(yaml.safe_dump(config, sort_keys=False))
        nodes = Nodes(tmp_path, coord)
        try:
            a = nodes.start(
                "a", [sys.executable, str(CLI), "fit", "--config", str(with_token)], _env()
            )
            b = nodes.start("b", _drift("join", "--token", token, "--config", str(TINY)), _env())
            nodes.wait_all()
        finally:
            nodes.kill()
        _assert_all_hold_final(coord, {"a": a, "b": b})
    saved = a / "logs" / "config.yaml"
    assert saved.is_file(), sorted(map(str, a.rglob("*")))
    assert "token: '**********'" in saved.read_text()
    for name, folder in (("a", a), ("b", b)):
        assert _files_holding(folder, token) == [], name
        assert token not in (tmp_path / f"{name}.log").read_text(errors="replace"), name
