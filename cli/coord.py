"""``drift-coord``: run a coordinator (serve), issue and revoke tokens, show the session.

Every ``serve`` flag can also come from ``--config train.yaml``: its ``coordinator:`` mapping
holds serve options (flag names with underscores); the rest of the YAML (model, data,
trainer) is a LightningCLI config handed to nodes for ``drift join``. A flag given on the
command line wins over the file, the file over the built-in default. On a restart (the state
dir already holds a coordinator) the address options not given either way (port, mode, bind,
relay, checkpoint dir) come from the state dir instead of the defaults, so the address in the
tokens stays right; the session's settings always come from its saved state.
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
from typing import Annotated, Any

import typer
from lightning_drift_cli import common

from lightning_drift.auth import TOKEN_ENV

app = typer.Typer(
    help="Coordinator of a lightning-drift session.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_STATE_DIR = Path("drift-state")

# name → (built-in default, type) for every serve option that the config file may also set
SERVE_DEFAULTS: dict[str, tuple[Any, type]] = {
    "port": (7842, int),
    "bind": (None, str),
    "mode": ("local", str),
    "relay": ([], list),
    "state_dir": (str(DEFAULT_STATE_DIR), str),
    "checkpoint_dir": (None, str),
    "min_nodes": (1, int),
    "epochs": (1, int),
    "batch_size": (32, int),
    "sync_every": (100, int),
    "aggregation": ("mean", str),
    "outer_lr": (0.7, float),
    "outer_momentum": (0.9, float),
    "quorum": (0.5, float),
    "heartbeat_timeout": (15.0, float),
    "heartbeat_s": (5.0, float),
    "progress_every_s": (5.0, float),
    "deadline_margin": (1.5, float),
    "deadline_floor": (10.0, float),
    "dataset_size": (0, int),
    "seed": (0, int),
    "transfer_dtype": ("float32", str),
    "min_vram": (0, str),  # a size: 8GiB, 512MiB or bytes
    "exit_when_done": (True, bool),
    "keep": (5, int),
    "max_model_mb": (0, int),
    "token_ttl": ("7d", str),  # a duration; resolved to seconds
}

# Serve options a restart takes from STATE_DIR/coordinator.json when they are not given:
# together with the identity they make the ticket, and so the address in the tokens.
STORED_OPTIONS = ("port", "mode", "bind", "relay", "checkpoint_dir")


def resolve_serve_options(
    flags: dict[str, Any], config: Path | None, notes: list[str] | None = None
) -> tuple[dict, str]:
    """Merge flags (None = not given) over the config file's ``coordinator:`` mapping over the
    defaults. Returns (options, LightningCLI YAML of the rest of the file).

    When the state dir already holds a coordinator, :data:`STORED_OPTIONS` not given as a
    flag or in the file come from its ``coordinator.json``, and session options given with
    values other than the saved session's are reported: the saved ones are used. Both are
    appended to ``notes``: lines for the operator, which ``serve`` prints to stderr.
    """
    import yaml

    from lightning_drift.coordinator.state import parse_duration, parse_size
    from lightning_drift.errors import ConfigError

    file_opts: dict[str, Any] = {}
    lightning_yaml = ""
    if config is not None:
        try:
            doc = yaml.safe_load(Path(config).read_text()) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise ConfigError(f"cannot read --config {config}: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"--config {config} must be a YAML mapping")
        file_opts = dict(doc.pop("coordinator", None) or {})
        unknown = sorted(k for k in file_opts if k.replace("-", "_") not in SERVE_DEFAULTS)
        if unknown:
            raise ConfigError(
                f"unknown coordinator option(s) in {config}: {', '.join(unknown)}; "
                f"known: {', '.join(sorted(SERVE_DEFAULTS))}"
            )
        file_opts = {k.replace("-", "_"): v for k, v in file_opts.items()}
        if doc:
            lightning_yaml = yaml.safe_dump(doc, sort_keys=False)
    out: dict[str, Any] = {}
    given: set[str] = set()
    for name, (default, kind) in SERVE_DEFAULTS.items():
        v = flags.get(name)
        if v is None or (kind is list and not v):
            v = file_opts.get(name, default)
            if name in file_opts:
                given.add(name)
        else:
            given.add(name)
        if v is not None and kind is not list:
            try:
                v = kind(v)
            except (TypeError, ValueError):
                raise ConfigError(f"option {name}={v!r} is not a {kind.__name__}") from None
        if kind is list and isinstance(v, str):
            v = [v]
        out[name] = v
    out["token_ttl"] = parse_duration(str(out["token_ttl"]))
    out["min_vram"] = parse_size(out["min_vram"])
    if out["mode"] not in ("local", "internet"):
        raise ConfigError(f"--mode must be local or internet, got {out['mode']!r}")
    if out["aggregation"] not in ("mean", "diloco"):
        raise ConfigError(f"--aggregation must be mean or diloco, got {out['aggregation']!r}")
    if out["transfer_dtype"] not in ("float32", "bfloat16"):
        raise ConfigError("--transfer-dtype must be float32 or bfloat16")
    if not 0 < out["quorum"] <= 1:
        raise ConfigError(f"--quorum must be in (0, 1], got {out['quorum']}")
    if out["keep"] < 2:
        raise ConfigError(
            "--keep must be at least 2: after a crash between a checkpoint and the state file "
            "the previous checkpoint is the one a restart resumes from"
        )
    if out["max_model_mb"] < 0:
        raise ConfigError("--max-model-mb must be 0 (half of the RAM) or a size in MiB")
    if out["heartbeat_timeout"] <= 0:
        raise ConfigError("--heartbeat-timeout must be positive")
    # Nodes ping every heartbeat_s; several pings must fit in the timeout or a healthy node
    # is declared lost between two of them.
    out["heartbeat_s"] = min(out["heartbeat_s"], out["heartbeat_timeout"] / 3)
    restart_notes = _from_state_dir(out, given, lightning_yaml if config is not None else None)
    if notes is not None:
        notes.extend(restart_notes)
    return out, lightning_yaml


def _from_state_dir(out: dict[str, Any], given: set[str], lightning_yaml: str | None) -> list[str]:
    """Fill in the stored address options of an existing state dir; compare session options.

    Changes ``out`` in place; returns the lines that tell the operator what happened."""
    from lightning_drift.coordinator.session import SessionConfig
    from lightning_drift.coordinator.state import COORDINATOR_FILE, StateDir

    sd = StateDir(Path(out["state_dir"]))
    stored = sd.stored_coordinator()
    lines: list[str] = []
    if stored is not None:
        taken = []
        for name in STORED_OPTIONS:
            if name in given or stored.get(name) is None:
                continue
            value = list(stored[name]) if name == "relay" else stored[name]
            if name in ("bind", "relay") and stored.get("mode") != out["mode"]:
                continue  # they belong to the stored mode, not to the one given now
            if name == "bind" and value == ("127.0.0.1" if out["mode"] == "local" else "0.0.0.0"):
                continue  # the default
            if value != out[name]:
                out[name] = value
                taken.append(f"--{name.replace('_', '-')} {_show(value)}")
        if taken:
            lines.append(
                f"restart: from {sd.path / COORDINATOR_FILE} (not given on the command line "
                f"or in --config): {', '.join(taken)}"
            )
    saved = sd.load_session()
    if saved is not None:
        config = SessionConfig.from_dict(saved.get("config", {}))
        differ = []
        for name in sorted(given):
            if not hasattr(config, name):
                continue
            was = getattr(config, name)
            if out[name] != was:
                differ.append(
                    f"--{name.replace('_', '-')} {_show(out[name])} (saved: {_show(was)})"
                )
        if lightning_yaml and lightning_yaml != config.lightning_config:
            differ.append("the LightningCLI part of --config (nodes get the saved one)")
        if differ:
            lines.append(
                f"warning: session {saved.get('session_id', '?')} in {sd.path} is resumed with "
                f"its saved settings; ignored: {'; '.join(differ)}. To start a new session "
                f"with these settings, move {sd.path / 'state.json'} aside."
            )
    return lines


def _show(v: Any) -> str:
    if isinstance(v, list):
        return " ".join(str(x) for x in v) or "(none)"
    return str(v)


@app.command()
def serve(
    port: Annotated[int | None, typer.Option(help="UDP port (fixed: keeps the address).")] = None,
    bind: Annotated[
        str | None, typer.Option(help="Bind address; local mode default 127.0.0.1.")
    ] = None,
    mode: Annotated[str | None, typer.Option(help="local (relays off) or internet.")] = None,
    relay: Annotated[list[str] | None, typer.Option(help="Relay URL (repeatable).")] = None,
    state_dir: Annotated[Path | None, typer.Option(help="Identity, tokens, session.")] = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Checkpoints; default STATE_DIR/checkpoints.")
    ] = None,
    min_nodes: Annotated[int | None, typer.Option(help="Nodes needed to start.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs to train.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Per-node batch size.")] = None,
    sync_every: Annotated[int | None, typer.Option(help="Steps per round (avg node).")] = None,
    aggregation: Annotated[str | None, typer.Option(help="mean or diloco.")] = None,
    quorum: Annotated[float | None, typer.Option(help="Fraction needed at deadline.")] = None,
    heartbeat_timeout: Annotated[
        float | None, typer.Option(help="Seconds of silence before a node is lost.")
    ] = None,
    dataset_size: Annotated[
        int | None, typer.Option(help="Samples; default: the first node's.")
    ] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of the epoch permutations.")] = None,
    transfer_dtype: Annotated[str | None, typer.Option(help="float32 or bfloat16.")] = None,
    outer_lr: Annotated[float | None, typer.Option(help="DiLoCo outer learning rate.")] = None,
    outer_momentum: Annotated[
        float | None, typer.Option(help="DiLoCo outer Nesterov momentum.")
    ] = None,
    deadline_margin: Annotated[
        float | None, typer.Option(help="Straggler deadline: expected round time × this.")
    ] = None,
    deadline_floor: Annotated[
        float | None, typer.Option(help="Straggler deadline never shorter than this (s).")
    ] = None,
    min_vram: Annotated[
        str | None,
        typer.Option(help="Refuse GPU nodes with less VRAM: 8GiB, 512MiB or bytes."),
    ] = None,
    keep: Annotated[int | None, typer.Option(help="Checkpoints kept (at least 2).")] = None,
    max_model_mb: Annotated[
        int | None,
        typer.Option(help="Largest start-up weights accepted (MiB; 0 = half of the RAM)."),
    ] = None,
    token_ttl: Annotated[
        str | None, typer.Option(help="Lifetime of the printed node/observer tokens: 24h, 7d...")
    ] = None,
    config: Annotated[
        Path | None, typer.Option(help="YAML: `coordinator:` options + LightningCLI config.")
    ] = None,
    exit_when_done: Annotated[
        bool | None, typer.Option("--exit-when-done/--stay", help="Exit after the last round.")
    ] = None,
    verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False,
) -> None:
    """Run the coordinator: print the node token, serve rounds, show the live view."""
    from lightning_drift.coordinator.server import Coordinator
    from lightning_drift.errors import DriftError

    flags = dict(locals())
    common.setup_logging(verbose, common.COORDINATOR)
    notes: list[str] = []
    try:
        o, lightning_yaml = resolve_serve_options(flags, config, notes)
        sc, opts = build_serve(o, lightning_yaml)
        coord = Coordinator(sc, opts)
    except DriftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    for line in notes:
        typer.echo(line, err=True)
    try:
        asyncio.run(_serve(coord))
    except DriftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    except KeyboardInterrupt:
        raise typer.Exit(130) from None
    if coord.fatal:
        typer.echo(
            f"error: {coord.fatal}; start `drift-coord serve` again with the same --state-dir "
            "to resume from the last saved round (nodes reconnect on their own)",
            err=True,
        )
        raise typer.Exit(1)


def build_serve(o: dict[str, Any], lightning_yaml: str = ""):
    """(SessionConfig, ServeOptions) from :func:`resolve_serve_options`' result."""
    from lightning_drift.coordinator.server import ServeOptions
    from lightning_drift.coordinator.session import SessionConfig

    sc = SessionConfig.from_dict({**o, "lightning_config": lightning_yaml})
    opts = ServeOptions(
        state_dir=Path(o["state_dir"]),
        checkpoint_dir=Path(o["checkpoint_dir"]) if o["checkpoint_dir"] else None,
        port=o["port"],
        bind=o["bind"],
        mode=o["mode"],
        relay=list(o["relay"] or []),
        exit_when_done=o["exit_when_done"],
        keep=o["keep"],
        token_ttl_s=o["token_ttl"],
        max_model_bytes=o["max_model_mb"] << 20,
    )
    return sc, opts


