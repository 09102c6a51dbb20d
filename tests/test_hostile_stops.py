"""Hostile stop requests against a real coordinator over iroh: a node token holder asks to end
the session for everyone.

A key claiming to have reached its ``max_steps`` at the very start, and more keys joined with
the same token asking as if their ``EarlyStopping`` fired: a vote weighs the work its node
delivered, so the honest nodes' session trains all its rounds, and a ``max_steps`` request
only tells its own node to leave. The nodes that did deliver the work can still stop it.
Each test drives the hostile clients by hand (the async ``CoordinatorClient``) next to honest
nodes, as ``tests/test_hostile.py`` does, and checks the checkpoints and the coordinator's log.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest
from test_hostile import (
    coordinator,
    finish,
    honest_finished,
    join,
    logged,
    run,
    scene,
    status,
    until,
)

from lightning_drift.protocol import StopRequest

pytestmark = pytest.mark.slow

EXTRA_KEYS = 5  # keys joined with the honest nodes' token, beside the hostile one
REASON = "reached Trainer(max_steps=1)"  # what the hostile key claims


@pytest.fixture(autouse=True)
def _info_logs(caplog):
    caplog.set_level(logging.INFO, logger="lightning_drift")


def saved_session(tmp_path) -> dict:
    return json.loads((tmp_path / "state" / "state.json").read_text())["session"]


def test_max_steps_and_extra_keys_do_not_end_the_honest_nodes_session(tmp_path, caplog):
    """One key says it reached its max_steps at round 0 (the session's first round open) and
    again at round 1; five more keys under the same token ask to stop. Counted per key they
    were 6 of 8 voters; weighed by delivered work they are nothing: the session trains all
    its rounds and ends by its epochs, every checkpoint verifies and is finite, and the log
    names each node and why its request did not stop the session."""

    async def main():
        coord = coordinator(tmp_path)
        runner, (a, b), tasks, evil, shard = await scene(coord)
        answer = await evil.request_stop(StopRequest(kind="max_steps", reason=REASON))
        assert not answer.stop and answer.leave and answer.round == -1, answer
        assert "it leaves, its work is handed on and the session trains on" in answer.reason
        assert "1 of 3 node(s) asked, having delivered 0 of" in answer.reason
        extra = [await join(coord, f"x{i}") for i in range(EXTRA_KEYS)]
        for c in extra:
            told = await c.request_stop(StopRequest(reason="EarlyStopping"))
            assert not told.stop and not told.leave and "session continues" in told.reason
        await until(lambda: coord.session.completed >= 1, "round 1 completed", timeout=30)
        # The honest nodes have delivered; the hostile keys still have not.
        answer = await evil.request_stop(StopRequest(kind="max_steps", reason=REASON))
        assert not answer.stop and answer.leave and "having delivered 0 of" in answer.reason
        finals = await asyncio.gather(*tasks)
        st = await status(coord)
        assert st.stop_reason == "" and coord.session.stop_round is None
        await finish(coord, runner, a, b, evil, *extra)
        return finals, shard, evil.node_key, [c.node_key for c in extra]

    finals, shard, evil, extra = run(main())
    entries = honest_finished(tmp_path, finals)
    last = shard.first_round + shard.rounds - 1
    assert max(e["round"] for e in entries) == last == 3  # the session's every round
    state = saved_session(tmp_path)
    assert state["finished"] and state["completed"] == last
    assert state["stop"]["round"] is None and state["stop"]["reason"] == "", state["stop"]
    logged(caplog, f"node {evil[:8]} reached its max_steps ({REASON})", "trains on")
    for key in extra:
        logged(caplog, f"node {key[:8]} asked to stop (EarlyStopping)", "session continues")
    logged(caplog, "6 of 8 node(s) asked, having delivered 0 of the live nodes'", "quorum 0.5")


def test_the_nodes_that_delivered_the_work_can_still_stop_it(tmp_path, caplog):
    """The same hostile keys ask first; then the two honest nodes, which delivered all the
    work, ask too: at a quorum of 0.75 one honest node is not enough, both are, and the
    session stops on the round open then, before its last."""

    async def main():
        coord = coordinator(tmp_path, dataset_size=1800, stop_quorum=0.75)  # six rounds
        runner, (a, b), tasks, evil, shard = await scene(coord)
        extra = [await join(coord, f"x{i}") for i in range(EXTRA_KEYS)]
        await until(lambda: coord.session.completed >= 1, "round 1 completed", timeout=30)
        await evil.request_stop(StopRequest(kind="max_steps"))
        for c in extra:
            assert not (await c.request_stop(StopRequest(reason="EarlyStopping"))).stop
        told = await a.request_stop(StopRequest(reason="EarlyStopping"))
        assert not told.stop and "session continues" in told.reason
        told = await b.request_stop(StopRequest(reason="EarlyStopping"))
        assert told.stop and told.round > 1, told
        finals = await asyncio.gather(*tasks)
        await status(coord)
        await finish(coord, runner, a, b, evil, *extra)
        return finals, shard, told, a.node_key, b.node_key

    finals, shard, told, a, b = run(main())
    entries = honest_finished(tmp_path, finals)
    assert max(e["round"] for e in entries) == told.round < shard.first_round + shard.rounds - 1
    state = saved_session(tmp_path)
    assert state["finished"] and state["stop"]["round"] == told.round == state["completed"]
    logged(caplog, f"node {a[:8]} asked to stop (EarlyStopping)", "session continues")
    logged(caplog, f"node {b[:8]} asked to stop (EarlyStopping)", "stop policy quorum 0.75")
