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

from lightning_drift.auth import TOKEN_ENV, TOKEN_FILE_ENV, read_token_file, token_text
from lightning_drift.errors import DriftError

if TYPE_CHECKING:
    import lightning_drift.protocol as p

# -- options -------------------------------------------------------------------------------------

TokenOpt = Annotated[
    str | None,
    typer.Option(
        "--token",
        "-t",
        envvar=TOKEN_ENV,
        help=f"Invitation token, or a file holding it (or {TOKEN_ENV}, or the file "
        f"{TOKEN_FILE_ENV} names).",
    ),
]
ModeOpt = Annotated[str, typer.Option(help="local (relays off) or internet.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="Full tracebacks, debug logs.")]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]

# -- the token -----------------------------------------------------------------------------------


def read_token(value: str) -> str:
    """The token itself, or the content of the file ``value`` names (tokens start ``eyJ``)."""
    return token_text(value)


def find_token(given: str | None, *, files: Sequence[Path] = ()) -> str | None:
    """The token a command runs with, or ``None`` when there is none.

    In order: ``given`` (the ``--token`` flag), the ``DRIFT_TOKEN`` environment variable (a
    token or a file holding one, either way), the file ``DRIFT_TOKEN_FILE`` names, then the
    first of ``files`` that exists and is not empty (e.g. ``STATE_DIR/observer.token``). The
    library's own lookup (``DriftStrategy``) reads the same variables in the same order."""
    for value in (given, os.environ.get(TOKEN_ENV)):
        if value and value.strip():
            return read_token(value)
    token_file = os.environ.get(TOKEN_FILE_ENV, "").strip()
    if token_file:
        return read_token_file(token_file)
    for path in files:
        if path.is_file():
            text = path.read_text().strip()
            if text:
                return text
    return None


def need_token(given: str | None, *, files: Sequence[Path] = (), hint: str = "") -> str:
    """:func:`find_token`, or a usage error (exit 2) that says where a token comes from."""
    token = find_token(given, files=files)
    if token:
        return token
    where = hint or "`drift-coord serve` prints one and writes it to STATE_DIR/node.token"
    raise typer.BadParameter(
        f"no token: pass --token or set {TOKEN_ENV} (a token or a file holding one either "
        f"way) or {TOKEN_FILE_ENV} ({where})",
        param_hint="--token",
    )


# -- logging and the error exit ------------------------------------------------------------------

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"


@dataclass(frozen=True)
class Verbosity:
    """How much a family of commands says: its log level without and with ``-v``, whether
    ``-v`` also shows the traceback of an expected error, and whether every log record is
    kept on one line (:class:`OneLineFormatter`)."""

    default: int
    verbose: int
    tracebacks: bool
    one_line: bool = False


NODE = Verbosity(default=logging.WARNING, verbose=logging.INFO, tracebacks=True)  # drift
COORDINATOR = Verbosity(
    default=logging.INFO, verbose=logging.DEBUG, tracebacks=False, one_line=True
)

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


# DRIFT_DEBUG=1 shows the traceback of every expected error; -v does for NODE commands.
_tracebacks = os.environ.get("DRIFT_DEBUG", "") not in ("", "0")


def setup_logging(verbose: bool, verbosity: Verbosity) -> None:
    """Log to stderr at the level ``verbosity`` gives with or without ``-v``; call it first
    thing in a command."""
    global _tracebacks
    _tracebacks = _tracebacks or (verbose and verbosity.tracebacks)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        OneLineFormatter(LOG_FORMAT) if verbosity.one_line else logging.Formatter(LOG_FORMAT)
    )
    logging.basicConfig(
        level=verbosity.verbose if verbose else verbosity.default, handlers=[handler]
    )


def tracebacks_wanted() -> bool:
    """Whether an expected error ends in its traceback instead of one line."""
    return _tracebacks


def fail(exc: DriftError, code: int = 1) -> NoReturn:
    """End the command on an expected error: one ``error: ...`` line on stderr and exit
    ``code``, or the exception itself when tracebacks are wanted. The message of every
    ``DriftError`` says what to do; a traceback would only bury it."""
    if _tracebacks:
        raise exc
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(code)


def main(app: typer.Typer) -> None:
    """Run ``app`` as a console script: unbuffered output, exit 130 on Ctrl-C, and a
    ``DriftError`` that escapes a command ends as :func:`fail` ends it (exit 1)."""
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    try:
        app()
    except KeyboardInterrupt:
        sys.exit(130)
    except DriftError as exc:
        if _tracebacks:
            raise
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(1)


# -- the session's status ------------------------------------------------------------------------


def fetch_status(
    token: str, *, mode: str = "local", timeout: float = 15.0, coordinator_addr: str | None = None
) -> p.SessionStatus:
    """One ``SessionStatus`` with a node or observer token (``Join.observe``: no membership).

    ``coordinator_addr`` dials that ``host:port`` instead of the token's address. Used by
    ``drift status``, ``drift join``, ``drift-coord status`` and the demo."""
    via = (coordinator_addr,) if coordinator_addr else ()
    return asyncio.run(_fetch_status(token, mode=mode, timeout=timeout, via=via))


async def _fetch_status(
    token: str, *, mode: str, timeout: float, via: tuple[str, ...]
) -> p.SessionStatus:
    from lightning_drift.node.client import CoordinatorClient

    client = await CoordinatorClient.connect(
        token, timeout=timeout, mode=mode, name="status", observe=True, via=via
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
