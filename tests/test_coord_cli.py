"""drift-coord: option resolution (flags > config file > defaults), token, revoke, status."""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
from pathlib import Path

import pytest
from lightning_drift_cli.coord import app, resolve_serve_options
from lightning_drift_cli.local import free_udp_port
from typer.testing import CliRunner

from lightning_drift.auth import Identity, decode_token, verify_token
from lightning_drift.coordinator.config import OPTIONS, ServeOptions, SessionConfig
from lightning_drift.coordinator.monitor import render_lines, render_table
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.coordinator.state import StateDir
from lightning_drift.errors import ConfigError
from lightning_drift.protocol import NodeStatus, SessionStatus

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(autouse=True)
def _fresh_cwd(tmp_path, monkeypatch):
    # Options without --state-dir read ./drift-state: never the checkout's (e.g. `make demo`'s).
    monkeypatch.chdir(tmp_path)


def test_flags_win_over_config_file_over_defaults(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "coordinator:\n  epochs: 3\n  min_nodes: 2\n  heartbeat-timeout: 7\n"
        "model:\n  class_path: m.Net\ntrainer:\n  max_epochs: 3\n"
    )
    sc, so = resolve_serve_options({"epochs": 5, "port": None}, cfg)
    assert sc.epochs == 5 and sc.min_nodes == 2 and sc.heartbeat_timeout == 7.0
    assert so.port == 7842 and so.mode == "local" and sc.aggregation == "mean"
    assert "class_path: m.Net" in sc.lightning_config
    assert "coordinator" not in sc.lightning_config
    cfg.write_text("coordinator:\n  epoks: 3\n")
    with pytest.raises(ConfigError, match="unknown coordinator option"):
        resolve_serve_options({}, cfg)
    with pytest.raises(ConfigError, match="quorum"):
        resolve_serve_options({"quorum": 1.5}, None)
    assert resolve_serve_options({"min_vram": "8GiB"}, None)[0].min_vram == 8 << 30
    assert resolve_serve_options({"min_vram": "512M"}, None)[0].min_vram == 512 << 20
    assert resolve_serve_options({"min_vram": "1000"}, None)[0].min_vram == 1000
    assert resolve_serve_options({}, None)[0].min_vram == 0
    for bad in ("lots", "nan", "inf", "-1G"):
        with pytest.raises(ConfigError, match="min_vram|size"):
            resolve_serve_options({"min_vram": bad}, None)
    with pytest.raises(ConfigError, match="--max-model-mb"):
        resolve_serve_options({"max_model_mb": -1}, None)
    cfg.write_text("coordinator:\n  max-model-mb: 512\n")
    assert resolve_serve_options({}, cfg)[1].max_model_bytes == 512 << 20


def test_the_robustness_options_from_flags_and_the_config_file(tmp_path):
    cfg = tmp_path / "train.yaml"
    cfg.write_text(
        "coordinator:\n  init: w.safetensors\n  robust: median\n  clip: 2\n"
        "  max_nodes: 8\n  max-nodes-per-token: 2\n  forget_after: 10m\n"
        "  min_upload_rate: 64KiB\n"
    )
    sc, so = resolve_serve_options({"max_strikes": 5}, cfg)
    assert so.init == Path("w.safetensors") and so.min_upload_rate == 64 << 10
    assert (sc.robust, sc.clip, sc.max_nodes, sc.max_nodes_per_token) == ("median", 2.0, 8, 2)
    assert sc.forget_after_s == 600.0 and sc.max_strikes == 5
    for flags, message in (
        ({"robust": "mode"}, "--robust must be off or trimmed or median"),
        ({"trim": 0.5}, r"--trim must be in \[0, 0.5\)"),
        ({"clip": -1.0}, "--clip must be 0 or more"),
        ({"max_nodes": 0}, "--max-nodes must be at least 1"),
        ({"max_strikes": 0}, "--max-strikes must be at least 1"),
    ):
        with pytest.raises(ConfigError, match=message):
            resolve_serve_options(flags, None)


