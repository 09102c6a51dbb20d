"""Durable file writes shared by every module that keeps state on disk, and the per-user
folder for what belongs to a person rather than to a session (a node's key, a remembered
token)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from pathlib import Path

_TMP_SUFFIX = ".tmp"


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    """Hex sha256 of ``data``."""
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    """Hex sha256 of a file's content, read in ``chunk``-byte pieces (never whole)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(directory: Path) -> None:
    """Make a rename or unlink in ``directory`` durable (no-op where directories can't be
    opened, e.g. Windows)."""
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes | bytearray | memoryview, *, mode: int = 0o644) -> None:
    """Write ``data`` to ``path`` so that readers see the old content or all of the new.

    Temporary file in the same directory (created 0600, set to ``mode`` before it gets its
    name, so a secret is never readable by others), fsync it, rename over ``path``, fsync the
    directory.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=_TMP_SUFFIX)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)


def user_state_dir() -> Path:
    """This user's lightning-drift folder: ``$XDG_STATE_HOME/lightning-drift``, else
    ``~/.local/state/lightning-drift``. Not created here; whoever writes into it makes it
    (mode 0700: what it holds are secrets)."""
    base = os.environ.get("XDG_STATE_HOME", "").strip()
    root = Path(base) if base else Path.home() / ".local" / "state"
    return root / "lightning-drift"
