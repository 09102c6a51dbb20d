"""``drift-coord``: run a coordinator (serve), issue and revoke tokens, show the session.

Every ``serve`` flag can also come from ``--config train.yaml``: its ``coordinator:`` mapping
holds serve options (flag names with underscores); the rest of the YAML (model, data,
trainer) is a LightningCLI config handed to nodes for ``drift join``. A flag given on the
command line wins over the file, the file over the built-in default. On a restart (the state
dir already holds a coordinator) the address options not given either way (port, mode, bind,
relay, checkpoint dir) and the ``--peers`` list come from the state dir instead of the
defaults, so the address in the tokens stays right and the same nodes are admitted; the
session's settings always come from its saved state.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import signal
import sys
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from lightning_drift_cli import common
from rich.markup import escape

from lightning_drift.auth import TOKEN_ENV
from lightning_drift.coordinator.config import (
    OPTIONS,
    SETTING,
    ServeOptions,
    SessionConfig,
    build,
    read_option,
)
from lightning_drift.errors import ConfigError

if TYPE_CHECKING:
    from lightning_drift.coordinator.state import StateDir

app = typer.Typer(
    help="Coordinator of a lightning-drift session.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_STATE_DIR: Path = SETTING["state_dir"].default


def _option(name: str, *decls: str) -> Any:
    """The typer option of setting ``name``: its help and default from the one table."""
    s = SETTING[name]
    return typer.Option(*decls, help=f"{s.help} {escape(f'[default: {s.shown_default}]')}")


# Serve options a restart takes from STATE_DIR/coordinator.json when they are not given:
# together with the identity they make the ticket, and so the address in the tokens.
STORED_OPTIONS = ("port", "mode", "bind", "relay", "checkpoint_dir", "peers")


def resolve_serve_options(
    flags: dict[str, Any], config: Path | None, notes: list[str] | None = None
) -> tuple[SessionConfig, ServeOptions]:
    """The session config and serve options of ``drift-coord serve``.

    Flags (None = not given) win over the config file's ``coordinator:`` mapping, which wins
    over the defaults of the table in ``lightning_drift.coordinator.config``; the rest of the
    file is the LightningCLI YAML handed to nodes (``SessionConfig.lightning_config``). The
    session's epochs, given neither way, are that YAML's ``trainer.max_epochs`` if it has one.

    When the state dir already holds a coordinator, :data:`STORED_OPTIONS` not given as a
    flag or in the file come from its ``coordinator.json``, and session options given with
    values other than the saved session's are reported: the saved ones are used. Both are
    appended to ``notes``: lines for the operator, which ``serve`` prints to stderr.
    """
    from lightning_drift.coordinator.state import StateDir

    file_opts, lightning_yaml = _read_config_file(config)
    values: dict[str, Any] = {}
    given: set[str] = set()
    for s in OPTIONS:
        raw = flags.get(s.name) if s.where == "flag" else None
        if raw is None or (s.kind is list and not raw):
            raw = file_opts.get(s.name)
        if raw is None:
            default = s.default
            values[s.field] = list(default) if isinstance(default, list) else default
        else:
            given.add(s.name)
            values[s.field] = read_option(s, raw)
    values["lightning_config"] = lightning_yaml
    if "epochs" not in given:
        # A LightningCLI config says how long to train: the session trains that long.
        max_epochs = _trainer_max_epochs(lightning_yaml)
        if max_epochs is not None:
            values["epochs"] = max_epochs
            given.add("epochs")
    state = StateDir(values["state_dir"])
    lines = _stored_address(state, values, given)
    session, options = build(values)
    lines += _saved_session_differs(
        state, session, given, lightning_yaml if config is not None else None
    )
    if notes is not None:
        notes.extend(lines)
    return session, options


def _read_config_file(config: Path | None) -> tuple[dict[str, Any], str]:
    """(the ``coordinator:`` options by name, the LightningCLI YAML of the rest) of --config."""
    import yaml

    if config is None:
        return {}, ""
    try:
        doc = yaml.safe_load(Path(config).read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read --config {config}: {exc}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"--config {config} must be a YAML mapping")
    file_opts = {
        k.replace("-", "_"): v for k, v in dict(doc.pop("coordinator", None) or {}).items()
    }
    unknown = sorted(k for k in file_opts if k not in SETTING or SETTING[k].where == "code")
    if unknown:
        raise ConfigError(
            f"unknown coordinator option(s) in {config}: {', '.join(unknown)}; "
            f"known: {', '.join(sorted(s.name for s in OPTIONS))}"
        )
    return file_opts, yaml.safe_dump(doc, sort_keys=False) if doc else ""


def _trainer_max_epochs(lightning_yaml: str) -> int | None:
    """``trainer.max_epochs`` of the LightningCLI part of --config, when it names a count."""
    import yaml

    doc = yaml.safe_load(lightning_yaml) if lightning_yaml else None
    trainer = doc.get("trainer") if isinstance(doc, dict) else None
    value = trainer.get("max_epochs") if isinstance(trainer, dict) else None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return None  # absent, or -1 / null: "no limit", which a session cannot be
    return value


def _stored_address(state: StateDir, values: dict[str, Any], given: set[str]) -> list[str]:
    """Fill in the stored address options of an existing state dir (``values`` in place);
    returns the line that tells the operator which ones were taken."""
    from lightning_drift.coordinator.state import COORDINATOR_FILE

    stored = state.stored_coordinator()
    if stored is None:
        return []
    taken = []
    for name in STORED_OPTIONS:  # mode before bind and relay: they belong to a mode
        s = SETTING[name]
        mode = values["mode"]
        if name in given or stored.get(name) is None:
            continue
        if name in ("bind", "relay") and stored.get("mode") != mode:
            continue  # they belong to the stored mode, not to the one given now
        value = read_option(s, stored[name])
        if name == "bind" and value == ("127.0.0.1" if mode == "local" else "0.0.0.0"):
            continue  # the default
        if value != values[s.field]:
            values[s.field] = value
            taken.append(f"{s.flag} {_show(value)}")
    if not taken:
        return []
    return [
        f"restart: from {state.path / COORDINATOR_FILE} (not given on the command line "
        f"or in --config): {', '.join(taken)}"
    ]


def _saved_session_differs(
    state: StateDir, session: SessionConfig, given: set[str], lightning_yaml: str | None
) -> list[str]:
    """The warning, if any, that session options given now differ from the saved session's."""
    saved = state.load_session()
    if saved is None:
        return []
    config = SessionConfig.from_dict(saved.get("config", {}))
    differ = []
    for name in sorted(given):
        s = SETTING[name]
        if s.scope != "session":
            continue
        now, was = getattr(session, s.field), getattr(config, s.field)
        if now != was:
            differ.append(f"{s.flag} {_show(now)} (saved: {_show(was)})")
    if lightning_yaml and lightning_yaml != config.lightning_config:
        differ.append("the LightningCLI part of --config (nodes get the saved one)")
    if not differ:
        return []
    return [
        f"warning: session {saved.get('session_id', '?')} in {state.path} is resumed with "
        f"its saved settings; ignored: {'; '.join(differ)}. To start a new session "
        f"with these settings, move {state.path / 'state.json'} aside."
    ]