def test_the_session_trains_the_configs_max_epochs_unless_told_otherwise(tmp_path):
    assert resolve_serve_options({}, None)[0].epochs == 10  # the table's default
    cfg = tmp_path / "train.yaml"
    cfg.write_text("model:\n  class_path: m.Net\ntrainer:\n  max_epochs: 4\n")
    assert resolve_serve_options({}, cfg)[0].epochs == 4
    assert resolve_serve_options({"epochs": 2}, cfg)[0].epochs == 2  # a flag wins
    cfg.write_text("coordinator:\n  epochs: 3\ntrainer:\n  max_epochs: 4\n")
    assert resolve_serve_options({}, cfg)[0].epochs == 3  # so does the coordinator: mapping
    for no_count in ("-1", "null", "true"):  # "no limit" (or nonsense) is not a session length
        cfg.write_text(f"trainer:\n  max_epochs: {no_count}\n")
        assert resolve_serve_options({}, cfg)[0].epochs == 10, no_count


def test_serve_has_one_flag_per_table_row_and_shows_its_default():
    import inspect

    from lightning_drift_cli.coord import serve

    flags = {s.name for s in OPTIONS if s.where == "flag"}
    assert set(inspect.signature(serve).parameters) == flags | {"config", "verbose"}
    r = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "400"})
    assert r.exit_code == 0, r.output
    lines = {line.split()[1]: line for line in r.output.splitlines() if "--" in line[:8]}
    for s in OPTIONS:
        if s.where == "flag":
            assert f"[default: {s.shown_default}]" in lines[s.flag], s.flag
    assert (
        "[default: 10; with --config, its trainer.max_epochs]" in lines["--epochs"]
        and "[default: 7d]" in lines["--token-ttl"]
    )


def test_the_docs_show_the_defaults_of_the_table():
    rows = {}
    for line in (ROOT / "docs" / "coordinator.md").read_text().splitlines():
        if line.startswith("| `--"):
            flag, default = (c.strip().replace("`", "") for c in line.split("|")[1:3])
            rows[flag.split()[0].split("/")[0]] = default
    for s in OPTIONS:
        if s.where == "flag":
            assert rows.get(s.flag) == s.shown_default, s.flag


def test_token_ttl_from_flag_config_file_and_default(tmp_path):
    assert resolve_serve_options({}, None)[1].token_ttl_s == 7 * 86400
    assert resolve_serve_options({"token_ttl": "24h"}, None)[1].token_ttl_s == 86400
    cfg = tmp_path / "train.yaml"
    cfg.write_text("coordinator:\n  token_ttl: 2h\n")
    assert resolve_serve_options({}, cfg)[1].token_ttl_s == 7200
    with pytest.raises(ConfigError, match="duration"):
        resolve_serve_options({"token_ttl": "soon"}, None)
    # The standing tokens that serve prints get that lifetime.
    _, token = start_and_close(SessionConfig(), ServeOptions(state_dir=tmp_path / "st", port=0,
                                                             token_ttl_s=7200.0))  # fmt: skip
    claims = decode_token(token)[0]
    assert claims.exp - claims.iat == 7200.0


def start_and_close(config: SessionConfig, opts: ServeOptions) -> tuple[str, str]:
    """Start a coordinator (binds, writes the state dir), close it; its ticket and token."""

    async def main():
        coord = Coordinator(config, opts)
        await coord.start()
        await coord.close()
        return coord.ticket, coord.node_token

    return asyncio.run(asyncio.wait_for(main(), 60))


