"""What ``drift`` and ``drift-coord`` share: where a token comes from, how loud a command is,
and how an expected error ends a command."""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import typer
from lightning_drift_cli import common

from lightning_drift.auth import TOKEN_ENV
from lightning_drift.errors import AuthError

TOKEN = "eyJ-a-token"


def test_the_flag_wins_then_the_environment_then_the_files(monkeypatch, tmp_path):
    observer = tmp_path / "observer.token"
    observer.write_text("eyJ-from-the-file\n")
    monkeypatch.setenv(TOKEN_ENV, "eyJ-from-the-environment")
    assert common.find_token(TOKEN, files=[observer]) == TOKEN
    assert common.find_token(None, files=[observer]) == "eyJ-from-the-environment"
    monkeypatch.delenv(TOKEN_ENV)
    assert common.find_token(None, files=[tmp_path / "missing", observer]) == "eyJ-from-the-file"
    assert common.find_token(None, files=[tmp_path / "missing"]) is None


def test_the_remembered_token_comes_last_and_only_when_asked_for(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    assert common.find_token(None, remembered=True) is None  # nothing remembered yet
    common.remember_token(f" {TOKEN}\n")
    path = common.remembered_token_path()
    assert path.parent == Path(os.environ["XDG_STATE_HOME"]) / "lightning-drift"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    assert oct(path.parent.stat().st_mode & 0o777) == oct(0o700)
    assert common.find_token(None) is None
    assert common.find_token(None, remembered=True) == TOKEN
    observer = tmp_path / "observer.token"
    observer.write_text("eyJ-observer\n")
    assert common.find_token(None, files=[observer], remembered=True) == "eyJ-observer"
    assert common.status_token(None, tmp_path) == "eyJ-observer"
    monkeypatch.setenv(TOKEN_ENV, "eyJ-env")
    assert common.status_token(None, tmp_path) == "eyJ-env"
    assert common.status_token("eyJ-flag", tmp_path) == "eyJ-flag"


def test_a_flag_or_environment_value_may_name_a_file_holding_the_token(monkeypatch, tmp_path):
    held = tmp_path / "node.token"
    held.write_text(f"  {TOKEN}\n")
    assert common.find_token(str(held)) == TOKEN
    monkeypatch.setenv(TOKEN_ENV, str(held))
    assert common.find_token(None) == TOKEN
    assert common.read_token(f" {TOKEN} ") == TOKEN  # a token is never taken for a path


def test_an_empty_file_is_no_token_and_the_usage_error_says_where_to_get_one(monkeypatch, tmp_path):
    monkeypatch.delenv(TOKEN_ENV, raising=False)
    empty = tmp_path / "observer.token"
    empty.write_text("\n")
    with pytest.raises(typer.BadParameter, match=f"pass --token or set {TOKEN_ENV}.*node.token"):
        common.need_token(None, files=[empty])
    with pytest.raises(typer.BadParameter, match="none in .*observer.token either"):
        common.need_token(None, files=[empty], hint=f"none in {empty} either")


def _levels(verbose: bool, verbosity: str, drift_log: str | None = None) -> str:
    code = (
        "import logging\n"
        "from lightning_drift_cli import common\n"
        f"common.setup_logging({verbose}, common.{verbosity})\n"
        "print(logging.getLevelName(logging.getLogger().level), common.tracebacks_wanted())\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("DRIFT_DEBUG", common.LOG_ENV)}
    if drift_log is not None:
        env[common.LOG_ENV] = drift_log
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_each_command_family_has_its_default_and_v_means_debug_in_all():
    assert _levels(False, "NODE") == "WARNING False"
    assert _levels(False, "COORDINATOR") == "INFO False"
    # -v: debug logs and full tracebacks, whichever command it is given to.
    assert _levels(True, "NODE") == "DEBUG True"
    assert _levels(True, "COORDINATOR") == "DEBUG True"
    assert common.NODE.default == logging.WARNING


def test_drift_log_sets_the_level_of_every_command_and_v_wins():
    assert _levels(False, "NODE", "info") == "INFO False"
    assert _levels(False, "COORDINATOR", "ERROR") == "ERROR False"
    assert _levels(False, "NODE", "debug") == "DEBUG True"
    assert _levels(True, "COORDINATOR", "error") == "DEBUG True"
    assert _levels(False, "COORDINATOR", "") == "INFO False"  # empty: unset


@pytest.mark.parametrize("script", ["drift", "coord"])
def test_a_drift_log_that_names_no_level_is_a_usage_error(script):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    out = subprocess.run(
        [sys.executable, "-m", f"lightning_drift_cli.{script}", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, common.LOG_ENV: "loud"},
    )
    assert out.returncode == 2, (out.stdout, out.stderr)
    assert "DRIFT_LOG='loud' is not a log level: use debug, info, warning, error" in out.stderr


def test_an_expected_error_ends_in_one_line_and_its_exit_code(monkeypatch, capsys):
    monkeypatch.setattr(common, "tracebacks", False)
    with pytest.raises(typer.Exit) as end:
        common.fail(AuthError("token expired; ask for a new one"), 2)
    assert end.value.exit_code == 2
    assert capsys.readouterr().err == "error: token expired; ask for a new one\n"
    monkeypatch.setattr(common, "tracebacks", True)
    with pytest.raises(AuthError, match="expired"):
        common.fail(AuthError("token expired"))


def test_main_turns_an_escaping_drift_error_into_exit_1(monkeypatch, capsys):
    monkeypatch.setattr(common, "tracebacks", False)
    app = typer.Typer()

    @app.command()
    def boom() -> None:
        raise AuthError("the coordinator refused the token")

    @app.command()
    def other() -> None:
        pass

    monkeypatch.setattr(sys, "argv", ["drift", "boom"])
    with pytest.raises(SystemExit) as end:
        common.main(app)
    assert end.value.code == 1
    assert capsys.readouterr().err == "error: the coordinator refused the token\n"
    # The command alone asks for nothing: its help, and success.
    monkeypatch.setattr(sys, "argv", ["drift"])
    with pytest.raises(SystemExit) as end:
        common.main(app)
    assert end.value.code == 0
    assert "boom" in capsys.readouterr().out


def test_coord_status_without_any_token_is_a_usage_error(tmp_path: Path):
    env = {k: v for k, v in os.environ.items() if k != TOKEN_ENV}
    out = subprocess.run(
        [sys.executable, "-m", "lightning_drift_cli.coord", "status", "--state-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={**env, "COLUMNS": "300"},
    )
    assert out.returncode == 2, out.stderr
    assert "no token" in out.stderr and "drift-coord token --role observer" in out.stderr


def _option_blocks(help_text: str) -> dict[str, str]:
    """``--flag`` → the whole (unwrapped) help of that option in a rich ``--help`` panel."""
    blocks: dict[str, str] = {}
    current = None
    for line in help_text.splitlines():
        if re.match(r"│ +-", line):
            current = line.split()[1].split(",")[0]
            blocks[current] = line
        elif current is not None and line.startswith("│"):
            blocks[current] += " " + line.strip("│ ")
        else:
            current = None
    return blocks


def test_every_option_of_every_command_shows_its_effective_default():
    import typer.main
    from lightning_drift_cli import coord, drift, node
    from typer.testing import CliRunner

    runner = CliRunner()
    seen = 0
    for app in (drift.app, coord.app, node.app):
        for name in typer.main.get_command(app).commands:  # type: ignore[attr-defined]
            r = runner.invoke(app, [name, "--help"], env={"COLUMNS": "400"})
            assert r.exit_code == 0, r.output
            for flag, text in _option_blocks(r.output).items():
                seen += 1
                assert flag == "--help" or "[default: " in text, (name, flag, text)
    assert seen > 80  # the panels were read
    r = runner.invoke(drift.app, ["train", "--help"], env={"COLUMNS": "400"})
    blocks = _option_blocks(r.output)
    assert "[default: 10]" in blocks["--epochs"]  # the session's default, from the one table
    assert "[default: the token's mode" in blocks["--mode"]
    assert "CHECKPOINT_DIR/last.ckpt" in blocks["--resume"]
