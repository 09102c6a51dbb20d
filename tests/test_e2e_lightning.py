"""End to end with Lightning features: a real coordinator process and two real node processes
running a user's own program (tests/e2e/lightning_node.py) with EarlyStopping, BatchNorm and
a batch size of its own, a Tuner before fit, gradient accumulation and max_steps. Every
session ends with each node holding exactly the coordinator's final checkpoint and the
coordinator exiting 0."""

from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from lightning_drift_cli.local import LocalCoordinator
from safetensors.torch import load_file

NODE = Path(__file__).parent / "e2e" / "lightning_node.py"
NODE_TIMEOUT = 240.0

pytestmark = [pytest.mark.slow, pytest.mark.timeout(360)]


class Session:
    """A coordinator and named node processes; what they left behind once all ended."""

    def __init__(self, tmp: Path, **coordinator: object) -> None:
        self.tmp = tmp
        # No test here is about stragglers: on a busy machine a node may fall far behind, and
        # a straggler deadline would then complete rounds without it, which is not what
        # these tests check. Every round waits for both nodes (the heartbeat still drops a
        # node that is gone).
        coordinator.setdefault("deadline_floor", 600)
        self.coord = LocalCoordinator(tmp / "coord", **coordinator)
        self.reports: dict[str, dict] = {}

    def run(self, nodes: dict[str, list[str]]) -> Session:
        env = {k: v for k, v in os.environ.items() if k != "DRIFT_TOKEN"}
        with self.coord as coord:
            env.update(DRIFT_TOKEN=coord.token, PYTHONUNBUFFERED="1")
            procs = {}
            for name, extra in nodes.items():
                log = open(self.tmp / f"{name}.log", "w")
                cmd = [sys.executable, str(NODE), "--out", str(self.tmp / name), "--name", name]
                procs[name] = subprocess.Popen(
                    [*cmd, *extra], stdout=log, stderr=subprocess.STDOUT, env=env
                )
            try:
                self._wait(procs)
            finally:
                for p in procs.values():
                    if p.poll() is None:
                        p.kill()
            assert coord.wait(timeout=90) == 0, coord.log_tail()
        for name in nodes:
            self.reports[name] = json.loads((self.tmp / name / "report.json").read_text())
        return self

    def _wait(self, procs: dict[str, subprocess.Popen]) -> None:
        deadline = time.monotonic() + NODE_TIMEOUT
        while True:
            codes = {name: p.poll() for name, p in procs.items()}
            for name, code in codes.items():
                assert code in (None, 0), (
                    f"node {name} exited {code}:\n{self.log(name)}\n"
                    f"coordinator:\n{self.coord.log_tail()}"
                )
            if all(code == 0 for code in codes.values()):
                return
            assert time.monotonic() < deadline, (
                "nodes did not finish:\n"
                + "\n".join(f"--- {n}:\n{self.log(n, 2500)}" for n, c in codes.items() if c is None)
                + f"\ncoordinator:\n{self.coord.log_tail()}"
            )
            time.sleep(0.2)

    def log(self, name: str, chars: int = 4000) -> str:
        return (self.tmp / f"{name}.log").read_text(errors="replace")[-chars:]

    def final(self) -> tuple[int, dict[str, torch.Tensor]]:
        path = self.coord.latest_checkpoint()
        return int(path.name.split("-")[1].split(".")[0]), load_file(str(path))

    def assert_all_hold_the_final_checkpoint(self) -> int:
        final_round, final = self.final()
        for name in self.reports:
            mine = load_file(str(self.tmp / name / "final.safetensors"))
            assert mine.keys() == final.keys(), name
            for k, ref in final.items():
                assert torch.equal(mine[k], ref), f"node {name}: {k} differs from the final"
            assert self.reports[name]["history"][-1]["round"] == final_round, name
        return final_round

    def state(self) -> dict:
        return json.loads((self.coord.state_dir / "state.json").read_text())["session"]


def test_early_stopping_is_a_session_decision(tmp_path: Path) -> None:
    """Node a's EarlyStopping fires after epoch 0, node b's after epoch 1, in a 3-epoch session
    whose stop policy needs both: a is overruled (and says so) and trains on; when b asks
    too, the session stops, and both end on its final checkpoint."""
    s = Session(
        tmp_path, min_nodes=2, epochs=3, batch_size=16, sync_every=4,
        stop_policy="quorum", stop_quorum=1.0,
    ).run({
        "a": ["--epochs", "3", "--stop-at-epoch", "0"],
        "b": ["--epochs", "3", "--stop-at-epoch", "1"],
    })  # fmt: skip
    final_round = s.assert_all_hold_the_final_checkpoint()
    # Votes weigh the samples their nodes delivered: a alone holds only its share.
    overruled = (
        r"session continues: 1 of 2 node\(s\) asked, having delivered (\d+) of the "
        r"live nodes' (\d+) samples, stop policy quorum 1 needs \2"
    )
    assert re.search(overruled, s.log("a")), s.log("a")
    coord_log = s.coord.log_path.read_text()
    stopped = (
        r"2 of 2 node\(s\) asked, having delivered (\d+) of the live nodes' \1 "
        r"samples, stop policy quorum 1 needs \1"
    )
    assert re.search(stopped, coord_log), coord_log[-3000:]
    state = s.state()
    assert state["finished"] and state["stop"]["round"] == final_round == state["completed"]
    plan = state["epochs"]["plan"]
    assert plan["epoch"] == 2 and final_round == plan["first_round"], (plan, final_round)
    for r in s.reports.values():
        # The session ended at the first barrier of epoch 2 (of 0..2). A node that knew of the
        # stop before that barrier held it as its final one; a node that reached it first (b's
        # request is late on a busy machine) handed its upload off and trained on, but never
        # past its next barrier, which waits for the round in flight: what it trained there
        # is thrown away when it takes the final checkpoint.
        assert r["finished"] and r["history"][-1]["finished"], r["history"]
        shard = plan["shards"][r["node_key"]]
        first_barrier = math.ceil(math.ceil(shard["stop"] - shard["start"]) / 16 / plan["rounds"])
        assert len(r["batches"].get("2", [])) <= 2 * first_barrier, (r["batches"], shard)
    # Both epochs before the stop were trained by both nodes.
    trained = {h["epoch"] for r in s.reports.values() for h in r["history"] if h["samples"]}
    assert trained >= {0, 1}, trained


