"""Start the end-to-end node script (charlm_node.py) as a real process, its output in a log."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

NODE = Path(__file__).parent / "charlm_node.py"


def start_node(
    token: str, workdir: Path, out: str, *extra: str, name: str | None = None, epochs: int = 1
) -> subprocess.Popen:
    """A char-LM node writing its results to ``workdir/out`` and its log to ``out.log``."""
    cmd = [
        sys.executable, str(NODE), "--token", token, "--out", str(workdir / out),
        "--epochs", str(epochs), "--name", name or out, *extra,
    ]  # fmt: skip
    log = open(workdir / f"{out}.log", "w")
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)


def log_tail(workdir: Path, out: str, chars: int = 4000) -> str:
    return (workdir / f"{out}.log").read_text(errors="replace")[-chars:]


def kill_all(procs: list[subprocess.Popen]) -> None:
    """Kill whichever of ``procs`` still run (a test's cleanup, pass or fail)."""
    for p in procs:
        if p.poll() is None:
            p.kill()