def _show(v: Any) -> str:
    if isinstance(v, list):
        return " ".join(str(x) for x in v) or "(none)"
    return str(v)


@app.command()
def serve(
    port: Annotated[int | None, _option("port")] = None,
    bind: Annotated[str | None, _option("bind")] = None,
    mode: Annotated[str | None, _option("mode")] = None,
    relay: Annotated[list[str] | None, _option("relay")] = None,
    state_dir: Annotated[Path | None, _option("state_dir")] = None,
    checkpoint_dir: Annotated[Path | None, _option("checkpoint_dir")] = None,
    min_nodes: Annotated[int | None, _option("min_nodes")] = None,
    epochs: Annotated[int | None, _option("epochs")] = None,
    batch_size: Annotated[int | None, _option("batch_size")] = None,
    sync_every: Annotated[int | None, _option("sync_every")] = None,
    aggregation: Annotated[str | None, _option("aggregation")] = None,
    quorum: Annotated[float | None, _option("quorum")] = None,
    stop_policy: Annotated[str | None, _option("stop_policy")] = None,
    stop_quorum: Annotated[float | None, _option("stop_quorum")] = None,
    heartbeat_timeout: Annotated[float | None, _option("heartbeat_timeout")] = None,
    dataset_size: Annotated[int | None, _option("dataset_size")] = None,
    seed: Annotated[int | None, _option("seed")] = None,
    transfer_dtype: Annotated[str | None, _option("transfer_dtype")] = None,
    download_dtype: Annotated[str | None, _option("download_dtype")] = None,
    overlap: Annotated[bool | None, _option("overlap", "--overlap/--no-overlap")] = None,
    rebalance: Annotated[bool | None, _option("rebalance", "--rebalance/--no-rebalance")] = None,
    outer_lr: Annotated[float | None, _option("outer_lr")] = None,
    outer_momentum: Annotated[float | None, _option("outer_momentum")] = None,
    outer_warmup: Annotated[int | None, _option("outer_warmup")] = None,
    residual: Annotated[str | None, _option("residual")] = None,
    deadline_margin: Annotated[float | None, _option("deadline_margin")] = None,
    deadline_floor: Annotated[float | None, _option("deadline_floor")] = None,
    deadline_max: Annotated[float | None, _option("deadline_max")] = None,
    min_vram: Annotated[str | None, _option("min_vram")] = None,
    keep: Annotated[int | None, _option("keep")] = None,
    max_model_mb: Annotated[int | None, _option("max_model_mb")] = None,
    token_ttl: Annotated[str | None, _option("token_ttl")] = None,
    peers: Annotated[list[str] | None, _option("peers")] = None,
    logger: Annotated[list[str] | None, _option("logger")] = None,
    log_dir: Annotated[Path | None, _option("log_dir")] = None,
    init: Annotated[Path | None, _option("init")] = None,
    min_upload_rate: Annotated[str | None, _option("min_upload_rate")] = None,
    max_nodes: Annotated[int | None, _option("max_nodes")] = None,
    max_nodes_per_token: Annotated[int | None, _option("max_nodes_per_token")] = None,
    forget_after: Annotated[str | None, _option("forget_after")] = None,
    robust: Annotated[str | None, _option("robust")] = None,
    trim: Annotated[float | None, _option("trim")] = None,
    clip: Annotated[float | None, _option("clip")] = None,
    data_plane: Annotated[str | None, _option("data_plane")] = None,
    shards: Annotated[int | None, _option("shards")] = None,
    audit_every: Annotated[int | None, _option("audit_every")] = None,
    max_change: Annotated[float | None, _option("max_change")] = None,
    max_strikes: Annotated[int | None, _option("max_strikes")] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            help=common.with_default("YAML: `coordinator:` options + LightningCLI config.", "none")
        ),
    ] = None,
    exit_when_done: Annotated[
        bool | None, _option("exit_when_done", "--exit-when-done/--stay")
    ] = None,
    verbose: common.VerboseOpt = False,
) -> None:
    """Run the coordinator: print the node token, serve rounds, show the live view."""
    from lightning_drift.coordinator.server import Coordinator
    from lightning_drift.errors import DriftError

    flags = dict(locals())
    common.setup_logging(verbose, common.COORDINATOR)
    notes: list[str] = []
    try:
        sc, opts = resolve_serve_options(flags, config, notes)
        coord = Coordinator(sc, opts)
    except DriftError as exc:
        common.fail(exc, 2)
    for line in notes:
        typer.echo(line, err=True)
    try:
        asyncio.run(_serve(coord))
    except DriftError as exc:
        common.fail(exc, 1)
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if coord.fatal:
        typer.echo(
            f"error: {coord.fatal}; start `drift-coord serve` again with the same --state-dir "
            "to resume from the last saved round (nodes reconnect on their own)",
            err=True,
        )
        raise typer.Exit(1)


