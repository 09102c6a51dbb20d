"""Where a node's invitation token comes from: one lookup order for every entry point.

``DriftStrategy`` and the command line (``cli/common.py``) both call :func:`find_token`, so a
token is found the same way whether a node is started from Python, a LightningCLI config or
``drift join``. The boundary is here, beside the library (not in the CLI, which the library
must not import), and holds no network and no Lightning: only the environment and files.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Protocol

from lightning_drift.auth import (
    MASKED_TOKEN,
    Claims,
    read_token_file,
    token_from_environment,
    token_text,
)

log = logging.getLogger(__name__)


class _Secret(Protocol):  # jsonargparse's SecretStr, without importing it
    def get_secret_value(self) -> str: ...


def _plain(given: _Secret | str | None) -> str | None:
    """The given value as text; None for none, a blank one or one masked by a saved config."""
    value = given if given is None or isinstance(given, str) else given.get_secret_value()
    if value is None or not value.strip():
        return None
    if value.strip() == MASKED_TOKEN:
        # A config saved by LightningCLI, run again: its token was masked on purpose.
        log.info("the given token is masked; looking for it in the environment")
        return None
    return value


def token_given(given: _Secret | str | None, token_file: str | None = None) -> bool:
    """Whether a token was passed (a masked one from a saved config does not count)."""
    return bool(token_file) or _plain(given) is not None


def find_token(
    given: _Secret | str | None = None,
    *,
    token_file: str | None = None,
    files: Sequence[Path] = (),
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The token to join with, or None when there is none.

    In order: ``given`` (a token, or the path of a file holding one; a masked one from a
    saved LightningCLI config is skipped), the file ``token_file`` (ConfigError when it
    cannot be read), the ``DRIFT_TOKEN`` environment variable (a token or a file), the file
    ``DRIFT_TOKEN_FILE`` names, then the first of ``files`` that exists and is not empty
    (fallbacks a command knows of, e.g. ``STATE_DIR/observer.token``)."""
    value = _plain(given)
    if value is not None:
        return token_text(value) or None
    if token_file:
        return read_token_file(token_file)
    token = token_from_environment(environ)
    if token:
        return token
    for path in files:
        if path.is_file():
            text = path.read_text().strip()
            if text:
                return text
    return None


def reach(
    claims: Claims, mode: str | None, relay_urls: Sequence[str] = ()
) -> tuple[str, tuple[str, ...]]:
    """How to reach the coordinator that signed ``claims``: (mode, relay URLs).

    What the caller says wins; else what the token says (a coordinator in internet mode puts
    that, and its own relays, in the tokens it prints); else local mode and iroh's relays."""
    return mode or claims.mode or "local", tuple(relay_urls) or claims.relays


__all__ = ["find_token", "token_given", "reach"]