def test_printed_tokens_say_how_to_reach_the_coordinator(tmp_path):
    from lightning_drift.auth import decode_token
    from lightning_drift.coordinator.state import StateDir
    from lightning_drift.node.token import reach

    st = tmp_path / "st"
    _, token = start_and_close(SessionConfig(), ServeOptions(state_dir=st, port=free_udp_port()))
    claims = decode_token(token)[0]
    assert (claims.mode, claims.relays) == ("local", ())
    assert reach(claims, None) == ("local", ())
    # An internet-mode coordinator's token: the node need not say --mode internet again.
    relay = "https://relay.example./"
    sd = StateDir(st)
    internet, _ = sd.issue(
        sd.identity(), session="s", ticket=claims.coordinator, mode="internet", relays=[relay]
    )
    claims = decode_token(internet)[0]
    assert reach(claims, None) == ("internet", (relay,))
    assert reach(claims, "local") == ("local", (relay,))  # the flag stays an override
    assert reach(claims, None, ["https://mine.example./"]) == (
        "internet",
        ("https://mine.example./",),
    )
    # `drift-coord token` issues from coordinator.json: the same claims.
    r = runner.invoke(app, ["token", "--state-dir", str(st)])
    assert r.exit_code == 0, r.output
    assert decode_token(r.stdout.strip().splitlines()[0])[0].mode == "local"


def test_a_restart_with_only_the_state_dir_admits_the_same_peers(tmp_path):
    st, node = tmp_path / "st", "ab" * 32
    start_and_close(SessionConfig(), ServeOptions(state_dir=st, port=0, peers=[node]))
    notes: list[str] = []
    assert resolve_serve_options({"state_dir": st}, None, notes)[1].peers == [node]
    assert f"--peers {node}" in notes[0]
    other = "cd" * 32  # given again: the new list wins
    assert resolve_serve_options({"state_dir": st, "peers": [other]}, None)[1].peers == [other]


def test_a_restart_with_only_the_state_dir_keeps_the_address_and_the_token(tmp_path):
    st = tmp_path / "st"
    port = free_udp_port()
    ticket, token = start_and_close(
        SessionConfig(epochs=3, aggregation="diloco"),
        ServeOptions(state_dir=st, port=port),
    )
    notes: list[str] = []
    resolved = resolve_serve_options({"state_dir": st}, None, notes)
    assert resolved[1].port == port and resolved[1].mode == "local"
    assert notes == [f"restart: from {st / 'coordinator.json'} (not given on the command line "
                     f"or in --config): --port {port}"]  # fmt: skip
    # The same address gives the same ticket, so the token printed before is kept.
    assert start_and_close(*resolved) == (ticket, token)
    # Given options win over the stored ones; the stored bind belongs to the stored mode.
    _, so = resolve_serve_options({"state_dir": st, "port": port + 1}, None)
    assert so.port == port + 1
    _, so = resolve_serve_options({"state_dir": st, "mode": "internet"}, None)
    assert so.mode == "internet" and so.bind is None and so.port == port
    cfg = tmp_path / "train.yaml"
    cfg.write_text("coordinator:\n  port: 9999\n")
    assert resolve_serve_options({"state_dir": st}, cfg)[1].port == 9999
    # A first start (no coordinator in the state dir) uses the built-in defaults.
    assert resolve_serve_options({"state_dir": tmp_path / "new"}, None)[1].port == 7842


def test_a_restart_after_port_0_binds_the_port_the_os_chose(tmp_path):
    st = tmp_path / "st"
    ticket, token = start_and_close(SessionConfig(epochs=1), ServeOptions(state_dir=st, port=0))
    resolved = resolve_serve_options({"state_dir": st}, None)
    assert resolved[1].port != 0  # the stored port is the bound one, not the "any port" asked for
    assert start_and_close(*resolved) == (ticket, token)


