"""The coordinator's state directory: everything a restart needs, written atomically.

Layout of ``--state-dir``::

    identity.key      the coordinator's Ed25519 seed (auth.Identity; also its iroh key), 0600
    tokens.json       issued token claims and revoked jtis (auth.TokenStore)
    coordinator.json  the address the server advertises: ticket, port, bind, mode, relays,
                      checkpoint dir (when not the default), session id; a restart falls
                      back to them for the flags it is not given
    state.json        the session: its own facts (config, completed round, epoch) and each of
                      its parts as itself (roster, paces, epoch book, re-plans, stops,
                      scheduler; ``session.SessionRecord``), rewritten after each completed
                      round once its checkpoint is durable
    node.token        the node invitation token printed by ``serve`` (0600)
    observer.token    an observer token for ``drift-coord status`` (0600)

Every write goes to a temporary file that is fsynced and renamed over the old one, so a
SIGKILL at any moment leaves the old content or the new, never half of either.
"""

from __future__ import annotations

import json
import logging
import secrets
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_drift.auth import Claims, Identity, TokenStore, issue_token, verify_token
from lightning_drift.errors import AuthError, ConfigError
from lightning_drift.fsutil import atomic_write

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
COORDINATOR_FILE = "coordinator.json"
NODE_TOKEN_FILE = "node.token"
OBSERVER_TOKEN_FILE = "observer.token"
STATE_VERSION = 1


def write_private(path: Path, data: bytes) -> None:
    """Atomic write, then mode 0600 (tokens and keys are secrets)."""
    atomic_write(path, data, mode=0o600)


def _read_json(path: Path, fix: str) -> dict[str, Any] | None:
    """A JSON object file of the state dir; None when absent; ConfigError naming ``fix``."""
    try:
        doc = json.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except ValueError as exc:
        raise ConfigError(f"{path} is damaged ({exc}); {fix}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{path} is damaged (not a JSON object); {fix}")
    return doc


