"""The one table of session settings and serve options: the dataclasses follow it, and every
check refuses a bad value the same way from Python as from a flag or a config file."""

from __future__ import annotations

import re
from dataclasses import fields

import pytest

from lightning_drift.coordinator.config import (
    OPTIONS,
    SETTING,
    SETTINGS,
    ServeOptions,
    SessionConfig,
    build,
    read_option,
)
from lightning_drift.coordinator.server import Coordinator
from lightning_drift.errors import ConfigError


def test_the_dataclasses_have_exactly_the_rows_of_the_table():
    by_scope = {
        scope: {s.field for s in SETTINGS if s.scope == scope} for scope in ("session", "serve")
    }
    assert {f.name for f in fields(SessionConfig)} == by_scope["session"]
    assert {f.name for f in fields(ServeOptions)} == by_scope["serve"]
    assert len({s.name for s in SETTINGS}) == len(SETTINGS)
    # Every default is the table's (state_dir excepted: a library caller names its own).
    sc, so = SessionConfig(), ServeOptions(state_dir=SETTING["state_dir"].default)
    for s in SETTINGS:
        assert getattr(sc if s.scope == "session" else so, s.field) == s.default, s.name


def test_keeping_a_single_checkpoint_is_refused(tmp_path):
    # A crash between a round's checkpoint and the state file resumes from the previous
    # checkpoint, so it must still be there: the CLI's --keep >= 2 holds from Python too.
    with pytest.raises(ConfigError, match="keep must be at least 2"):
        Coordinator(SessionConfig(), ServeOptions(state_dir=tmp_path / "state", keep=1))
    Coordinator(SessionConfig(), ServeOptions(state_dir=tmp_path / "state", keep=2))


@pytest.mark.parametrize(
    "name, value, message",
    [
        ("aggregation", "median", "--aggregation must be mean or diloco, got 'median'"),
        ("transfer_dtype", "float16", "--transfer-dtype must be float32 or bfloat16 or int8"),
        ("quorum", 1.5, r"--quorum must be in \(0, 1\], got 1.5"),
        ("quorum", 0.0, r"--quorum must be in \(0, 1\]"),
        ("heartbeat_timeout", 0.0, "--heartbeat-timeout must be positive"),
        ("mode", "lan", "--mode must be local or internet, got 'lan'"),
        ("keep", 1, "--keep must be at least 2"),
        ("max_model_mb", -1, "--max-model-mb must be 0"),
        ("token_ttl", -5.0, "--token-ttl must be positive"),
    ],
)
def test_each_check_is_made_when_the_config_is(tmp_path, name, value, message):
    s = SETTING[name]
    kw = {s.field: value}
    with pytest.raises(ConfigError, match=message):
        if s.scope == "session":
            SessionConfig(**kw)
        else:
            ServeOptions(state_dir=tmp_path, **kw)


def test_a_restored_config_is_checked_too():
    with pytest.raises(ConfigError, match="--aggregation"):
        SessionConfig.from_dict({"aggregation": "median", "added_later": 1})
    assert SessionConfig.from_dict({"epochs": 4, "added_later": 1}).epochs == 4


def test_options_read_what_people_type_into_the_library_unit():
    assert read_option(SETTING["min_vram"], "8GiB") == 8 << 30
    assert read_option(SETTING["token_ttl"], "2h") == 7200.0
    assert read_option(SETTING["max_model_mb"], "512") == 512 << 20
    assert read_option(SETTING["relay"], "https://r.example") == ["https://r.example"]
    with pytest.raises(ConfigError, match="option epochs='many' is not a int"):
        read_option(SETTING["epochs"], "many")
    assert all(s.where != "code" for s in OPTIONS) and "tick_s" not in {s.name for s in OPTIONS}


def test_build_keeps_several_heartbeats_inside_the_timeout(tmp_path):
    sc, so = build({"state_dir": tmp_path, "heartbeat_timeout": 6.0, "heartbeat_s": 5.0})
    assert sc.heartbeat_s == 2.0 and so.state_dir == tmp_path
    sc, _ = build({"state_dir": tmp_path, "heartbeat_timeout": 60.0})
    assert sc.heartbeat_s == SETTING["heartbeat_s"].default


def test_a_start_gate_that_could_never_open_is_refused():
    with pytest.raises(ConfigError, match="--min-nodes 5 is more than --max-nodes 4"):
        SessionConfig(min_nodes=5, max_nodes=4)
    assert SessionConfig(min_nodes=4, max_nodes=4).min_nodes == 4


@pytest.mark.parametrize(
    "kw, says",
    [
        ({"transfer_dtype": "float32"}, "--transfer-dtype int8, int4, int3, int2, sign"),
        ({"transfer_dtype": "int8", "clip": 2.0}, "--robust trimmed or median"),
        ({"transfer_dtype": "int8", "shards": 0}, "--shards must be in [1, 256]"),
        ({"transfer_dtype": "int8", "shards": 257}, "--shards must be in [1, 256]"),
        ({"transfer_dtype": "int8", "audit_every": -1}, "--audit-every must be at least 0"),
        ({"transfer_dtype": "sign", "download_dtype": "int4"}, "--download-dtype int4 differs"),
    ],
)
def test_a_sharded_data_plane_refuses_what_it_cannot_do_and_says_the_fix(kw, says):
    with pytest.raises(ConfigError, match=re.escape(says)):
        SessionConfig(dataset_size=10, data_plane="sharded", **kw)


def test_a_download_codec_needs_compressed_uploads():
    with pytest.raises(ConfigError, match="with --transfer-dtype float32 the nodes send and get"):
        SessionConfig(download_dtype="int4")
    assert SessionConfig(transfer_dtype="sign", download_dtype="int4").download_dtype == "int4"


def test_a_sharded_data_plane_takes_int8_or_bfloat16():
    for dtype in ("int8", "bfloat16"):
        c = SessionConfig(dataset_size=10, data_plane="sharded", transfer_dtype=dtype, shards=3)
        assert (c.data_plane, c.shards) == ("sharded", 3)