async def _serve(coord: Any) -> None:
    loop = asyncio.get_running_loop()
    await coord.start()
    try:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, coord.stop)
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
    from lightning_drift.coordinator.monitor import render_lines, render_table

    if sys.stdout.isatty():
        from rich.live import Live

        with Live(render_table(coord.status()), refresh_per_second=2, transient=False) as live:
            while True:
                await asyncio.sleep(1.0)
                live.update(render_table(coord.status()))
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
                with contextlib.suppress(queue.Full):
                    out.put_nowait(render_lines(st))


StateDirOpt = Annotated[
    Path, typer.Option("--state-dir", help="The coordinator's state directory.")
]


@app.command()
def token(
    role: Annotated[str, typer.Option(help="node or observer.")] = "node",
    expires: Annotated[str, typer.Option(help="Lifetime: 90m, 24h, 7d...")] = "24h",
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
) -> None:
    """Issue another token from the state dir's identity (the server need not run)."""
    from lightning_drift.coordinator.state import StateDir, parse_duration
    from lightning_drift.errors import DriftError

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
        )
    except DriftError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    typer.echo(tok)
    typer.echo(f"role={claims.role} jti={claims.jti} expires={time.ctime(claims.exp)}", err=True)


@app.command()
def revoke(jti: str, state_dir: StateDirOpt = DEFAULT_STATE_DIR) -> None:
    """Revoke a token by its jti; a running server refuses it from the next Join on."""
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
            help=f"Observer or node token, or a file holding it; default ${TOKEN_ENV}, "
            "else STATE_DIR/observer.token."
        ),
    ] = None,
    as_json: common.JsonOpt = False,
    state_dir: StateDirOpt = DEFAULT_STATE_DIR,
    mode: common.ModeOpt = "local",
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 15.0,
) -> None:
    """Show the session as a table (or JSON) via an observer connection."""
    from lightning_drift.errors import DriftError

    observer = Path(state_dir) / "observer.token"
    tok = common.need_token(
        token,
        files=[observer],
        hint=f"none in {observer} either; `drift-coord token --role observer` issues one",
    )
    try:
        st = common.fetch_status(tok, mode=mode, timeout=timeout)
    except DriftError as exc:
        common.fail(exc, 1)
    common.show_status(st, as_json=as_json)


def main() -> None:
    common.main(app)


if __name__ == "__main__":
    main()
