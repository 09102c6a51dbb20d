"""``drift demo`` end to end: a coordinator and two node processes train the char-LM; the
demo shows the loss per round and ends with the final validation loss next to the initial
one and a sample; the coordinator's CSV and TensorBoard logs of the run hold one row / one
point per completed round, read back with each logger's own reader."""

from __future__ import annotations

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]


def test_demo_shows_learning_and_logs_every_round(tmp_path: Path) -> None:
    work = tmp_path / "demo"
    out = subprocess.run(
        [sys.executable, "-m", "lightning_drift_cli.drift", "demo", "--max-chars", "40000",
         "--epochs", "1", "--sync-every", "2", "--workdir", str(work)],
        capture_output=True, text=True, timeout=400, env={"COLUMNS": "200", **_env()},
    )  # fmt: skip
    text = out.stdout + out.stderr
    assert out.returncode == 0, text[-4000:]

    manifest = json.loads((work / "checkpoints" / "manifest.json").read_text())
    rounds = sorted(c["round"] for c in manifest["checkpoints"] if c["round"] > 0)
    assert len(rounds) >= 2 and rounds == list(range(1, rounds[-1] + 1)), rounds

    # The loss per round as it went, and what the two processes learned together.
    # (the live lines come from status polls, so a short round may be skipped there)
    assert re.search(r"round +[1-9]\d* · epoch 1/1 · loss \d", text), text[-3000:]
    per_round = re.search(r"loss per round \(round:loss, from .*?\): ((?:\d+:\d+\.\d+\s*)+)", text)
    assert per_round, text[-3000:]
    assert [int(c.split(":")[0]) for c in per_round[1].split()] == rounds
    m = re.search(r"validation loss: initial (\d+\.\d+) \(round 0\) → final (\d+\.\d+)", text)
    assert m, text[-3000:]
    assert float(m[2]) < float(m[1])
    sample = text.split("sample from the final checkpoint:", 1)[1].lstrip("\n")
    assert sample.startswith("def ") and len(sample.strip()) > 40, sample

    logs = work / "checkpoints" / "logs"
    (metrics,) = logs.glob("csv/session-*/version_0/metrics.csv")
    with metrics.open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("round/loss")]
    assert [int(r["step"]) for r in rows] == rounds
    assert all(float(r["round/nodes"]) == 2 for r in rows)

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (run,) = {p.parent for p in logs.glob("tensorboard/session-*/version_0/events.*")}
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert [p.step for p in acc.Scalars("round/loss")] == rounds
    assert [p.step for p in acc.Scalars("round/samples")] == rounds


def _env() -> dict[str, str]:
    import os

    return {k: v for k, v in os.environ.items() if k not in ("DRIFT_TOKEN", "DRIFT_TOKEN_FILE")}
