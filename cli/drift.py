"""``drift``: the node side. ``join`` and ``train`` run a node, ``status`` shows the session,
``id`` prints this node's id, ``coord`` runs a coordinator (same as ``drift-coord serve``),
``demo`` runs a whole session on loopback. ``drift-node`` is the same without ``coord`` and
``demo`` (``lightning_drift_cli.node``).

How a node reaches its coordinator (``--token``, ``--peer``, ``--listen``) is read once, by
:func:`node_link`; ``drift train --peers ID,ID`` runs the other side: the coordinator of a
session whose nodes are named by id.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from lightning_drift_cli import common
from lightning_drift_cli.common import ModeOpt, NodeLink, TokenOpt, VerboseOpt

from lightning_drift.auth import TOKEN_ENV
from lightning_drift.coordinator.config import SETTING
from lightning_drift.errors import ConfigError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Train one model across unlike machines: run a node, check a session, try a demo.",
)

# Options whose value may be left out (see common.bare_options).
OPTIONAL_VALUES = ("--resume", "--listen")

CoordinatorAddrOpt = Annotated[
    str | None,
    typer.Option(
        help=common.with_default(
            "Dial the coordinator at HOST:PORT instead of the address its token or --peer "
            "gives (its key is still checked).",
            "the token's or --peer's address",
        ),
    ),
]
JoinTokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        "-t",
        "--join",
        help=common.with_default(
            "Invitation token, or a file holding it (--join: the same).",
            f"${TOKEN_ENV}; none with --peer or --listen",
        ),
    ),
]
PeerOpt = Annotated[
    str | None,
    typer.Option(
        help=common.with_default(
            "The coordinator by id: ID, ID@HOST:PORT or its ticket. Without a token: join "
            "without one (the coordinator lists this node in --peers); with --listen: let in "
            "only this coordinator; with a token: the token must name it.",
            "none: the token's coordinator",
        ),
    ),
]
ListenOpt = Annotated[
    str | None,
    typer.Option(
        metavar="[HOST:PORT]",
        help=common.with_default(
            "Wait for the coordinator (--peer) to dial this node: prints the node's id and "
            "ticket for the coordinator's --peers. Alone: all interfaces, any port.",
            "off: the node dials",
        ),
    ),
]
KeyFileOpt = Annotated[
    Path | None,
    typer.Option(
        help=common.with_default(
            "This node's key, for --peer and --listen (created 0600 on first use; the "
            "coordinator's --peers names the node by it).",
            "$XDG_STATE_HOME/lightning-drift/node.key",
        ),
    ),
]


def node_link(
    token: str | None,
    *,
    peer: str | None,
    listen: str | None,
    key_file: Path | None,
    mode: str | None,
    coordinator_addr: str | None,
) -> NodeLink:
    """How this node reaches its coordinator, from the flags: with ``--listen`` it waits (no
    token; ``--peer`` required), else it dials with a token (flag, then ``DRIFT_TOKEN``) or,
    with ``--peer`` and no token, without one. A usage error says what is missing."""
    if listen is not None:
        if not peer:
            raise typer.BadParameter(
                "a listening node lets in only the coordinator it is given: add --peer "
                "COORDINATOR_ID (`drift-coord id` prints it)",
                param_hint="--listen",
            )
        if token:
            raise typer.BadParameter(
                "a listening node needs no token: the coordinator dials it because its id is "
                "in the coordinator's --peers",
                param_hint="--listen",
            )
        found = None
    elif peer:
        found = common.find_token(token)  # with a token, --peer pins its coordinator
    else:
        found = common.need_token(
            token, hint="`drift-coord serve` prints one; or name the coordinator with --peer"
        )
    if peer:
        from lightning_drift.peers import parse_peer

        parse_peer(peer)  # ConfigError (one line, exit 1) for a malformed id, before training
    return NodeLink(
        token=found,
        peer=peer,
        listen=listen,
        key_file=str(key_file) if key_file else None,
        mode=mode,
        coordinator_addr=coordinator_addr,
    )


@app.command()
def join(
    token: JoinTokenOpt = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config",
            "-c",
            help=common.with_default("LightningCLI YAML.", "the coordinator's --config"),
        ),
    ] = None,
    peer: PeerOpt = None,
    listen: ListenOpt = None,
    key_file: KeyFileOpt = None,
    mode: ModeOpt = None,
    coordinator_addr: CoordinatorAddrOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Run a LightningCLI config as a node of the session, with DriftStrategy set."""
    common.setup_logging(verbose, common.NODE)
    link = node_link(
        token,
        peer=peer,
        listen=listen,
        key_file=key_file,
        mode=mode,
        coordinator_addr=coordinator_addr,
    )
    from lightning_drift_cli import nodecmds

    raise typer.Exit(nodecmds.join(link, config))


