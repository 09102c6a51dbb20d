"""The Lightning compatibility suite: every recipe of ``tests/compat/recipes.py`` (programs
from Lightning's documentation) run as a session of a real coordinator and two real node
processes. Each ends with both nodes holding exactly the coordinator's final checkpoint (a
node the recipe has leave early, the checkpoint of its last round) and the coordinator
exiting 0, or, for a recipe drift refuses, with both nodes failing within seconds on a
message that names the fix. ``docs/strategy.md``'s "Works with" table has a row
per recipe."""

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
from compat.recipes import RECIPES, Outcome, Recipe
from lightning_drift_cli.local import LocalCoordinator
from safetensors.torch import load_file

from lightning_drift.checkpoint import weights_name

NODE = Path(__file__).parent / "compat" / "node.py"
NODES = ("a", "b")
DRIFT_ERROR = "lightning_drift.errors."  # how a node's traceback names the error it ends on
# A recipe's session takes 7 to 20 seconds (a busy machine); one that hangs fails here, with
# its logs, instead of at the test's timeout.
DEADLINE = 150.0
# No recipe is about stragglers: every round waits for both nodes, however busy the machine.
SESSION = {"min_nodes": 2, "epochs": 2, "batch_size": 8, "sync_every": 2, "deadline_floor": 600}

pytestmark = pytest.mark.slow


class Run:
    """One session of a recipe: the coordinator, the nodes, and their logs."""

    def __init__(self, recipe: Recipe, folder: Path, stage: int, previous: Path | None) -> None:
        self.recipe = recipe
        self.folder = folder
        self.stage = stage
        self.previous = previous
        self.coord = LocalCoordinator(folder / "coord", **{**SESSION, **recipe.coordinator})
        self.dirs = {name: folder / name for name in NODES}

    def log(self, name: str, chars: int = 3000) -> str:
        return (self.folder / f"{name}.log").read_text(errors="replace")[-chars:]

    def tails(self, names: tuple[str, ...] = NODES) -> str:
        nodes = "".join(f"\n--- node {n}:\n{self.log(n)}" for n in names)
        # The coordinator's first lines print its token: a failure shows the rest.
        coord = [line for line in self.coord.log_tail(40).splitlines() if "eyJ" not in line]
        return f"{nodes}\n--- coordinator:\n" + "\n".join(coord)

    def start(self, name: str) -> subprocess.Popen:
        cmd = [
            sys.executable, str(NODE), "--recipe", self.recipe.name, "--name", name,
            "--out", str(self.dirs[name]), "--stage", str(self.stage),
            "--token-file", str(self.coord.state_dir / "node.token"),
        ]  # fmt: skip
        if self.previous is not None:
            cmd += ["--previous", str(self.previous / name)]
        env = {k: v for k, v in os.environ.items() if k != "DRIFT_TOKEN"}
        log = open(self.folder / f"{name}.log", "w")
        return subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, env={**env, "PYTHONUNBUFFERED": "1"}
        )

    def run(self, refused: tuple[str, ...]) -> dict[str, int]:
        """Start the nodes (they import Lightning while the coordinator starts) and wait for
        all of them: the exit codes."""
        self.folder.mkdir(parents=True)
        procs = {name: self.start(name) for name in NODES}
        try:
            self.coord.start()
            return self.wait(procs, refused)
        finally:
            for p in procs.values():
                if p.poll() is None:
                    p.kill()
                    p.wait(timeout=30)

    def wait(self, procs: dict[str, subprocess.Popen], refused: tuple[str, ...]) -> dict[str, int]:
        deadline = time.monotonic() + DEADLINE
        while True:
            codes = {name: p.poll() for name, p in procs.items()}
            failed = [n for n, c in codes.items() if c not in (None, 0)]
            assert refused or not failed, (
                f"node {failed[0]} exited {codes[failed[0]]}:{self.tails()}"
            )
            if all(c is not None for c in codes.values()):
                return codes  # type: ignore[return-value]
            running = tuple(n for n, c in codes.items() if c is None)
            assert time.monotonic() < deadline, (
                f"{self.recipe.name}: node(s) {', '.join(running)} still running after "
                f"{DEADLINE:.0f} s{self.tails(running)}"
            )
            time.sleep(0.1)

    def outcome(self, compare: str) -> Outcome:
        """Every node holds the coordinator's final checkpoint exactly (a node that left, the
        checkpoint of the last round it took part in); what they reported."""
        path = self.coord.latest_checkpoint()
        final_round = int(path.name.split("-")[1].split(".")[0])
        final = load_file(str(path))
        reports = {}
        for name, folder in self.dirs.items():
            reports[name] = json.loads((folder / "report.json").read_text())
            held, ref = final_round, final
            if name in self.recipe.leaves:
                held = reports[name]["history"][-1]["round"]
                assert held < final_round, (name, held, final_round)
                ref = load_file(str(self.coord.checkpoint_dir / weights_name(held)))
            mine = load_file(str(folder / f"{compare}.safetensors"))
            assert mine.keys() == ref.keys(), (name, sorted(mine), sorted(ref))
            for k, want in ref.items():
                assert torch.equal(mine[k], want), f"node {name}: {k} differs from round {held}"
            assert reports[name]["history"][-1]["round"] == held, (name, held)
        state = json.loads((self.coord.state_dir / "state.json").read_text())["session"]
        return Outcome(self.dirs, reports, final_round, final, state)


