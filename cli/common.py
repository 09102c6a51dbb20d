"""What ``drift`` and ``drift-coord`` share: options, the token, logging, the error exit.

Every command that takes a token finds it with :func:`find_token` (flag, then the
environment, then files the command names) and every command sets its logging with
:func:`setup_logging`; the console scripts run their app with :func:`main`, which turns an
expected error (``DriftError``) into one ``error: ...`` line. A new shared flag or environment
variable belongs here, in one place.

Importing this module must stay cheap (no Lightning, no torch, no iroh): ``--help`` pays
for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from rich.markup import escape

from lightning_drift.auth import TOKEN_ENV, TOKEN_FILE_ENV, token_text
from lightning_drift.coordinator.config import SETTING
from lightning_drift.errors import ConfigError, DriftError
from lightning_drift.fsutil import atomic_write, user_state_dir
from lightning_drift.node.token import find_token as lookup_token

if TYPE_CHECKING:
    import lightning_drift.protocol as p

# -- options -------------------------------------------------------------------------------------


def with_default(help: str, default: str) -> str:
    """An option's help with its effective default, shown as ``[default: …]`` (how ``--help``
    shows every default, including those a value of None stands for)."""
    return f"{help} {escape(f'[default: {default}]')}"


# No envvar= here: find_token reads DRIFT_TOKEN itself, so a command can tell a token typed
# on its command line from one in the environment.
TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        "-t",
        help=with_default(
            f"Invitation token, or a file holding it (or the file {TOKEN_FILE_ENV} names).",
            f"${TOKEN_ENV}; none with --peer or --listen",
        ),
    ),
]
ModeOpt = Annotated[
    str | None,
    typer.Option(
        help=with_default(
            "local (relays off) or internet: overrides what the token says.",
            "the token's mode (local for a token that names none)",
        ),
    ),
]
JsonOpt = Annotated[
    bool, typer.Option("--json", help=with_default("Print JSON instead of a table.", "off"))
]

# -- the token -----------------------------------------------------------------------------------

# `drift join` and `drift train` remember the token they ran with here, so that a later
# `drift status` on the same machine finds the session without being told.
REMEMBERED_TOKEN = "last.token"
DEFAULT_STATE_DIR: Path = SETTING["state_dir"].default  # drift-coord serve's
OBSERVER_TOKEN = "observer.token"


def read_token(value: str) -> str:
    """The token itself, or the content of the file ``value`` names (tokens start ``eyJ``)."""
    return token_text(value)


def remembered_token_path() -> Path:
    """Where :func:`remember_token` keeps the token of the last ``drift join``/``train``."""
    return user_state_dir() / REMEMBERED_TOKEN


def remember_token(token: str) -> None:
    """Keep ``token`` (mode 0600, in the user's own folder) for a later ``drift status``.

    Best effort: a node trains all the same when its home is read-only."""
    path = remembered_token_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write(path, (token.strip() + "\n").encode(), mode=0o600)
    except OSError as exc:
        logging.getLogger(__name__).debug("token not remembered path=%s error=%r", path, exc)


def find_token(
    given: str | None, *, files: Sequence[Path] = (), remembered: bool = False
) -> str | None:
    """The token a command runs with, or ``None`` when there is none. Every command that
    takes a token looks it up here.

    The library's one lookup order (:func:`lightning_drift.node.token.find_token`, the one
    ``DriftStrategy`` uses): ``given`` (the ``--token`` flag), the ``DRIFT_TOKEN`` environment
    variable (a token or a file holding one, either way), the file ``DRIFT_TOKEN_FILE`` names,
    then the first of ``files`` that exists and is not empty (e.g.
    ``STATE_DIR/observer.token``), then, with ``remembered``, the token of the last ``drift
    join`` or ``drift train`` on this machine (:func:`remember_token`)."""
    fallbacks = [*files, *([remembered_token_path()] if remembered else [])]
    return lookup_token(given, files=fallbacks)


def need_token(
    given: str | None, *, files: Sequence[Path] = (), remembered: bool = False, hint: str = ""
) -> str:
    """:func:`find_token`, or a usage error (exit 2) that says where a token comes from."""
    token = find_token(given, files=files, remembered=remembered)
    if token:
        return token
    where = hint or "`drift-coord serve` prints one and writes it to STATE_DIR/node.token"
    raise typer.BadParameter(
        f"no token: pass --token or set {TOKEN_ENV} (a token or a file holding one either "
        f"way) or {TOKEN_FILE_ENV} ({where})",
        param_hint="--token",
    )


def status_token(given: str | None, state_dir: Path) -> str:
    """The token ``drift status`` and ``drift-coord status`` show the session with: the flag,
    ``DRIFT_TOKEN``, ``STATE_DIR/observer.token``, then the token of the last ``drift join``
    or ``drift train`` here; a usage error that says so when none of them has one."""
    observer = Path(state_dir) / OBSERVER_TOKEN
    return need_token(
        given,
        files=[observer],
        remembered=True,
        hint=f"none in {observer}, none remembered from a `drift join`; "
        "`drift-coord token --role observer` issues one",
    )


# -- how a node reaches its coordinator ----------------------------------------------------------


@dataclass(frozen=True)
class NodeLink:
    """How a node command reaches its coordinator: with a token, or without one by the
    coordinator's id (``peer``: the node dials it, or, with ``listen``, waits for its dial).
    ``listen`` is ``"HOST:PORT"``, ``""`` for the default address, or None (the node dials).
    ``key_file``: the node's lasting key, for the ways without a token."""

    token: str | None
    peer: str | None = None
    listen: str | None = None
    key_file: str | None = None
    mode: str | None = None
    coordinator_addr: str | None = None