async def _serve(coord: Any) -> None:
    loop = asyncio.get_running_loop()
    await coord.start()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, coord.shutdown)
        state = coord.state.path
        print(f"coordinator key {coord.endpoint.key_hex}", flush=True)
        print(f"session {coord.session.session_id} round {coord.session.completed}", flush=True)
        print(f"node token (also in {state / 'node.token'}):", flush=True)
        print(coord.node_token, flush=True)
        print(f"observer token in {state / 'observer.token'}", flush=True)
        view = asyncio.create_task(_view(coord))
        try:
            await coord.run()
        finally:
            view.cancel()
    finally:
        await coord.close()


async def _view(coord: Any) -> None:
    """The live view until cancelled. A status it cannot render is logged and skipped: the
    view must not stop quietly (the renderers escape what they show, so this is a bug)."""
    import logging

    from lightning_drift.coordinator.monitor import render_lines, render_table

    log = logging.getLogger("lightning_drift_cli.view")

    def table() -> Any:
        try:
            return render_table(coord.status())
        except Exception:
            log.exception("view.render_failed")
            return None

    if sys.stdout.isatty():
        from rich.live import Live

        with Live(table(), refresh_per_second=2, transient=False) as live:
            while True:
                await asyncio.sleep(1.0)
                t = table()
                if t is not None:
                    live.update(t)
    else:
        # A printer thread: a stdout pipe nobody reads must not block the event loop
        # (heartbeats, barriers). When it is full, status lines are dropped.
        out: queue.Queue[list[str]] = queue.Queue(maxsize=10)

        def printer() -> None:
            while True:
                for line in out.get():
                    print(line, flush=True)

        threading.Thread(target=printer, name="drift-view", daemon=True).start()
        last = None
        last_t = 0.0
        while True:
            await asyncio.sleep(1.0)
            st = coord.status()
            key = (st.round, st.state, tuple((n.node_id, n.state) for n in st.nodes))
            if key != last or time.monotonic() - last_t > 30:
                last, last_t = key, time.monotonic()
                try:
                    lines = render_lines(st)
                except Exception:
                    log.exception("view.render_failed")
                    continue
                with contextlib.suppress(queue.Full):
                    out.put_nowait(lines)