def session(recipe: Recipe, folder: Path, stage: int, previous: Path | None) -> Outcome | None:
    """Run one session of ``recipe``; its outcome, or ``None`` once every node was refused as
    the recipe expects."""
    last = stage == recipe.stages - 1
    refused = recipe.refused if last else ()
    run = Run(recipe, folder, stage, previous)
    try:
        codes = run.run(refused)
        if refused:
            for name, code in codes.items():
                assert code != 0, f"node {name} was not refused:{run.tails()}"
                # Refused means one of drift's errors says why (a KeyError naming a tensor
                # is a crash, not a refusal).
                errors = [ln for ln in run.log(name, 20000).splitlines() if DRIFT_ERROR in ln]
                assert any(m in ln for ln in errors for m in refused), (
                    f"node {name} failed without a drift error naming "
                    f"{' or '.join(refused)}:{run.tails()}"
                )
            return None
        assert run.coord.wait(timeout=60) == 0, run.tails()
        return run.outcome(recipe.compare)
    finally:
        run.coord.stop()


@pytest.mark.timeout(2 * DEADLINE + 120)
@pytest.mark.parametrize("name", list(RECIPES))
def test_recipe(name: str, tmp_path: Path) -> None:
    recipe = RECIPES[name]
    previous = None
    for stage in range(recipe.stages):
        outcome = session(recipe, tmp_path / f"session{stage}", stage, previous)
        previous = tmp_path / f"session{stage}"
    if outcome is not None and recipe.check is not None:
        recipe.check(outcome)


def test_the_works_with_table_names_every_recipe_and_only_recipes() -> None:
    """docs/strategy.md's "Works with" table is the suite's: each recipe is named in the
    last column of a row, and every name there is a recipe (test files are named with their
    ``.py``, which no recipe name has)."""
    doc = (Path(__file__).parents[1] / "docs" / "strategy.md").read_text()
    start = doc.index("## Works with")
    table = doc[start : doc.index("\n## ", start + 1)]
    rows = [ln for ln in table.splitlines() if ln.startswith("| ") and "---" not in ln][1:]
    named = set()
    for row in rows:
        named |= set(re.findall(r"`([a-z0-9_]+)`", row.split("|")[-2]))
    assert set(RECIPES) - named == set(), "recipes without a row"
    assert named - set(RECIPES) == set(), "rows naming no recipe"
