"""``drift demo``: a coordinator and N nodes on loopback train the example char-LM."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from lightning_drift_cli.local import LocalCoordinator
from rich.console import Console
from rich.live import Live


def run(*, nodes: int, epochs: int, workdir: Path, max_chars: int, sync_every: int) -> int:

    console = Console()
    if workdir.exists():
        shutil.rmtree(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    # Nodes share this machine's cores: one torch thread each keeps them from fighting.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    coord = LocalCoordinator(
        workdir,
        min_nodes=nodes,
        epochs=epochs,
        batch_size=32,
        sync_every=sync_every,
    )
    console.print(f"[bold]coordinator[/] on 127.0.0.1:{coord.port}, state in {coord.state_dir}")
    procs: list[subprocess.Popen] = []
    codes: list[int | None] = []
    try:
        coord.start()
        console.print(
            f"node token: {coord.token[:24]}…  (whole token in {coord.state_dir / 'node.token'})"
        )
        for i in range(nodes):
            cmd = [
                sys.executable, "-m", "lightning_drift_cli.drift", "train", "--token", coord.token,
                "--max-chars", str(max_chars), "--d-model", "64", "--n-layers", "2",
                "--block-size", "64", "--batch-size", "32", "--epochs", str(epochs),
                "--checkpoint-dir", str(workdir / f"node-{i}"), "--name", f"node-{i}",
                "--no-progress",
            ]  # fmt: skip
            log = open(logs / f"node-{i}.log", "w")
            procs.append(subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env))
        console.print(f"started {nodes} nodes; logs in {logs}")
        _watch(console, coord.observer_token, procs, coord)
        codes = [p.wait(timeout=900) for p in procs]
        coord.wait(timeout=60)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        coord.stop()
    if any(codes) or coord.proc is None or coord.proc.returncode:
        console.print(
            f"[red]demo failed[/]: node exit codes {codes}; see {logs} and {coord.log_path}"
        )
        return 1
    manifest = coord.manifest()
    final = coord.latest_checkpoint()
    console.print(
        f"[green]done[/]: {len(manifest.get('checkpoints', []))} checkpoints kept; final "
        f"coordinated checkpoint: {final}"
    )
    return 0


def _watch(console: Console, observer: str, procs: list, coord: LocalCoordinator) -> None:
    """Show the session live until every node has exited."""
    from lightning_drift_cli.common import fetch_status

    from lightning_drift.coordinator.monitor import render_table

    live = console.is_terminal
    last_line = ""
    with Live(console=console, auto_refresh=False, transient=False) if live else _Null() as view:
        while any(p.poll() is None for p in procs) and coord.proc.poll() is None:
            try:
                st = fetch_status(observer, timeout=5)
            except Exception as exc:  # the coordinator may be busy or restarting
                st = None
                if not live and coord.proc is not None and coord.proc.poll() is None:
                    console.print(f"status unavailable: {exc}")
            if st is not None:
                if live:
                    view.update(render_table(st), refresh=True)
                else:
                    line = (
                        f"round {st.round} epoch {min(st.epoch + 1, st.epochs)}/{st.epochs} state {st.state} "
                        + " ".join(
                            f"{n.name or n.node_id[:8]}:{n.state}:{n.samples_per_s:.0f}/s"
                            for n in st.nodes
                        )
                    )
                    if line != last_line:
                        console.print(line)
                        last_line = line
            time.sleep(1.0)


class _Null:
    def __enter__(self) -> _Null:
        return self

    def update(self, *a: object, **k: object) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
