"""``drift`` node commands: expected errors as one line, ``drift join``'s temporary config,
the ``--model-path`` warning, ``drift status`` plus ``drift train --model-path`` against a
real coordinator on loopback, and ``drift demo`` (what ``make demo`` runs) to its end."""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning_drift_cli.local import LocalCoordinator
from safetensors.torch import load_file, save_file

from lightning_drift import protocol as p
from lightning_drift.auth import TOKEN_ENV

REPO = Path(__file__).resolve().parents[1]


def _env() -> dict[str, str]:
    """The caller's environment without its DRIFT_* settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRIFT_")}
    env["PYTHONUNBUFFERED"] = "1"
    return env


def _drift(*args: str, cwd: Path, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "lightning_drift_cli.drift", *args],
        cwd=cwd,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# -- expected errors -------------------------------------------------------------------------------


def test_bad_token_ends_in_one_error_line_not_a_traceback(tmp_path: Path) -> None:
    r = _drift("train", "--token", "eyJbogus", "--checkpoint-dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "error: malformed token" in r.stderr, r.stderr
    assert "Traceback" not in r.stderr + r.stdout
    assert "AuthError" not in r.stderr + r.stdout


def test_verbose_keeps_the_traceback(tmp_path: Path) -> None:
    r = _drift("status", "--token", "eyJbogus", "-v", cwd=tmp_path)
    assert r.returncode != 0
    assert "AuthError" in r.stderr and "malformed token" in r.stderr, r.stderr
    assert "error: malformed token" not in r.stderr


def test_drift_log_debug_shows_debug_logs_and_the_traceback(tmp_path: Path) -> None:
    quiet = _drift("status", "--token", "eyJbogus", cwd=tmp_path)
    assert "DEBUG" not in quiet.stderr and "Traceback" not in quiet.stderr
    env = {**_env(), "DRIFT_LOG": "debug"}
    r = subprocess.run(
        [sys.executable, "-m", "lightning_drift_cli.drift", "status", "--token", "eyJbogus"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode != 0
    assert "DEBUG lightning_drift.transport write_path status=" in r.stderr, r.stderr
    assert "AuthError" in r.stderr and "malformed token" in r.stderr


# -- drift-node ------------------------------------------------------------------------------------


def test_drift_node_is_installed_and_is_the_node_side_of_drift(tmp_path: Path) -> None:
    script = Path(sys.executable).parent / "drift-node"
    assert script.is_file(), f"{script}: run `make install` (pip install -e .)"
    r = subprocess.run(
        [str(script)], cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0, (r.stdout, r.stderr)  # a bare command shows its help
    commands = {line.split()[1] for line in r.stdout.splitlines() if line.startswith("│ ")}
    assert {"join", "train", "status", "id"} <= commands and "coord" not in commands, r.stdout
    key = tmp_path / "node.key"
    ids = {
        subprocess.run(
            [*cmd, "id", "--key-file", str(key)], env=_env(), capture_output=True, text=True,
            timeout=60,
        ).stdout.strip()
        for cmd in ([str(script)], [sys.executable, "-m", "lightning_drift_cli.drift"])
    }  # fmt: skip
    assert len(ids) == 1 and len(ids.pop()) == 64  # one key file, one id, either command
    assert oct(key.stat().st_mode & 0o777) == oct(0o600)


# -- how a node names its coordinator -------------------------------------------------------------

KEY = "ab" * 32


@pytest.mark.parametrize(
    "args, message",
    [
        (["train", "--peers", KEY, "--d-model", "8"], "--d-model is a node's option"),
        (["train", "--peers", KEY, "--token", "eyJx"], "--token is a node's option"),
        (["train", "--peers", "4e110"], "is not an endpoint id"),
        (["train", "--port", "7842"], "--port is the coordinator's, with --peers"),
        (["train", "--listen="], "add --peer COORDINATOR_ID"),
        (["join", "--listen=", "--peer", KEY, "--token", "eyJx"], "needs no token"),
        (["train"], "no token: pass --token or set DRIFT_TOKEN"),
    ],
)
def test_flags_that_do_not_go_together_are_usage_errors(monkeypatch, args, message):
    from lightning_drift_cli import drift
    from typer.testing import CliRunner

    monkeypatch.delenv(TOKEN_ENV, raising=False)
    r = CliRunner().invoke(drift.app, args, env={"COLUMNS": "400"})
    assert r.exit_code == 2, r.output
    assert message in " ".join(r.output.split()), r.output


def test_a_malformed_peer_is_one_error_line(tmp_path: Path) -> None:
    r = _drift("train", "--peer", "4e110", "--checkpoint-dir", str(tmp_path), cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert "error: peer '4e110' is not an endpoint id (64 hex characters)" in r.stderr


# -- drift train --resume ----------------------------------------------------------------------


def test_resume_without_a_value_means_the_checkpoint_dirs_last_ckpt(tmp_path: Path) -> None:
    from lightning_drift_cli.common import bare_options
    from lightning_drift_cli.nodecmds import resume_path

    opts = ("--resume",)
    assert bare_options(["train", "--resume"], opts) == ["train", "--resume="]
    assert bare_options(["train", "--resume", "--epochs", "3"], opts)[1] == "--resume="
    assert bare_options(["train", "--resume", "a.ckpt"], opts) == ["train", "--resume", "a.ckpt"]
    assert bare_options(["train", "--name", "x"], opts) == ["train", "--name", "x"]

    (tmp_path / "last.ckpt").write_bytes(b"x")
    (tmp_path / "epoch=1.ckpt").write_bytes(b"x")
    assert resume_path(None, tmp_path) is None
    assert resume_path("", tmp_path) == tmp_path / "last.ckpt"
    assert resume_path(str(tmp_path / "epoch=1.ckpt"), tmp_path) == tmp_path / "epoch=1.ckpt"


def test_resume_with_no_checkpoint_to_resume_is_one_clear_error(tmp_path: Path) -> None:
    from lightning_drift.auth import Identity, issue_token

    token = issue_token(Identity.generate(), session="s", coordinator="t", now=time.time())
    empty = tmp_path / "never-trained"
    r = _drift("train", "--token", token, "--checkpoint-dir", str(empty), "--resume", cwd=tmp_path)
    assert r.returncode == 1, (r.stdout, r.stderr)
    assert f"error: --resume: {empty / 'last.ckpt'} does not exist" in r.stderr, r.stderr
    assert "--checkpoint-dir" in r.stderr and "Traceback" not in r.stderr


# -- drift join's temporary config -----------------------------------------------------------------


def test_join_deletes_the_fetched_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from lightning_drift_cli import nodecmds
    from lightning_drift_cli.common import NodeLink

    import lightning_drift.auth

    monkeypatch.setattr(lightning_drift.auth, "decode_token", lambda token: (None, b"", b""))
    # join() sets the variable for LightningCLI; setenv (not delenv) so that it is undone.
    monkeypatch.setenv(TOKEN_ENV, "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    status = p.SessionStatus(
        session_id="s", state="waiting", round=0, epoch=0, epochs=1, lightning_config="a: 1\n"
    )
    monkeypatch.setattr(nodecmds, "fetch_status", lambda *a, **k: status)
    seen: list[Path] = []

    def run(config: Path, link: object) -> int:
        assert config.read_text() == "a: 1\n"
        seen.append(config)
        if len(seen) == 2:
            raise RuntimeError("training failed")
        return 0

    monkeypatch.setattr(nodecmds, "run_lightning_cli", run)
    assert nodecmds.join(NodeLink(token="t"), None) == 0
    with pytest.raises(RuntimeError):
        nodecmds.join(NodeLink(token="t"), None)
    assert len(seen) == 2
    assert not any(path.exists() for path in seen)


def test_join_trains_the_example_when_no_config_is_named_anywhere(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`drift coord --port 7842` then `drift join --token T`, as the seed types them: the
    coordinator has no LightningCLI config to hand out, so the node trains the example."""
    from lightning_drift_cli import nodecmds
    from lightning_drift_cli.common import NodeLink

    import lightning_drift.auth

    monkeypatch.setattr(lightning_drift.auth, "decode_token", lambda token: (None, b"", b""))
    monkeypatch.setenv(TOKEN_ENV, "")
    monkeypatch.setattr(sys, "path", list(sys.path))
    status = p.SessionStatus(session_id="s", state="waiting", round=0, epoch=0, epochs=10)
    monkeypatch.setattr(nodecmds, "fetch_status", lambda *a, **k: status)
    seen: list[str] = []
    monkeypatch.setattr(
        nodecmds, "run_lightning_cli", lambda config, link: seen.append(config.read_text()) or 0
    )
    assert nodecmds.join(NodeLink(token="t"), None) == 0
    assert "lightning_drift_examples.charlm.CharLM" in seen[0]
    assert "lightning_drift.DriftStrategy" in seen[0]
    assert "training the example char-level model" in capsys.readouterr().err


