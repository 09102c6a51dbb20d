"""The one token lookup order the strategy and the command line share."""

from __future__ import annotations

import pytest

from lightning_drift.errors import ConfigError
from lightning_drift.node.token import find_token, token_given

TOKEN = "eyJ-a-token"


def test_given_then_the_named_file_then_the_environment_then_fallback_files(tmp_path):
    named, fallback = tmp_path / "node.token", tmp_path / "observer.token"
    named.write_text("eyJ-named\n")
    fallback.write_text("eyJ-fallback\n")
    env = {"DRIFT_TOKEN": "eyJ-env"}
    assert find_token(TOKEN, token_file=str(named), environ=env) == TOKEN
    assert find_token(None, token_file=str(named), environ=env) == "eyJ-named"
    assert find_token(None, environ=env, files=[fallback]) == "eyJ-env"
    assert find_token(None, environ={"DRIFT_TOKEN_FILE": str(named)}) == "eyJ-named"
    assert find_token(None, environ={}, files=[tmp_path / "missing", fallback]) == "eyJ-fallback"
    assert find_token(None, environ={}) is None
    with pytest.raises(ConfigError, match="cannot read the token file"):
        find_token(None, token_file=str(tmp_path / "missing"), environ=env)


def test_a_masked_token_counts_as_none_given():
    assert find_token("**********", environ={"DRIFT_TOKEN": TOKEN}) == TOKEN
    assert not token_given("**********") and not token_given("  ")
    assert token_given(TOKEN) and token_given(None, "some.token")