# drift train's node options, refused with --peers (where drift train runs the coordinator).
_NODE_ONLY = (
    "token", "model_path", "dataset_path", "resume", "checkpoint_dir", "peer", "listen",
    "key_file", "max_chars", "d_model", "n_layers", "block_size", "device", "name",
    "coordinator_addr", "progress",
)  # fmt: skip


@app.command()
def train(
    ctx: typer.Context,
    token: TokenOpt = None,
    peers: Annotated[
        list[str] | None,
        typer.Option(
            help=common.with_default(
                "Run the coordinator of a session whose nodes are these, by id (ID, "
                "ID@HOST:PORT or a ticket; comma-separated or repeated): it dials the ones with "
                "an address (any id in internet mode) and admits them without a token. The "
                "session waits for all of them.",
                "none: run a node",
            ),
        ),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option(
            help=common.with_default(
                "With --peers: the coordinator's UDP port.", SETTING["port"].shown_default
            )
        ),
    ] = None,
    model_path: Annotated[
        Path | None,
        typer.Option(
            help=common.with_default(
                "Initial weights (.pt or .safetensors); used only if this node is the first "
                "to reach the session's start-up sync, else replaced by the session's (with a "
                "warning).",
                "none: the model's own initial weights",
            ),
        ),
    ] = None,
    dataset_path: Annotated[
        Path | None,
        typer.Option(
            help=common.with_default(
                "A text file or a folder of text files.", "Python's stdlib source"
            )
        ),
    ] = None,
    epochs: Annotated[
        int, typer.Option(help="Epochs (the session's setting wins; with --peers, it is it).")
    ] = SETTING["epochs"].default,
    batch_size: Annotated[
        int, typer.Option(help="Batch size (with --peers: the session's).")
    ] = SETTING["batch_size"].default,
    resume: Annotated[
        str | None,
        typer.Option(
            metavar="[PATH]",
            help=common.with_default(
                "A node .ckpt to resume from (rejoins the session); --resume alone: "
                "CHECKPOINT_DIR/last.ckpt.",
                "none: start afresh",
            ),
        ),
    ] = None,
    checkpoint_dir: Annotated[
        Path, typer.Option(help="Where this node keeps its Lightning checkpoints.")
    ] = Path("drift-node-checkpoints"),
    peer: PeerOpt = None,
    listen: ListenOpt = None,
    key_file: KeyFileOpt = None,
    max_chars: Annotated[int, typer.Option(help="Characters of text to train on.")] = 400_000,
    d_model: Annotated[int, typer.Option(help="Model width.")] = 128,
    n_layers: Annotated[int, typer.Option(help="Transformer layers.")] = 2,
    block_size: Annotated[int, typer.Option(help="Context length.")] = 64,
    device: Annotated[str, typer.Option(help="auto, cpu, cuda, cuda:N or mps.")] = "auto",
    mode: ModeOpt = None,
    name: Annotated[
        str | None,
        typer.Option(help=common.with_default("Label in the coordinator's view.", "the hostname")),
    ] = None,
    coordinator_addr: CoordinatorAddrOpt = None,
    progress: Annotated[bool, typer.Option(help="Show Lightning's progress bar.")] = True,
    verbose: VerboseOpt = False,
) -> None:
    """Train the example char-level transformer as a node of the session (or, with --peers,
    run the coordinator of a session of nodes named by id)."""
    common.setup_logging(verbose, common.NODE)
    if peers:
        _coordinate(
            ctx, peers, epochs=epochs, batch_size=batch_size, mode=mode, port=port, verbose=verbose
        )
        return
    if port is not None:
        raise typer.BadParameter("--port is the coordinator's, with --peers", param_hint="--port")
    link = node_link(
        token,
        peer=peer,
        listen=listen,
        key_file=key_file,
        mode=mode,
        coordinator_addr=coordinator_addr,
    )
    from lightning_drift_cli import nodecmds

    nodecmds.train(
        link,
        model_path=model_path,
        dataset_path=dataset_path,
        epochs=epochs,
        batch_size=batch_size,
        resume=resume,
        checkpoint_dir=checkpoint_dir,
        max_chars=max_chars,
        d_model=d_model,
        n_layers=n_layers,
        block_size=block_size,
        device=device,
        name=name,
        progress=progress,
    )