# -- --model-path ----------------------------------------------------------------------------------


def test_model_path_warning_only_when_round_0_did_not_take_our_weights(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from lightning_drift_cli.nodecmds import warn_model_path_unused

    w = Path("w.safetensors")
    assert not warn_model_path_unused(w, [])
    assert not warn_model_path_unused(w, [{"round": 0, "contributed": True}])
    assert capsys.readouterr().err == ""
    assert warn_model_path_unused(w, [{"round": 0, "contributed": False}, {"round": 1}])
    err = capsys.readouterr().err
    assert err.startswith("warning: --model-path w.safetensors was not used")
    assert "already had weights" in err


# -- against a running coordinator ----------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_status_then_train_with_model_path_seeds_round_0(tmp_path: Path) -> None:
    """``drift status`` with the node token (dialled by address) sees the waiting session; then
    the only node, ``drift train --model-path W``, seeds round 0 with W and exits 0."""
    from lightning_drift_examples.charlm import CharLM

    text = tmp_path / "text.txt"
    text.write_bytes(bytes(range(32, 127)) * 80)  # 7600 bytes: 213 training windows of 32, 3 rounds
    torch.manual_seed(1234)
    weights = tmp_path / "w.safetensors"
    save_file(
        {
            k: v.contiguous()
            for k, v in CharLM(d_model=16, n_layers=1, block_size=32).state_dict().items()
        },
        str(weights),
    )
    with LocalCoordinator(
        tmp_path / "coord", min_nodes=1, epochs=1, batch_size=16, sync_every=4, keep=50
    ) as coord:
        addr = f"127.0.0.1:{coord.port}"
        r = _drift(
            "status", "--token", coord.token, "--json", "--coordinator-addr", addr, cwd=tmp_path
        )
        assert r.returncode == 0, (r.stdout, r.stderr)
        st = json.loads(r.stdout)
        session = json.loads((coord.state_dir / "coordinator.json").read_text())["session"]
        assert st["session_id"] == session
        assert st["state"] == "waiting" and st["nodes"] == [] and st["round"] == 0
        assert st["epochs"] == 1 and st["aggregation"] == "mean"

        r = _drift(
            "train", "--token", coord.token, "--coordinator-addr", addr,
            "--model-path", str(weights), "--dataset-path", str(text),
            "--max-chars", "7600", "--d-model", "16", "--n-layers", "1", "--block-size", "32",
            "--batch-size", "16", "--epochs", "1", "--device", "cpu", "--no-progress",
            "--checkpoint-dir", str(tmp_path / "node"), "--name", "seed-node",
            cwd=tmp_path, timeout=90,
        )  # fmt: skip
        assert r.returncode == 0, f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}\n{coord.log_tail()}"
        assert "was not used" not in r.stderr  # the only node: its weights were adopted
        assert coord.wait(timeout=30) == 0, coord.log_tail()

    round0 = load_file(str(coord.checkpoint_dir / "round-000000.safetensors"))
    expected = load_file(str(weights))
    assert round0.keys() == expected.keys()
    for k, v in expected.items():
        assert torch.equal(round0[k], v), k
    assert (tmp_path / "node" / "last.ckpt").is_file()


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_drift_status_without_arguments_finds_the_session(tmp_path: Path) -> None:
    """As `drift-coord status` does: ./drift-state/observer.token on the coordinator's
    machine; on a node's, the token its last `drift join` (the seed's `--join`) ran with."""
    with LocalCoordinator(tmp_path / "coord", min_nodes=1, epochs=1) as coord:
        session = json.loads((coord.state_dir / "coordinator.json").read_text())["session"]
        node_machine = tmp_path / "node-machine"
        node_machine.mkdir()
        r = _drift("status", cwd=node_machine)
        assert r.returncode == 2, (r.stdout, r.stderr)
        assert "no token" in r.stderr and "observer.token" in r.stderr, r.stderr

        coord_machine = tmp_path / "coord-machine"
        coord_machine.mkdir()
        (coord_machine / "drift-state").symlink_to(coord.state_dir)
        r = _drift("status", "--json", cwd=coord_machine)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert json.loads(r.stdout)["session_id"] == session

        r = _drift("join", "--join", coord.token, "--config", "missing.yaml", cwd=node_machine)
        assert r.returncode == 1 and "missing.yaml does not exist" in r.stderr, r.stderr
        remembered = Path(os.environ["XDG_STATE_HOME"]) / "lightning-drift" / "last.token"
        assert remembered.read_text().strip() == coord.token
        assert stat.S_IMODE(remembered.stat().st_mode) == 0o600
        r = _drift("status", "--json", cwd=node_machine)
        assert r.returncode == 0, (r.stdout, r.stderr)
        assert json.loads(r.stdout)["session_id"] == session