StateDirOpt = Annotated[
    Path, typer.Option("--state-dir", help="The coordinator's state directory.")
]


@app.command()
def token(
    role: Annotated[str, typer.Option(help="node or observer.")] = "node",
    expires: Annotated[str, typer.Option(help="Lifetime: 90m, 24h, 7d...")] = "24h",
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    verbose: common.VerboseOpt = False,
) -> None:
    """Issue another token from the state dir's identity (the server need not run)."""
    common.setup_logging(verbose, common.COORDINATOR)
    from lightning_drift.coordinator.state import StateDir
    from lightning_drift.errors import DriftError
    from lightning_drift.units import parse_duration

    try:
        if role not in ("node", "observer"):
            raise typer.BadParameter("role must be node or observer")
        sd = StateDir(state_dir)
        if not (sd.path / "identity.key").exists():
            typer.echo(f"error: no identity in {sd.path}; run `drift-coord serve` once", err=True)
            raise typer.Exit(2)
        coord = sd.coordinator()
        tok, claims = sd.issue(
            sd.identity(),
            session=coord["session"],
            ticket=coord["ticket"],
            role=role,
            ttl_s=parse_duration(expires),
            mode=coord.get("mode") or "",
            relays=coord.get("relay") or (),
        )
    except DriftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(tok)
    typer.echo(f"role={claims.role} jti={claims.jti} expires={time.ctime(claims.exp)}", err=True)


@app.command("id")
def coordinator_id(
    state_dir: StateDirOpt = DEFAULT_STATE_DIR, verbose: common.VerboseOpt = False
) -> None:
    """Print the coordinator's id (its key is created on first use), before serving: what a
    listening node's --peer names it by."""
    common.setup_logging(verbose, common.COORDINATOR)
    from lightning_drift.coordinator.state import StateDir

    typer.echo(StateDir(state_dir).identity().public_hex)


@app.command()
def revoke(
    jti: str, state_dir: StateDirOpt = DEFAULT_STATE_DIR, verbose: common.VerboseOpt = False
) -> None:
    """Revoke a token by its jti; a running server closes its connections and refuses it."""
    common.setup_logging(verbose, common.COORDINATOR)
    from lightning_drift.coordinator.state import StateDir

    sd = StateDir(state_dir)
    if not (sd.path / "identity.key").exists():
        typer.echo(f"error: no identity in {sd.path}", err=True)
        raise typer.Exit(2)
    known = {c.jti for c in sd.tokens().issued()}
    sd.tokens().revoke(jti)
    note = "" if jti in known else " (not a jti this state dir issued)"
    typer.echo(f"revoked {jti}{note}")


@app.command()
def status(
    token: Annotated[
        str | None,
        typer.Option(
            help=common.with_default(
                "Observer or node token, or a file holding it.",
                f"${TOKEN_ENV}, else STATE_DIR/observer.token, else the token of the "
                "last drift join or train here",
            )
        ),
    ] = None,
    as_json: common.JsonOpt = False,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    mode: common.ModeOpt = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 15.0,
    verbose: common.VerboseOpt = False,
) -> None:
    """Show the session as a table (or JSON) via an observer connection."""
    common.setup_logging(verbose, common.COORDINATOR)
    from lightning_drift.errors import DriftError

    tok = common.status_token(token, state_dir)
    try:
        st = common.fetch_status(tok, mode=mode, timeout=timeout)
    except DriftError as exc:
        common.fail(exc, 1)
    common.show_status(st, as_json=as_json)


def main() -> None:
    common.main(app, common.COORDINATOR)


if __name__ == "__main__":
    main()