def test_batchnorm_nodes_get_whole_batches_of_their_own_batch_size(tmp_path: Path) -> None:
    """250 samples, one node with batches of 16, one with batches of 10, a session batch size
    of 32 that neither uses, and BatchNorm, which fails on a batch of one sample: every batch
    a node trains is a whole one of its own size, but for the one partial batch a plain run
    of its program has too (250 % 16 = 10 samples)."""
    samples = 250
    s = Session(
        tmp_path, min_nodes=2, epochs=2, batch_size=32, sync_every=2
    ).run({
        "a": ["--batchnorm", "--samples", str(samples), "--batch-size", "16"],
        "b": ["--batchnorm", "--samples", str(samples), "--batch-size", "10"],
    })  # fmt: skip
    s.assert_all_hold_the_final_checkpoint()
    sizes = {"a": 16, "b": 10}
    for epoch in ("0", "1"):
        trained = 0
        partial = 0
        for name, batch in sizes.items():
            batches = s.reports[name]["batches"][epoch]
            assert batches, (name, epoch)
            trained += sum(batches)
            full = [n for n in batches if n == batch]
            assert len(full) >= len(batches) - 1, (name, epoch, batches)
            if len(full) < len(batches):
                assert batches[-1] == samples % batch, (name, epoch, batches)
                partial += 1
        assert partial <= 1, epoch
        # What no node's plain run would train is fewer samples than one batch.
        assert samples - min(sizes.values()) < trained <= samples, (epoch, trained)


def test_lr_find_before_fit_stays_local(tmp_path: Path) -> None:
    """Both nodes run Tuner(trainer).lr_find before fit: the tuner's internal fit neither joins
    nor uploads, so the session sees two members and trains all its rounds with both."""
    s = Session(tmp_path, min_nodes=2, epochs=2, batch_size=16, sync_every=4, keep=1000).run(
        {"a": ["--lr-find"], "b": ["--lr-find"]}
    )
    s.assert_all_hold_the_final_checkpoint()
    assert len(s.state()["roster"]["members"]) == 2, s.state()["roster"]["members"]
    manifest = s.coord.manifest()
    rounds = [c for c in manifest["checkpoints"] if c["round"] > 0]
    assert rounds and all(len(c["contributors"]) == 2 for c in rounds), manifest
    assert max(c["epoch"] for c in rounds) == 1  # both epochs of the session were trained
    for r in s.reports.values():
        assert r["found_lr"] is not None, r
        assert r["history"][0]["round"] == 0  # one start-up sync: joined once, by the fit
        assert all(h["samples"] > 0 for h in r["history"][1:]), r["history"]


def test_accumulation_plans_rounds_in_optimizer_steps_and_max_steps_ends_the_session(
    tmp_path: Path,
) -> None:
    """Batches of 8, accumulate_grad_batches=4 (32 samples per optimizer step): every
    barrier falls on its own optimizer step. max_steps=20 (inside the third of 3 epochs) ends
    the session cleanly under --stop-policy first (the session follows any node's stop), on
    one final checkpoint every node holds."""
    node = ["--samples", "512", "--batch-size", "8", "--accumulate", "4", "--max-steps", "20",
            "--epochs", "3"]  # fmt: skip
    s = Session(
        tmp_path, min_nodes=2, epochs=3, batch_size=8, sync_every=2, stop_policy="first"
    ).run({"a": node, "b": node})
    final_round = s.assert_all_hold_the_final_checkpoint()
    state = s.state()
    assert state["finished"] and state["stop"]["round"] == final_round
    assert "max_steps" in state["stop"]["reason"], state["stop"]
    assert max(r["global_step"] for r in s.reports.values()) == 20
    for name, r in s.reports.items():
        # The first node to reach step 20 stopped the session inside epoch 2; the other
        # stopped at its next step (or before training epoch 2 at all, if it was slower).
        assert r["global_step"] <= 20 and set(r["batches"]) <= {"0", "1", "2"}, name
        last = r["history"][-1]
        assert last["finished"], name
        # Shards are sized by speed, so step 20 falls in epoch 2 for an even split and can
        # fall at the end of epoch 1 for a node given the larger shard; never in epoch 0.
        assert last["epoch"] in (1, 2), name
        steps = [h["step"] for h in r["history"][1:] if not h["finished"]]
        assert steps == sorted(set(steps)), (name, steps)  # never two barriers on one step
    # 512 samples / (2 nodes × 32 samples a step × sync_every 2) = 4 rounds an epoch, fewer
    # only if a node's shard gave fewer optimizer steps (the barriers then still fall apart).
    epoch0 = [
        [h for h in r["history"] if h["epoch"] == 0 and h["round"] > 0] for r in s.reports.values()
    ]
    assert len(epoch0[0]) == len(epoch0[1]) and 2 <= len(epoch0[0]) <= 4, epoch0
