"""Coordinator identity and invitation tokens. Pure, except for the key and token files on disk.

The coordinator's Ed25519 key is both its iroh endpoint key and the key that signs invitation
tokens, so a node that checks the QUIC peer it reached against the ``coordinator`` ticket in its
token knows it talks to the coordinator that invited it.

Token format (``docs/protocol.md`` has the details)::

    token  = base64url(outer)                      # unpadded; starts with "eyJ"
    outer  = {"claims": "<claims JSON text>", "sig": "<base64url Ed25519 signature>"}
    claims = {"coordinator", "exp", "iat", "jti", "role", "session", "v"}   # sorted, compact
             + optional "mode" and "relays": how to reach the coordinator (internet mode,
               its own relays), so a node need not be told again; absent in older tokens

The signature covers the exact UTF-8 bytes of the claims text, so a verifier never
re-serialises anything. Decoding is strict: a token that is not canonical base64url, or whose
JSON does not have exactly the shape above, is malformed. Nothing here reads the clock: every
check takes ``now`` (seconds since the epoch) from the caller.
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import os
import secrets
import stat
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cachetools
import nacl.exceptions
import nacl.signing

from lightning_drift.errors import AuthError, ConfigError
from lightning_drift.fsutil import atomic_write, user_state_dir
from lightning_drift.text import short_id

log = logging.getLogger(__name__)

TOKEN_ENV = "DRIFT_TOKEN"  # the environment variable every entry point reads a token from
TOKEN_FILE_ENV = "DRIFT_TOKEN_FILE"  # ... or the path of a file holding it
# How LightningCLI (jsonargparse's SecretStr) writes a secret into a saved config.yaml.
MASKED_TOKEN = "**********"
TOKEN_VERSION = 1
ROLES = ("node", "observer")
MODES = ("local", "internet")  # the transport modes a token's "mode" claim may name
MAX_RELAYS = 16  # relay URLs a token may carry
MAX_RELAY_URL = 2048
CLOCK_SKEW_S = 300.0  # a token issued up to this far in the verifier's future is accepted
CACHE_TTL_S = 600.0  # a cached verification is redone at least this often
_KEY_FILE = "identity.key"
_TOKENS_FILE = "tokens.json"


def b64url_encode(data: bytes) -> str:
    """``data`` as unpadded base64url: the spelling of every part of a token."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64d(text: str, what: str) -> bytes:
    """Strict base64url: alphabet checked, padding optional, and canonical.

    Canonical matters: in the last character of an unpadded string some bits are unused, and
    a lenient decoder maps several spellings to the same bytes. Requiring the re-encoding to
    equal the input means every changed character changes the decoded bytes or is refused.
    """
    bare = text.rstrip("=")
    try:
        data = base64.b64decode(bare + "=" * (-len(bare) % 4), altchars=b"-_", validate=True)
    except (binascii.Error, ValueError) as exc:
        raise AuthError(f"malformed token: {what} is not base64url ({exc})") from None
    if b64url_encode(data) != bare:
        raise AuthError(f"malformed token: {what} is not canonical base64url")
    return data