def test_stored_relays_belong_to_the_stored_mode(tmp_path):
    st = tmp_path / "st"
    st.mkdir()
    (st / "coordinator.json").write_text(
        '{"port": 7000, "mode": "internet", "bind": "0.0.0.0", "relay": ["https://r.example"]}'
    )
    _, so = resolve_serve_options({"state_dir": st}, None)
    assert so.mode == "internet" and so.relay == ["https://r.example"]
    _, so = resolve_serve_options({"state_dir": st, "mode": "local"}, None)
    assert so.relay == [] and so.bind is None and so.port == 7000


def test_a_restart_warns_that_the_saved_session_settings_are_used(tmp_path):
    st = tmp_path / "st"
    start_and_close(
        SessionConfig(epochs=3, aggregation="diloco", lightning_config="model: {}\n"),
        ServeOptions(state_dir=st, port=free_udp_port()),
    )
    notes: list[str] = []
    resolve_serve_options({"state_dir": st, "epochs": 5, "aggregation": "mean"}, None, notes)
    [warning] = [n for n in notes if n.startswith("warning")]
    assert "--aggregation mean (saved: diloco)" in warning and "--epochs 5 (saved: 3)" in warning
    assert "state.json" in warning  # how to start a new session instead
    cfg = tmp_path / "train.yaml"
    cfg.write_text("coordinator:\n  epochs: 3\nmodel:\n  hidden: 8\n")
    notes = []
    resolve_serve_options({"state_dir": st, "aggregation": "diloco"}, cfg, notes)
    [warning] = [n for n in notes if n.startswith("warning")]
    assert (
        "LightningCLI" in warning and "--epochs" not in warning and "--aggregation" not in warning
    )
    notes = []
    resolve_serve_options({"state_dir": st, "epochs": 3}, None, notes)
    assert not [n for n in notes if n.startswith("warning")]


def test_token_and_revoke_commands(tmp_path):
    sd = StateDir(tmp_path)
    ident = sd.identity()
    sd.save_coordinator({"ticket": "t", "session": "s1"})
    r = runner.invoke(app, ["token", "--state-dir", str(tmp_path), "--role", "observer"])
    assert r.exit_code == 0, r.output
    tok = r.stdout.strip().splitlines()[0]
    claims = verify_token(tok, ident.public_key, now=claims_now(), session="s1")
    assert claims.role == "observer" and claims.coordinator == "t"
    r = runner.invoke(app, ["revoke", claims.jti, "--state-dir", str(tmp_path)])
    assert r.exit_code == 0 and claims.jti in sd.tokens().revoked()
    r = runner.invoke(app, ["token", "--state-dir", str(tmp_path / "none")])
    assert r.exit_code == 2


def claims_now() -> float:
    import time

    return time.time()


def test_renderers():
    st = SessionStatus(
        session_id="s",
        state="training",
        round=3,
        epoch=0,
        epochs=2,
        nodes=[NodeStatus(node_id="a" * 64, name="gpu box", device="cuda:0 RTX", share=0.75,
                          samples_per_s=123.4, round=3, state="barrier", barrier_wait_s=1.5,
                          vram_total=8 << 30)],
    )  # fmt: skip
    t = render_table(st)
    assert [c.header for c in t.columns][:3] == ["node", "device", "VRAM"]
    lines = render_lines(st, now=0)
    assert "round=3" in lines[0] and "share=75.0%" in lines[1] and "vram=8.0GiB" in lines[1]


def test_status_command_against_a_running_coordinator(tmp_path):
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]

    async def main():
        coord = Coordinator(
            SessionConfig(dataset_size=10), ServeOptions(state_dir=tmp_path / "st", port=port)
        )
        await coord.start()
        serving = asyncio.create_task(coord.run())
        try:
            p = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "lightning_drift_cli.coord", "status", "--json",
                "--state-dir", str(tmp_path / "st"),
                stdout=asyncio.subprocess.PIPE, cwd=str(ROOT),
            )  # fmt: skip
            out, _ = await asyncio.wait_for(p.communicate(), 60)
            assert p.returncode == 0
            return json.loads(out), coord.session.session_id, coord.ticket
        finally:
            serving.cancel()
            await coord.close()

    doc, sid, ticket = asyncio.run(asyncio.wait_for(main(), 90))
    assert doc["session_id"] == sid and doc["state"] == "waiting" and doc["nodes"] == []
    # serve wrote the standing tokens (0600) and the advertised address.
    st = tmp_path / "st"
    assert (st / "node.token").stat().st_mode & 0o777 == 0o600
    assert json.loads((st / "coordinator.json").read_text())["ticket"] == ticket
    ident = Identity.load_or_create(st)
    c = verify_token((st / "node.token").read_text().strip(), ident.public_key, now=claims_now())
    assert c.role == "node" and c.session == sid