def _coordinate(
    ctx: typer.Context,
    peers: list[str],
    *,
    epochs: int,
    batch_size: int,
    mode: str | None,
    port: int | None,
    verbose: bool,
) -> None:
    """``drift train --peers``: ``drift coord --peers ... --min-nodes N`` with this command's
    session flags, bound where the peers can reach it; a node's flag given with it is a usage
    error."""
    from lightning_drift.peers import split_peers

    given = [
        name
        for name in _NODE_ONLY
        if (source := ctx.get_parameter_source(name)) is not None and source.name == "COMMANDLINE"
    ]
    if given:
        flag = "--" + given[0].replace("_", "-")
        raise typer.BadParameter(
            f"with --peers, drift train runs the coordinator; {flag} is a node's option: give "
            "it to the nodes' drift train",
            param_hint=flag,
        )
    try:
        names = split_peers(peers)
    except ConfigError as exc:
        raise typer.BadParameter(str(exc), param_hint="--peers") from None
    from lightning_drift_cli.coord import serve

    from lightning_drift.peers import parse_peer
    from lightning_drift.transport import local_bind_for, peer_addrs

    bind = None  # internet mode: all interfaces, the table's default
    if mode != "internet":
        # Nodes on this machine only: loopback. Otherwise (another host, or a bare id that
        # will dial in from wherever it is) every interface, or they could not reach us.
        named = [parse_peer(n) for n in names]
        addrs = [a for peer in named for a in peer_addrs(peer)]
        on_loopback = all(peer.has_address for peer in named) and (
            local_bind_for(addrs) == "127.0.0.1:0"
        )
        bind = "127.0.0.1" if on_loopback else "0.0.0.0"

    def flag(name: str, value: Any) -> Any:
        # Only what was typed: a default must not count as given (a restart keeps the saved).
        source = ctx.get_parameter_source(name)
        return value if source is not None and source.name == "COMMANDLINE" else None

    serve(
        peers=names,
        min_nodes=len(names),
        epochs=flag("epochs", epochs),
        batch_size=flag("batch_size", batch_size),
        mode=mode,
        port=port,
        bind=bind,
        verbose=verbose,
    )


@app.command()
def status(
    token: Annotated[
        str | None,
        typer.Option(
            "--token",
            "-t",
            help=common.with_default(
                "A node or observer token, or a file holding it.",
                f"${TOKEN_ENV}, else STATE_DIR/observer.token, else the token of the "
                "last drift join or train here",
            ),
        ),
    ] = None,
    state_dir: Annotated[
        Path,
        typer.Option(help="A coordinator's state directory, for its observer.token."),
    ] = common.DEFAULT_STATE_DIR,
    as_json: common.JsonOpt = False,
    peer: Annotated[
        str | None,
        typer.Option(
            help=common.with_default(
                "Ask the coordinator named by id (ID, ID@HOST:PORT or a ticket), without a "
                "token, as the node --key-file names (it must be on the coordinator's --peers).",
                "none: find a token",
            )
        ),
    ] = None,
    key_file: KeyFileOpt = None,
    mode: ModeOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the coordinator.")] = 15.0,
    coordinator_addr: CoordinatorAddrOpt = None,
    verbose: VerboseOpt = False,
) -> None:
    """Show the session: nodes, devices, shares, rounds (found as `drift-coord status` finds it)."""
    common.setup_logging(verbose, common.NODE)
    tok = common.find_token(token) if peer else common.status_token(token, state_dir)
    st = common.fetch_status(
        tok,
        mode=mode,
        timeout=timeout,
        coordinator_addr=coordinator_addr,
        peer=peer,
        key_file=str(key_file) if key_file else None,
    )
    common.show_status(st, as_json=as_json)


@app.command("id")
def node_id(key_file: KeyFileOpt = None, verbose: VerboseOpt = False) -> None:
    """Print this node's id (its key is created on first use): what a coordinator's --peers
    names it by."""
    common.setup_logging(verbose, common.NODE)
    from lightning_drift.auth import node_identity, node_key_path

    typer.echo(node_identity(key_file).public_hex)
    typer.echo(f"key in {node_key_path(key_file)}", err=True)


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
    common.main(app, common.NODE, optional_values=OPTIONAL_VALUES)


if __name__ == "__main__":
    main()
