"""``drift``: the node side. ``join`` and ``train`` run a node, ``status`` shows the session,
``coord`` runs a coordinator (same as ``drift-coord serve``), ``demo`` runs a whole session on
loopback."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from lightning_drift_cli import common
from lightning_drift_cli.common import ModeOpt, TokenOpt, VerboseOpt

from lightning_drift.auth import TOKEN_ENV

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train one model across unlike machines: run a node, check a session, try a demo.",
)

CoordinatorAddrOpt = Annotated[
    str | None,
    typer.Option(help="Dial the coordinator at HOST:PORT instead of the token's address."),
]


JoinTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        "-t",
        "--join",
        envvar=TOKEN_ENV,
        help="Invitation token, or a file holding it (--join: the same).",
        show_default=f"${TOKEN_ENV}",
    ),
]


@app.command()
def join(
    token: JoinTokenOpt = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", "-c", help="LightningCLI YAML; default: the coordinator's --config."
        ),
    ] = None,
    mode: ModeOpt = None,
    coordinator_addr: CoordinatorAddrOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a LightningCLI config as a node of the session, with DriftStrategy set."""
    common.setup_logging(verbose, common.NODE)
    tok = common.need_token(token)
    from lightning_drift_cli import nodecmds

    raise typer.Exit(nodecmds.join(tok, config, mode=mode, coordinator_addr=coordinator_addr))


@app.command()
def train(
    token: TokenOpt = None,
    model_path: Annotated[
        Path | None,
        typer.Option(
            help="Initial weights (.pt or .safetensors); used only if this node is the first "
            "to reach the session's start-up sync, else replaced by the session's (with a warning)."
        ),
    ] = None,
    dataset_path: Annotated[
        Path | None,
        typer.Option(
            help="A text file or a folder of text files; default: Python's stdlib source."
        ),
    ] = None,
    epochs: Annotated[int, typer.Option(help="Epochs (the session's setting wins).")] = 10,
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 32,
    resume: Annotated[
        str | None,
        typer.Option(
            help="A node .ckpt to resume from (rejoins the session); --resume alone: "
            "CHECKPOINT_DIR/last.ckpt.",
            show_default="none: start afresh",
        ),
    ] = None,
    checkpoint_dir: Annotated[
        Path, typer.Option(help="Where this node keeps its Lightning checkpoints.")
    ] = Path("drift-node-checkpoints"),
    peer: Annotated[
        str | None,
        typer.Option(help="Only connect if the coordinator's endpoint id is this (hex)."),
    ] = None,
    max_chars: Annotated[int, typer.Option(help="Characters of text to train on.")] = 400_000,
    d_model: Annotated[int, typer.Option(help="Model width.")] = 128,
    n_layers: Annotated[int, typer.Option(help="Transformer layers.")] = 2,
    block_size: Annotated[int, typer.Option(help="Context length.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    mode: ModeOpt = None,
    name: Annotated[str | None, typer.Option(help="Label in the coordinator's view.")] = None,
    coordinator_addr: CoordinatorAddrOpt = None,
    progress: Annotated[bool, typer.Option(help="Show Lightning's progress bar.")] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Train the example char-level transformer as a node of the session."""
    common.setup_logging(verbose, common.NODE)
    tok = common.need_token(token)
    from lightning_drift_cli import nodecmds

    nodecmds.train(
        tok,
        model_path=model_path,
        dataset_path=dataset_path,
        epochs=epochs,
        batch_size=batch_size,
        resume=resume,
        checkpoint_dir=checkpoint_dir,
        peer=peer,
        max_chars=max_chars,
        d_model=d_model,
        n_layers=n_layers,
        block_size=block_size,
        device=device,
        mode=mode,
        name=name,
        progress=progress,
        coordinator_addr=coordinator_addr,
    )


@app.command()
def status(
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            "-t",
            help="A node or observer token, or a file holding it.",
            show_default=f"${TOKEN_ENV}, else STATE_DIR/observer.token, else the token of the "
            "last drift join or train here",
        ),
    ] = None,
    state_dir: Annotated[
        Path,
        typer.Option(help="A coordinator's state directory, for its observer.token."),
    ] = common.DEFAULT_STATE_DIR,
    as_json: common.JsonOpt = False,
    mode: ModeOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the coordinator.")] = 15.0,
    coordinator_addr: CoordinatorAddrOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Show the session: nodes, devices, shares, rounds (found as `drift-coord status` finds it)."""
    common.setup_logging(verbose, common.NODE)
    tok = common.status_token(token, state_dir)
    st = common.fetch_status(tok, mode=mode, timeout=timeout, coordinator_addr=coordinator_addr)
    common.show_status(st, as_json=as_json)


@app.command()
def demo(
    nodes: Annotated[int, typer.Option(help="How many nodes to start.")] = 2,
    epochs: Annotated[int, typer.Option(help="Epochs to train.")] = 2,
    workdir: Annotated[Path, typer.Option(help="Where state and checkpoints go.")] = Path(
        "demo-run"
    ),
    max_chars: Annotated[
        int, typer.Option(help="Characters of stdlib source to train on.")
    ] = 120_000,
    sync_every: Annotated[int, typer.Option(help="Steps per round for an average node.")] = 8,
    verbose: VerboseOpt = False,
) -> None:
    """Start a coordinator and N nodes on loopback, train the example model, show the session."""
    common.setup_logging(verbose, common.NODE)
    from lightning_drift_cli import demo as demo_mod

    raise typer.Exit(
        demo_mod.run(
            nodes=nodes, epochs=epochs, workdir=workdir, max_chars=max_chars, sync_every=sync_every
        )
    )


def _add_coord() -> None:
    from lightning_drift_cli.coord import serve

    app.command(
        "coord",
        help="Run a coordinator: the same as `drift-coord serve` (see `drift-coord serve --help`).",
    )(serve)


_add_coord()


def main() -> None:
    common.main(app, common.NODE, optional_values=("--resume",))


if __name__ == "__main__":
    main()
