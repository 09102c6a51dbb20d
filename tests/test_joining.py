"""Joining without a coordinator: the way in is checked before anything touches the network,
and a join takes the session's settings and holds the start-up sync against a stand-in
runtime that answers at once with the session's round-0 weights."""

from __future__ import annotations

import logging
from concurrent.futures import Future
from dataclasses import dataclass

import pytest
import torch
from support import Loop

from lightning_drift.aggregate import to_bytes
from lightning_drift.errors import ConfigError
from lightning_drift.fsutil import sha256_bytes
from lightning_drift.node.joining import Joining, Shape, Way, ways_in
from lightning_drift.node.pace import PaceMeter
from lightning_drift.node.runtime import Delivery
from lightning_drift.protocol import BarrierReady, NodeInfo, TrainConfig

TOKEN = "eyJ-a-token"


def config(**kw) -> TrainConfig:
    fields = dict(
        session_id="sess", epochs=2, batch_size=8, sync_every=50, aggregation="mean",
        outer_lr=0.7, outer_momentum=0.9, transfer_dtype="float32", seed=0, dataset_size=100,
        round=0, epoch=0, heartbeat_s=5.0, progress_every_s=2.5, has_weights=False,
        min_nodes=1, lightning_config="", overlap=True,
    )  # fmt: skip
    return TrainConfig(**{**fields, **kw})


class Runtime:
    """Joins with ``session``'s settings and answers every barrier with ``glob`` at once."""

    def __init__(self, info, session: TrainConfig, glob: dict[str, torch.Tensor]) -> None:
        self.info, self.session, self.glob = info, session, glob
        self.node_key = "ab" * 32
        self.uploads: list = []
        self.closed: str | None = None
        self.bytes_sent = self.bytes_received = 0

    def hold(self, held, table) -> None:
        self.held, self.table = held, table

    def start(self) -> TrainConfig:
        assert isinstance(self.info(), NodeInfo)
        return self.session

    def hand_off(self, prepare, receive) -> Future:
        sync, payload = prepare()
        self.uploads.append((sync, payload))
        blob = to_bytes(self.glob)
        ready = BarrierReady(round=sync.round, sha256=sha256_bytes(blob))
        fut: Future = Future()
        fut.set_result(Delivery(sync, payload, ready, blob, receive(ready, blob)))
        return fut

    def replan(self):
        return None

    def close(self, reason: str) -> None:
        self.closed = reason


@dataclass(frozen=True)
class StandIn(Way):
    session: TrainConfig | None = None

    def runtime(self, info):  # type: ignore[override]
        glob = {"weight": torch.full((2, 3), 5.0), "bias": torch.zeros(2)}
        return Runtime(info, self.session or config(), glob)


def joined(session: TrainConfig, **kw) -> tuple[Joining, object, torch.nn.Linear, Loop]:
    joining = Joining(StandIn(TOKEN, "node", session=session), PaceMeter(), **kw)
    module, loop = torch.nn.Linear(3, 2), Loop()
    work = joining.join(module, loop, torch.device("cpu"), Shape(100, 4, 8), "", [])
    return joining, work, module, loop


def test_a_join_takes_the_sessions_settings_and_starts_from_its_weights():
    joining, work, module, _ = joined(config(progress_every_s=2.5, overlap=False))
    assert joining.config is not None and joining.config.session_id == "sess"
    assert joining.node_key == "ab" * 32 and joining.base_round == 0
    assert work.overlap is False and joining.meter.progress_every == 2.5
    assert torch.equal(module.weight, torch.full((2, 3), 5.0))  # the session's round 0
    assert [r.round for r in work.history] == [0]
    assert joining.runtime.uploads[0][0].round == 0  # the start-up sync
    assert joining.checkpoint_entry()["round"] == 0
    assert joining.checkpoint_entry()["session"] == "sess"


def test_the_nodes_own_settings_win_over_the_sessions():
    joining, work, _, _ = joined(config(overlap=False), overlap=True, progress_every=9.0)
    assert work.overlap is True and joining.meter.progress_every == 5.0  # the meter's own


def test_a_checkpoint_of_another_session_is_named_and_max_epochs_followed(caplog):
    class Overrides(Loop):
        def keep_fitting(self, epochs: int) -> int | None:
            return 7

    joining = Joining(StandIn(TOKEN, "node", session=config()), PaceMeter())
    with caplog.at_level(logging.WARNING, logger="lightning_drift.node.joining"):
        joining.join(torch.nn.Linear(3, 2), Overrides(), torch.device("cpu"), Shape(100), "old")
    assert "belongs to session old" in caplog.text
    assert "Trainer(max_epochs=7) is overridden" in caplog.text


def test_closing_drops_the_round_and_says_why():
    joining, _, _, _ = joined(config())
    runtime = joining.runtime
    joining.close("teardown")
    assert runtime.closed == "teardown" and joining.runtime is None
    joining.close("again")  # closing twice is harmless


def test_the_way_in_is_checked_before_anything_joins(monkeypatch):
    for var in ("DRIFT_TOKEN", "DRIFT_TOKEN_FILE"):
        monkeypatch.delenv(var, raising=False)
    assert ways_in(TOKEN, None, None, None, None) == TOKEN
    with pytest.raises(ConfigError, match="invitation token"):
        ways_in(None, None, None, None, None)
    with pytest.raises(ConfigError, match="give peer, and no token"):
        ways_in(TOKEN, None, None, "0.0.0.0:7850", None)
    with pytest.raises(ConfigError, match="mode must be"):
        ways_in(TOKEN, None, None, None, "lan")