def _iso(t: float) -> str:
    return datetime.fromtimestamp(t, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class Identity:
    """The coordinator's Ed25519 key. ``seed`` is also its iroh ``SecretKey`` bytes."""

    def __init__(self, seed: bytes) -> None:
        if len(seed) != 32:
            raise ValueError(f"an Ed25519 seed is 32 bytes, got {len(seed)}")
        self.seed = bytes(seed)
        self._signing = nacl.signing.SigningKey(self.seed)
        self.public_key: bytes = bytes(self._signing.verify_key)
        self.public_hex = self.public_key.hex()

    def __repr__(self) -> str:  # never show the seed
        return f"Identity(public={self.public_hex[:16]}…)"

    @classmethod
    def generate(cls) -> Identity:
        return cls(secrets.token_bytes(32))

    @classmethod
    def load_or_create(cls, state_dir: Path) -> Identity:
        """Load ``state_dir/identity.key``, creating it (mode 0600) on first use."""
        return cls.load_or_create_file(Path(state_dir) / _KEY_FILE)

    @classmethod
    def load_or_create_file(cls, path: Path) -> Identity:
        """Load the key file ``path``, creating it (and its folder, 0700) on first use.

        Creation is atomic and never overwrites: two processes racing here end up with the
        same key. The file holds the 64-character hex seed and a newline, mode 0600. A node
        named by its id (``drift train --peer/--listen``) keeps its key in such a file.
        """
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if not path.exists():
            ident = cls.generate()
            tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(ident.seed.hex().encode() + b"\n")
                    f.flush()
                    os.fsync(f.fileno())
                try:
                    os.link(tmp, path)  # fails if another process created it meanwhile
                    log.info("identity created path=%s public=%s", path, ident.public_hex)
                except FileExistsError:
                    pass
            finally:
                tmp.unlink()
        return cls._load(path)

    @classmethod
    def _load(cls, path: Path) -> Identity:
        mode = stat.S_IMODE(path.stat().st_mode)
        if mode & 0o077:
            log.warning(
                "identity key readable by others path=%s mode=%o fix='chmod 600 %s'",
                path,
                mode,
                path,
            )
        raw = path.read_bytes()
        text = raw.strip()
        try:
            seed = bytes.fromhex(text.decode("ascii")) if len(text) == 64 else raw
        except (UnicodeDecodeError, ValueError):
            seed = raw
        if len(seed) != 32:
            raise AuthError(
                f"{path} is not an identity key (expected 64 hex characters); "
                "move it away to create a new identity (tokens issued with it stop working)"
            )
        return cls(seed)

    def sign(self, data: bytes) -> bytes:
        """The 64-byte Ed25519 signature of ``data``."""
        return self._signing.sign(data).signature


NODE_KEY_FILE = "node.key"  # a node's lasting key, in the user's lightning-drift folder


def node_key_path(key_file: str | Path | None = None) -> Path:
    """The key file of a node named by id: ``key_file``, else ``node.key`` in the user's
    lightning-drift folder (``fsutil.user_state_dir``)."""
    return Path(key_file) if key_file else user_state_dir() / NODE_KEY_FILE


def node_identity(key_file: str | Path | None = None) -> Identity:
    """The lasting key of a node that joins without a token (created on first use): the
    coordinator's ``--peers`` list names the node by its public half, its endpoint id."""
    return Identity.load_or_create_file(node_key_path(key_file))


@dataclass(frozen=True)
class Claims:
    v: int
    session: str
    coordinator: str  # the coordinator's EndpointTicket string
    role: str  # "node" | "observer"
    iat: float
    exp: float
    jti: str
    # How the coordinator is reached: "local" or "internet" ("": not said, an older token),
    # and its own relay URLs (none: iroh's). A node uses them unless told otherwise.
    mode: str = ""
    relays: tuple[str, ...] = ()


def _claims_bytes(claims: Claims) -> bytes:
    d = asdict(claims)
    for optional in ("mode", "relays"):  # left out when not said: older verifiers' shape
        if not d[optional]:
            del d[optional]
    return json.dumps(d, sort_keys=True, separators=(",", ":")).encode()


def _num(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _parse_claims(raw: bytes) -> Claims:
    try:
        d = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise AuthError(f"malformed token: claims are not JSON ({exc})") from None
    if not isinstance(d, dict):
        raise AuthError("malformed token: claims are not a JSON object")
    missing = [
        k for k in ("v", "session", "coordinator", "role", "iat", "exp", "jti") if k not in d
    ]
    if missing:
        raise AuthError(f"malformed token: claims lack {', '.join(missing)}")
    if not isinstance(d["v"], int) or isinstance(d["v"], bool) or d["v"] != TOKEN_VERSION:
        raise AuthError(
            f"malformed token: version {d['v']!r} is not supported (this build reads "
            f"v{TOKEN_VERSION}); upgrade lightning-drift"
        )
    for k in ("session", "coordinator", "role", "jti"):
        if not isinstance(d[k], str) or not d[k]:
            raise AuthError(f"malformed token: claim {k!r} must be a non-empty string")
    for k in ("iat", "exp"):
        if not _num(d[k]):
            raise AuthError(f"malformed token: claim {k!r} must be a number")
    mode = d.get("mode", "")
    if mode not in ("", *MODES):
        raise AuthError(f"malformed token: claim 'mode' must be one of {MODES}, got {mode!r}")
    relays = d.get("relays", [])
    if (
        not isinstance(relays, list)
        or len(relays) > MAX_RELAYS
        or not all(isinstance(r, str) and 0 < len(r) <= MAX_RELAY_URL for r in relays)
    ):
        raise AuthError(
            f"malformed token: claim 'relays' must be a list of at most {MAX_RELAYS} URLs"
        )
    return Claims(
        v=d["v"],
        session=d["session"],
        coordinator=d["coordinator"],
        role=d["role"],
        iat=float(d["iat"]),
        exp=float(d["exp"]),
        jti=d["jti"],
        mode=mode,
        relays=tuple(relays),
    )


def issue_token(
    identity: Identity,
    *,
    session: str,
    coordinator: str,
    role: str = "node",
    ttl_s: float = 86400,
    now: float,
    jti: str | None = None,
    mode: str = "",
    relays: Iterable[str] = (),
) -> str:
    """Sign an invitation for ``session`` at ``coordinator`` (a ticket), valid ``ttl_s`` from now.

    ``mode`` and ``relays``: how nodes reach the coordinator (see :class:`Claims`)."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if mode not in ("", *MODES):
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    if ttl_s <= 0:
        raise ValueError(f"ttl_s must be positive, got {ttl_s}")
    claims = Claims(
        v=TOKEN_VERSION,
        session=session,
        coordinator=coordinator,
        role=role,
        iat=float(now),
        exp=float(now + ttl_s),
        jti=jti or secrets.token_hex(8),
        mode=mode,
        relays=tuple(relays),
    )
    raw = _claims_bytes(claims)
    outer = {"claims": raw.decode(), "sig": b64url_encode(identity.sign(raw))}
    return b64url_encode(json.dumps(outer, separators=(",", ":")).encode())


def decode_token(token: str) -> tuple[Claims, bytes, bytes]:
    """Split a token into (claims, the exact signed claims bytes, signature). Checks nothing else.

    Raises ``AuthError("malformed token: ...")`` when it is not a token at all.
    """
    if not isinstance(token, str):
        raise AuthError(f"malformed token: expected a string, got {type(token).__name__}")
    token = token.strip()
    if not token:
        raise AuthError("malformed token: empty")
    outer_raw = _b64d(token, "the token")
    try:
        outer = json.loads(outer_raw)
    except (ValueError, UnicodeDecodeError):
        raise AuthError("malformed token: not a drift token (bad JSON inside)") from None
    if not isinstance(outer, dict) or set(outer) != {"claims", "sig"}:
        raise AuthError("malformed token: expected exactly the fields 'claims' and 'sig'")
    if not isinstance(outer["claims"], str) or not isinstance(outer["sig"], str):
        raise AuthError("malformed token: 'claims' and 'sig' must be strings")
    raw = outer["claims"].encode()
    sig = _b64d(outer["sig"], "the signature")
    if len(sig) != 64:
        raise AuthError(f"malformed token: signature is {len(sig)} bytes, expected 64")
    return _parse_claims(raw), raw, sig


def check_signature(raw: bytes, sig: bytes, public_key: bytes) -> None:
    """AuthError unless ``sig`` is ``public_key``'s Ed25519 signature of ``raw``; every
    verification a verifier does (a cached one does none) goes through here."""
    try:
        nacl.signing.VerifyKey(public_key).verify(raw, sig)
    except nacl.exceptions.BadSignatureError:
        raise AuthError(
            f"token signed by another key (expected {short_id(public_key.hex())}…, the signature "
            "does not match: the token was altered or issued by another coordinator); ask this "
            "coordinator for a new token"
        ) from None


def _check_claims(
    claims: Claims,
    *,
    now: float,
    session: str | None,
    roles: Iterable[str],
    allow_expired: bool = False,
) -> None:
    if session is not None and claims.session != session:
        raise AuthError(
            f"token is for session {claims.session}, this coordinator runs {session}; "
            "use a token issued for this session"
        )
    roles = tuple(roles)
    if claims.role not in roles:
        raise AuthError(
            f"token is for role {claims.role}, this connection needs {' or '.join(roles)}"
        )
    if now >= claims.exp and not allow_expired:
        raise AuthError(f"token expired at {_iso(claims.exp)}; ask the coordinator for a new one")
    if claims.iat > now + CLOCK_SKEW_S:
        raise AuthError(
            f"token issued in the future ({_iso(claims.iat)}, now {_iso(now)}); check the clocks"
        )


def verify_token(
    token: str,
    public_key: bytes,
    *,
    now: float,
    session: str | None = None,
    roles: Iterable[str] = ROLES,
    allow_expired: bool = False,
) -> Claims:
    """Return the claims of a token signed by ``public_key``, valid at ``now``; else ``AuthError``.

    Checks, in order: structure, signature, session, role, expiry, issue time. Revocation is
    the coordinator's business: see :class:`TokenVerifier`. ``allow_expired`` skips only the
    expiry check: for a node that is already a member of the session and reconnects (expiry
    limits who may join, not how long a member may stay).
    """
    claims, raw, sig = decode_token(token)
    check_signature(raw, sig, public_key)
    _check_claims(claims, now=now, session=session, roles=roles, allow_expired=allow_expired)
    return claims


class TokenVerifier:
    """The coordinator's gate: signature, expiry, session, role and revocation, with a cache.

    A verified token is remembered (bounded LRU-with-TTL) so that reconnecting nodes do not
    cost a signature check each time. The cache's clock is the ``now`` passed in, so this stays
    pure; expiry and revocation are rechecked on every call, so a cached entry never outlives
    its token's ``exp`` or its revocation.
    """

    def __init__(
        self,
        public_key: bytes,
        session: str,
        revoked: Iterable[str] = (),
        maxsize: int = 1024,
        ttl_s: float = CACHE_TTL_S,
    ) -> None:
        self.public_key = bytes(public_key)
        self.session = session
        self._revoked: set[str] = set(revoked)
        self._now = 0.0
        self._cache: cachetools.TTLCache[str, Claims] = cachetools.TTLCache(
            maxsize=maxsize, ttl=ttl_s, timer=lambda: self._now
        )

    def verify(
        self, token: str, *, now: float, role: str | None = None, allow_expired: bool = False
    ) -> Claims:
        """The token's claims if it admits ``role`` (any role when None) now; else ``AuthError``.

        ``allow_expired``: accept a token past its ``exp`` (everything else is still checked,
        revocation included); the coordinator uses it only for nodes that are already members.
        """
        self._now = max(self._now, now)
        roles = ROLES if role is None else (role,)
        if not isinstance(token, str):
            decode_token(token)  # raises the malformed-token AuthError
        key = token.strip()
        claims = self._cache.get(key)
        if claims is None:
            claims = verify_token(
                key,
                self.public_key,
                now=now,
                session=self.session,
                roles=roles,
                allow_expired=allow_expired,
            )
            self._cache[key] = claims
        else:
            _check_claims(
                claims, now=now, session=self.session, roles=roles, allow_expired=allow_expired
            )
        if claims.jti in self._revoked:
            raise AuthError(f"token revoked (jti {claims.jti}); ask the coordinator for a new one")
        return claims

    def revoke(self, jti: str) -> None:
        self._revoked.add(jti)


class TokenStore:
    """The coordinator's record of issued and revoked tokens: ``state_dir/tokens.json``.

    Only claims are stored, never the tokens themselves. Every change rewrites the file
    atomically, so a crash leaves the old or the new record, never half of one.
    """

    def __init__(self, state_dir: Path) -> None:
        self.path = self.file(state_dir)
        self._issued: list[Claims] = []
        self._revoked: set[str] = set()
        if self.path.exists():
            try:
                d = json.loads(self.path.read_text())
                self._issued = [
                    Claims(**{**c, "relays": tuple(c.get("relays", ()))})
                    for c in d.get("issued", [])
                ]
                self._revoked = set(d.get("revoked", []))
            except (ValueError, TypeError) as exc:
                raise AuthError(
                    f"{self.path} is corrupt ({exc}); restore it from a backup or remove it "
                    "(revocations in it are then forgotten)"
                ) from None

    @staticmethod
    def file(state_dir: Path) -> Path:
        """Where the record lives (a running coordinator watches it for revocations)."""
        return Path(state_dir) / _TOKENS_FILE

    def _save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        d = {"issued": [asdict(c) for c in self._issued], "revoked": sorted(self._revoked)}
        atomic_write(self.path, json.dumps(d, indent=1, sort_keys=True).encode(), mode=0o600)

    def record(self, claims: Claims) -> None:
        self._issued.append(claims)
        self._save()

    def revoke(self, jti: str) -> None:
        self._revoked.add(jti)
        self._save()

    def revoked(self) -> set[str]:
        return set(self._revoked)

    def issued(self) -> list[Claims]:
        return list(self._issued)


# -- where a node's token comes from -----------------------------------------------------------
#
# A token is a password: it is best given where no config file, command line or log sees it.
# Every entry point (DriftStrategy, `drift join`/`train`/`status`, LightningCLI programs) looks
# in the same places, in this order: what it was given (a token, or the path of a file holding
# one), then TOKEN_ENV (likewise), then the file TOKEN_FILE_ENV names.


def read_token_file(path: str | os.PathLike[str]) -> str:
    """The token in the file ``path`` (surrounding whitespace stripped); ConfigError saying
    what is wrong when it cannot be read or is empty."""
    try:
        text = Path(path).read_text().strip()
    except OSError as exc:
        raise ConfigError(
            f"cannot read the token file {path}: {exc.strerror or exc}; `drift-coord serve` "
            "writes one to STATE_DIR/node.token"
        ) from None
    if not text:
        raise ConfigError(f"the token file {path} is empty; copy STATE_DIR/node.token there")
    return text


def token_text(value: str) -> str:
    """A token given as itself, or as the path of a file holding it (tokens start ``eyJ``)."""
    value = value.strip()
    if value and not value.startswith("eyJ") and Path(value).is_file():
        return read_token_file(value)
    return value


def token_from_environment(environ: Any = None) -> str | None:
    """The token from the environment: ``DRIFT_TOKEN`` (a token or a file holding one), else
    the file ``DRIFT_TOKEN_FILE`` names; None when neither is set."""
    env = os.environ if environ is None else environ
    value = (env.get(TOKEN_ENV) or "").strip()
    if value:
        return token_text(value)
    path = (env.get(TOKEN_FILE_ENV) or "").strip()
    if path:
        return read_token_file(path)
    return None


__all__ = [
    "MASKED_TOKEN",
    "TOKEN_ENV",
    "TOKEN_FILE_ENV",
    "Claims",
    "Identity",
    "TokenStore",
    "TokenVerifier",
    "b64url_encode",
    "check_signature",
    "decode_token",
    "issue_token",
    "node_identity",
    "node_key_path",
    "read_token_file",
    "token_from_environment",
    "token_text",
    "verify_token",
]