class StateDir:
    """One coordinator's state directory (see the module docstring for the files)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)

    def ensure(self) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
        self.path.chmod(0o700)

    def identity(self) -> Identity:
        self.ensure()
        return Identity.load_or_create(self.path)

    def tokens(self) -> TokenStore:
        return TokenStore(self.path)

    # -- the session ----------------------------------------------------------------------
    def load_session(self) -> dict[str, Any] | None:
        """The saved session, or None on a first start."""
        p = self.path / STATE_FILE
        doc = _read_json(
            p,
            "restore it from a backup or move it aside to start a new session with the same "
            "identity",
        )
        if doc is None:
            return None
        if doc.get("version") != STATE_VERSION:
            raise ConfigError(f"{p} has version {doc.get('version')!r}, expected {STATE_VERSION}")
        return doc["session"]

    def save_session(self, session: dict[str, Any]) -> None:
        doc = {"version": STATE_VERSION, "saved_at": time.time(), "session": session}
        atomic_write(self.path / STATE_FILE, json.dumps(doc, sort_keys=True).encode())

    # -- the advertised address -----------------------------------------------------------
    def save_coordinator(self, info: dict[str, Any]) -> None:
        atomic_write(self.path / COORDINATOR_FILE, json.dumps(info, indent=1).encode())

    def stored_coordinator(self) -> dict[str, Any] | None:
        """coordinator.json as the last start wrote it, or None before the first start."""
        return _read_json(
            self.path / COORDINATOR_FILE,
            "move it aside and give the --port, --mode, --bind and --relay of the first start "
            "(another address means new tokens)",
        )

    def coordinator(self) -> dict[str, Any]:
        """coordinator.json; ConfigError before the first start."""
        doc = self.stored_coordinator()
        if doc is None:
            raise ConfigError(
                f"{self.path / COORDINATOR_FILE} does not exist: start `drift-coord serve "
                f"--state-dir {self.path}` once so that the address it advertises is known"
            )
        return doc

    # -- tokens ---------------------------------------------------------------------------
    def issue(
        self,
        identity: Identity,
        *,
        session: str,
        ticket: str,
        role: str = "node",
        ttl_s: float = 86400.0,
        now: float | None = None,
        mode: str = "",
        relays: Sequence[str] = (),
    ) -> tuple[str, Claims]:
        """Issue a token and record its claims in tokens.json. ``mode`` and ``relays``: how
        the coordinator is reached, carried in the token so that nodes need not repeat them."""
        now = time.time() if now is None else now
        token = issue_token(
            identity,
            session=session,
            coordinator=ticket,
            role=role,
            ttl_s=ttl_s,
            now=now,
            jti=secrets.token_hex(8),
            mode=mode,
            relays=relays,
        )
        claims = verify_token(token, identity.public_key, now=now, session=session)
        self.tokens().record(claims)
        return token, claims

    def standing_token(
        self,
        identity: Identity,
        *,
        session: str,
        ticket: str,
        role: str,
        ttl_s: float,
        now: float,
        min_left_s: float = 3600.0,
        mode: str = "",
        relays: Sequence[str] = (),
    ) -> str:
        """The token in ``<role>.token`` if it is still good (same ticket, mode and relays,
        not revoked, not expiring within ``min_left_s``), else a fresh one written there.
        Reusing it is what keeps the token printed before a restart working after it (an
        older token keeps working either way: only the printed one changes)."""
        path = self.path / (NODE_TOKEN_FILE if role == "node" else OBSERVER_TOKEN_FILE)
        try:
            old = path.read_text().strip()
            claims = verify_token(
                old, identity.public_key, now=now + min_left_s, session=session, roles=(role,)
            )
            same = (claims.coordinator, claims.mode, claims.relays) == (
                ticket,
                mode,
                tuple(relays),
            )
            if same and claims.jti not in self.tokens().revoked():
                return old
        except (FileNotFoundError, AuthError):
            pass
        token, _ = self.issue(
            identity,
            session=session,
            ticket=ticket,
            role=role,
            ttl_s=ttl_s,
            now=now,
            mode=mode,
            relays=relays,
        )
        write_private(path, (token + "\n").encode())
        return token


def coordinator_record(
    o: Any, addrs: Sequence[str], ticket: str, host: str, key: str, session: str
) -> dict[str, Any]:
    """What `drift-coord serve` falls back to on a restart without these flags (``o``: its
    ServeOptions): the same port, mode, bind address and relays give the same ticket, so
    tokens keep working."""
    port = o.port
    if port == 0:  # the OS chose: store that one, so a restart binds it again
        ports = {int(a.rsplit(":", 1)[1]) for a in addrs}
        port = ports.pop() if len(ports) == 1 else 0
    return {
        "ticket": ticket,
        "port": port,
        "bind": host,
        "mode": o.mode,
        "relay": list(o.relay),
        "checkpoint_dir": str(Path(o.checkpoint_dir).resolve()) if o.checkpoint_dir else None,
        "session": session,
        "key": key,
        "peers": list(o.peers),
    }


def upgrade_v1(d: dict[str, Any], fields: Sequence[str]) -> dict[str, Any]:
    """A session saved before the parts kept themselves (``d``, from ``state.json``), in
    today's shape: a ``SessionRecord`` of ``fields``."""
    members = d.get("members", {})
    return {
        **{k: d[k] for k in fields if k in d and k != "scheduler"},
        "scheduler": d.get("scheduler"),
        "roster": {
            "members": {n: {**m, "node": n} for n, m in members.items()},
            "admitted": d.get("admitted", []),
            "banned": d.get("banned", {}),
        },
        "paces": {
            "nodes": {
                n: {
                    "reported": m.get("rate", 0.0),
                    "smoothed": m.get("pace", 0.0),
                    "measured": m.get("vouched", 0.0),
                }
                for n, m in members.items()
            }
        },
        "epochs": {
            k: d[k]
            for k in ("plan", "assignments", "late", "orphans", "trained", "counted")
            if k in d
        },
        "replans": {"revision": d.get("revision", 0), "round": d.get("rebalanced_round", -1)},
        "stop": d.get("stop") or {},
    }


__all__ = ["StateDir", "coordinator_record", "upgrade_v1", "write_private"]