def test_renderers_show_loss_and_vram_used_and_peak():
    st = SessionStatus(
        session_id="s", state="training", round=2, epoch=0, epochs=1,
        nodes=[NodeStatus(node_id="b" * 64, name="[red]box\x1b[2J", device="cuda:0", loss=1.23456,
                          vram_used=3 << 29, vram_peak=2 << 30, stop_asked=True)],
    )  # fmt: skip
    table = render_table(st)
    headers = [c.header for c in table.columns]
    assert "loss" in headers and "VRAM used/peak" in headers
    cells = {h: list(c.cells)[0] for h, c in zip(headers, table.columns, strict=True)}
    assert cells["loss"] == "1.235" and cells["VRAM used/peak"] == "1.5/2.0 GiB"
    assert cells["node"].startswith("\\[red]box [2J")  # markup escaped, control chars gone
    assert "asked to stop" in cells["state"]
    line = render_lines(st, now=0)[1]
    assert "loss=1.235" in line and "vram_used_peak=1.5/2.0GiB" in line
    assert "node=[red]box_[2J" in line and "stop_asked=yes" in line


def test_drift_status_shows_each_nodes_loss_and_vram(tmp_path):
    """A node reports progress; `drift status` (table and JSON) shows its loss and VRAM."""
    from support import node_info, small_model

    from lightning_drift.modelspec import state_fingerprint
    from lightning_drift.node.client import CoordinatorClient
    from lightning_drift.protocol import TrainProgress

    async def main():
        coord = Coordinator(
            SessionConfig(dataset_size=10),
            ServeOptions(state_dir=tmp_path / "st", port=free_udp_port(), logger=["none"]),
        )
        await coord.start()
        serving = asyncio.create_task(coord.run())
        node = await CoordinatorClient.connect(
            coord.node_token,
            node_info=node_info(10, state_fingerprint(small_model())),
            name="gpu-box",
            timeout=10,
        )
        try:
            await node.progress(
                TrainProgress(round=1, epoch=0, step=3, samples=30, loss=0.8125,
                              samples_per_s=50.0, vram_used=1 << 30, vram_peak=3 << 30)
            )  # fmt: skip
            for _ in range(100):
                if coord.session.members[node.node_key].loss is not None:
                    break
                await asyncio.sleep(0.05)
            outs = []
            for extra in (["--json"], []):
                p = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "lightning_drift_cli.drift", "status",
                    "--token", coord.observer_token, *extra,
                    stdout=asyncio.subprocess.PIPE, cwd=str(ROOT),
                    env={**os.environ, "COLUMNS": "250"},
                )  # fmt: skip
                out, _ = await asyncio.wait_for(p.communicate(), 60)
                assert p.returncode == 0
                outs.append(out.decode())
            return outs
        finally:
            await node.close()
            serving.cancel()
            await coord.close()

    as_json, table = asyncio.run(asyncio.wait_for(main(), 120))
    (n,) = json.loads(as_json)["nodes"]
    assert (n["loss"], n["vram_used"], n["vram_peak"]) == (0.8125, 1 << 30, 3 << 30)
    assert "loss" in table and "VRAM used/peak" in table
    assert "0.8125" in table and "1.0/3.0 GiB" in table