# -- logging and the error exit ------------------------------------------------------------------

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
LOG_ENV = "DRIFT_LOG"  # debug, info, warning or error: the log level of every command
LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


@dataclass(frozen=True)
class Verbosity:
    """How much a family of commands says when neither ``-v`` nor ``DRIFT_LOG`` says more, and
    whether every log record is kept on one line (:class:`OneLineFormatter`)."""

    default: int
    one_line: bool = False


NODE = Verbosity(default=logging.WARNING)  # drift, drift-node: Lightning's own output shows
COORDINATOR = Verbosity(default=logging.INFO, one_line=True)  # drift-coord: a server's log

# Control and invisible formatting characters: escaped in one-line logs.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2066-\u2069]")


class OneLineFormatter(logging.Formatter):
    """A record's message on one line: newlines, escape sequences and other control or bidi
    characters are written as ``\\n``, ``\\x1b``, ... So text that came from a node (whatever
    reached a log line unfiltered) can neither drive the terminal nor forge another line. A
    traceback, which the process itself wrote, keeps its lines."""

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 (logging's name)
        record.message = _UNSAFE.sub(_escape, record.message)
        return super().formatMessage(record)


def _escape(m: re.Match[str]) -> str:
    ch = m.group()
    if ch == "\n":
        return "\\n"
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


VerboseOpt = Annotated[
    bool,
    typer.Option(
        "--verbose",
        "-v",
        help=with_default(
            f"Debug logs, and full tracebacks of errors (the same as {LOG_ENV}=debug).", "off"
        ),
    ),
]

# Whether an expected error ends in its traceback: DRIFT_DEBUG=1 turns it on, and so does the
# debug level (:func:`setup_logging`). Read it through :func:`tracebacks_wanted`.
tracebacks = os.environ.get("DRIFT_DEBUG", "") not in ("", "0")


def log_level(verbose: bool, verbosity: Verbosity) -> int:
    """The level a command logs at: debug with ``-v``, else ``DRIFT_LOG``, else the family's.

    ConfigError for a ``DRIFT_LOG`` that names no level."""
    if verbose:
        return logging.DEBUG
    raw = os.environ.get(LOG_ENV, "").strip().lower()
    if not raw:
        return verbosity.default
    if raw not in LEVELS:
        raise ConfigError(
            f"{LOG_ENV}={raw!r} is not a log level: use {', '.join(LEVELS)} (or unset it)"
        )
    return LEVELS[raw]


def setup_logging(verbose: bool, verbosity: Verbosity) -> None:
    """Log to stderr at :func:`log_level`; call it first thing in a command (again is fine).

    At the debug level an expected error also ends in its traceback."""
    global tracebacks
    level = log_level(verbose, verbosity)
    tracebacks = tracebacks or level <= logging.DEBUG
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        OneLineFormatter(LOG_FORMAT) if verbosity.one_line else logging.Formatter(LOG_FORMAT)
    )
    logging.basicConfig(level=level, handlers=[handler], force=True)


