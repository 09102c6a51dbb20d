"""``drift demo``: a coordinator and N nodes on loopback train the example char-LM.

It shows the session as it goes (a line per completed round with the nodes' loss), and at the
end what the two processes made together: the validation loss of the session's initial
weights next to the final checkpoint's, and a short text sample generated from the final
checkpoint.
"""

from __future__ import annotations

import asyncio
import csv
import importlib.util
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

from lightning_drift_cli.local import LocalCoordinator
from rich.console import Console
from rich.live import Live
from rich.markup import escape

from lightning_drift.coordinator.monitor import render_table, shown
from lightning_drift.protocol import SessionStatus
from lightning_drift.text import short_id

# The nodes' model and data (every node of a session must build the same ones).
MODEL = {"d_model": 64, "n_layers": 2, "block_size": 64}
BATCH_SIZE = 32
PROMPT = b"def "


def run(*, nodes: int, epochs: int, workdir: Path, max_chars: int, sync_every: int) -> int:

    console = Console()
    if workdir.exists():
        shutil.rmtree(workdir)
    logs = workdir / "logs"
    logs.mkdir(parents=True)
    # Nodes share this machine's cores: one torch thread each keeps them from fighting.
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    loggers = ["csv"] + (["tensorboard"] if importlib.util.find_spec("tensorboard") else [])
    coord = LocalCoordinator(
        workdir,
        min_nodes=nodes,
        epochs=epochs,
        batch_size=BATCH_SIZE,
        sync_every=sync_every,
        keep=1000,  # every round stays: the demo compares round 0 with the last
        logger=loggers,
    )
    console.print(f"[bold]coordinator[/] on 127.0.0.1:{coord.port}, state in {coord.state_dir}")
    procs: list[subprocess.Popen] = []
    codes: list[int | None] = []
    try:
        coord.start()
        console.print(
            f"node token in {coord.state_dir / 'node.token'} (nodes read it from that file)"
        )
        for i in range(nodes):
            cmd = [
                sys.executable, "-m", "lightning_drift_cli.drift", "train",
                "--token", str(coord.state_dir / "node.token"),
                "--max-chars", str(max_chars), "--d-model", str(MODEL["d_model"]),
                "--n-layers", str(MODEL["n_layers"]), "--block-size", str(MODEL["block_size"]),
                "--batch-size", str(BATCH_SIZE), "--epochs", str(epochs),
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
    _loss_per_round(console, coord.checkpoint_dir / "logs")
    _what_was_learned(console, coord, max_chars)
    return 0


def _watch(console: Console, observer: str, procs: list, coord: LocalCoordinator) -> None:
    """Show the session live until every node has exited: the table on a terminal, and a
    line for each completed round with the loss the nodes reported."""
    asyncio.run(_watch_over_one_connection(console, observer, procs, coord))


# How long the demo waits for its observer connection and for one status answer on it.
CONNECT_S = 30.0
ANSWER_S = 10.0


async def _watch_over_one_connection(
    console: Console, observer: str, procs: list, coord: LocalCoordinator
) -> None:
    """Poll the session's status once a second over one observer connection, kept for the
    whole run (a new connection per poll can miss a short session on a busy machine), and
    opened again only if it drops."""
    from lightning_drift.node.client import CoordinatorClient

    def running() -> bool:
        return any(p.poll() is None for p in procs) and coord.proc.poll() is None

    live = console.is_terminal
    shown_round = -1
    finished = False  # once the session says so, its closing connection is no news
    client = None
    with Live(console=console, auto_refresh=False, transient=True) if live else _Null() as view:
        try:
            while running():
                try:
                    if client is None:
                        client = await CoordinatorClient.connect(
                            observer, timeout=CONNECT_S, name="demo", observe=True
                        )
                    st = await asyncio.wait_for(client.status(), ANSWER_S)
                except Exception as exc:  # the coordinator may be busy, restarting or done
                    if client is not None:
                        await client.close("status failed")
                        client = None
                    if not live and not finished and running():
                        console.print(f"status unavailable: {escape(str(exc))}")
                else:
                    finished = st.state == "finished"
                    if live:
                        view.update(render_table(st), refresh=True)
                    if st.round != shown_round:
                        shown_round = st.round
                        console.print(_round_line(st))
                await asyncio.sleep(1.0)
        finally:
            if client is not None:
                await client.close("demo done")


def _round_line(st: SessionStatus) -> str:
    """``round N · epoch E/T · loss L (each node's) · R samples/s``."""
    losses = [(n.name or short_id(n.node_id), n.loss) for n in st.nodes]
    known = [v for _, v in losses if v is not None and math.isfinite(v)]
    mean = f"{sum(known) / len(known):.3f}" if known else "-"
    each = ", ".join(f"{shown(name)} {v:.3f}" for name, v in losses if v is not None)
    rate = sum(n.samples_per_s for n in st.nodes)
    return (
        f"round {st.round:>3} · epoch {min(st.epoch + 1, st.epochs)}/{st.epochs}"
        f" · loss {mean}" + (f" ({each})" if each else "") + f" · {rate:.0f} samples/s"
    )


def _loss_per_round(console: Console, log_dir: Path) -> None:
    """The session's own log (CSVLogger, written by the coordinator): loss per round."""
    files = sorted(log_dir.glob("csv/*/version_*/metrics.csv"))
    if not files:
        return
    with files[-1].open() as f:
        rows = [r for r in csv.DictReader(f) if r.get("round/loss")]
    if not rows:
        return
    cells = [f"{int(float(r['step']))}:{float(r['round/loss']):.3f}" for r in rows]
    console.print(
        f"loss per round (round:loss, from {files[-1]}): " + "  ".join(cells), soft_wrap=True
    )


def _what_was_learned(console: Console, coord: LocalCoordinator, max_chars: int) -> None:
    """Validation loss of round 0's weights and of the final checkpoint, and a sample."""
    import torch
    from lightning_drift_examples.charlm import CharDataModule, CharLM
    from safetensors.torch import load_file

    data = CharDataModule(
        max_chars=max_chars, block_size=MODEL["block_size"], batch_size=BATCH_SIZE
    )
    data.setup("validate")
    model = CharLM(**MODEL)

    def val_loss(path: Path) -> float:
        model.load_state_dict(load_file(str(path)))
        model.eval()
        total, n = 0.0, 0
        with torch.no_grad():
            for batch in data.val_dataloader():
                total += float(model.loss(batch)) * len(batch[0])
                n += len(batch[0])
        return total / max(1, n)

    initial = coord.checkpoint_dir / "round-000000.safetensors"
    final = coord.latest_checkpoint()
    before = val_loss(initial) if initial.exists() else math.nan
    after = val_loss(final)
    console.print(
        f"[bold]validation loss[/]: initial {before:.3f} (round 0) → final {after:.3f} "
        f"({final.name})"
    )
    text = model.generate(PROMPT, length=160, temperature=0.8, seed=0)
    sample = text.decode("utf-8", errors="replace")
    console.print("[bold]sample from the final checkpoint[/]:")
    console.print(escape(sample), markup=True, highlight=False)


class _Null:
    def __enter__(self) -> _Null:
        return self

    def update(self, *a: object, **k: object) -> None:
        return None

    def __exit__(self, *a: object) -> None:
        return None