@pytest.mark.slow
def test_demo_runs_to_the_end_and_names_a_checkpoint_that_matches_its_manifest(
    tmp_path: Path,
) -> None:
    # `make demo` is `drift demo --nodes 2`: here with one short epoch. Not on a terminal, so
    # the view prints plain lines; one names the final coordinated checkpoint. Then the demo
    # shows what was learned (the loss per round, the final validation loss next to the
    # initial one, a sample), and the coordinator's CSV and TensorBoard logs of the run hold
    # one row / one point per completed round, read back with each logger's own reader.
    work = tmp_path / "demo"
    cmd = [sys.executable, "-m", "lightning_drift_cli.drift", "demo", "--nodes", "2"]
    cmd += ["--epochs", "1", "--max-chars", "40000", "--sync-every", "2", "--workdir", str(work)]
    env = {**_env(), "COLUMNS": "400"}  # one line per message: rich wraps at the width
    out = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    named = [line for line in out.stdout.splitlines() if "final coordinated checkpoint: " in line]
    assert named, out.stdout[-2000:]
    final = Path(named[-1].rsplit("final coordinated checkpoint: ", 1)[1].strip())
    assert final.is_file(), named
    manifest = json.loads((final.parent / "manifest.json").read_text())
    entry = next(c for c in manifest["checkpoints"] if c["file"] == final.name)
    assert hashlib.sha256(final.read_bytes()).hexdigest() == entry["sha256"]
    assert entry["round"] == max(c["round"] for c in manifest["checkpoints"]) >= 1
    # Both nodes trained together (a round may leave a straggler behind at its deadline).
    assert any(len(c["contributors"]) == 2 for c in manifest["checkpoints"]), manifest

    # What the two processes learned together, as the demo shows it.
    text = out.stdout
    rounds = sorted(c["round"] for c in manifest["checkpoints"] if c["round"] > 0)
    assert rounds == list(range(1, rounds[-1] + 1)), rounds
    # (the live lines come from status polls, so a short round may be skipped there)
    assert re.search(r"round +[1-9]\d* · epoch 1/1 · loss \d", text), text[-3000:]
    per_round = re.search(r"loss per round \(round:loss, from .*?\): ((?:\d+:\d+\.\d+ *)+)", text)
    assert per_round, text[-3000:]
    assert [int(c.split(":")[0]) for c in per_round[1].split()] == rounds
    m = re.search(r"validation loss: initial (\d+\.\d+) \(round 0\) → final (\d+\.\d+)", text)
    assert m, text[-3000:]
    assert float(m[2]) < float(m[1])
    sample = text.split("sample from the final checkpoint:", 1)[1].lstrip("\n")
    assert sample.startswith("def ") and len(sample.strip()) > 40, sample

    logs = final.parent / "logs"
    (metrics,) = logs.glob("csv/session-*/version_0/metrics.csv")
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("round/loss")]
    assert [int(r["step"]) for r in rows] == rounds
    assert any(float(r["round/nodes"]) == 2 for r in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = {q.parent for q in logs.glob("tensorboard/session-*/version_0/events.*")}
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [q.step for q in acc.Scalars("round/loss")] == rounds
    assert [q.step for q in acc.Scalars("round/samples")] == rounds