def tracebacks_wanted() -> bool:
    """Whether an expected error ends in its traceback instead of one line."""
    return tracebacks


def fail(exc: DriftError, code: int = 1) -> NoReturn:
    """End the command on an expected error: one ``error: ...`` line on stderr and exit
    ``code``, or the exception itself when tracebacks are wanted. The message of every
    ``DriftError`` says what to do; a traceback would only bury it."""
    if tracebacks:
        raise exc
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code)


def bare_options(args: Sequence[str], options: Sequence[str]) -> list[str]:
    """``args`` with each of ``options`` that is given without a value (it is last, or the
    next word is another option) written as ``--option=`` (an empty value).

    This is how ``drift train --resume`` (no value: the checkpoint dir's ``last.ckpt``) and
    ``drift train --resume PATH`` are both accepted: the parser itself has no options whose
    value may be left out."""
    out = list(args)
    for i, word in enumerate(out):
        if word in options and (i + 1 == len(out) or out[i + 1].startswith("-")):
            out[i] = f"{word}="
    return out


def main(
    app: typer.Typer, verbosity: Verbosity = NODE, *, optional_values: Sequence[str] = ()
) -> None:
    """Run ``app`` as a console script: logging at ``DRIFT_LOG`` (or ``verbosity``'s level),
    unbuffered output, exit 130 on Ctrl-C, and a ``DriftError`` that escapes a command ends
    as :func:`fail` ends it (exit 1). A ``DRIFT_LOG`` that names no level is a usage error;
    no arguments at all show the help (exit 0). ``optional_values``: options whose value may
    be left out (see :func:`bare_options`)."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        setup_logging(False, verbosity)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
    try:
        # A bare command shows its help and succeeds: nothing was asked, nothing failed.
        app(args=bare_options(sys.argv[1:], optional_values) or ["--help"])
    except KeyboardInterrupt:
        sys.exit(130)
    except DriftError as exc:
        if tracebacks:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


# -- the session's status ------------------------------------------------------------------------


def fetch_status(
    token: str | None,
    *,
    mode: str | None = None,
    timeout: float = 15.0,
    coordinator_addr: str | None = None,
    peer: str | None = None,
    key_file: str | None = None,
) -> p.SessionStatus:
    """One ``SessionStatus`` with a node or observer token (``Join.observe``: no membership),
    or, with no token, as the node ``key_file`` names to the coordinator ``peer`` (it must
    have this node in its ``--peers``).

    ``coordinator_addr`` dials that ``host:port`` instead of the token's or peer's address.
    Used by ``drift status``, ``drift join``, ``drift-coord status`` and the demo."""
    via = (coordinator_addr,) if coordinator_addr else ()
    return asyncio.run(
        _fetch_status(token, mode=mode, timeout=timeout, via=via, peer=peer, key_file=key_file)
    )


async def _fetch_status(
    token: str | None,
    *,
    mode: str | None,
    timeout: float,
    via: tuple[str, ...],
    peer: str | None,
    key_file: str | None,
) -> p.SessionStatus:
    from lightning_drift.node.client import CoordinatorClient

    if token:
        client = await CoordinatorClient.connect(
            token, timeout=timeout, mode=mode, name="status", observe=True, via=via
        )
    else:
        from lightning_drift.auth import node_identity

        assert peer, "a status without a token needs the coordinator's id"
        client = await CoordinatorClient.join_peer(
            peer,
            secret=node_identity(key_file).seed,
            timeout=timeout,
            mode=mode,
            name="status",
            observe=True,
            via=via,
        )
    try:
        return await asyncio.wait_for(client.status(), timeout)
    finally:
        await client.close("status done")


def show_status(status: p.SessionStatus, *, as_json: bool) -> None:
    """Print ``status`` as JSON or as the operator's table."""
    from lightning_drift.coordinator.monitor import render_json, render_table

    if as_json:
        typer.echo(render_json(status))
        return
    from rich.console import Console

    Console().print(render_table(status))
