"""The project's exceptions: one small hierarchy, each message says what happened and what to do.

``DriftError`` is the root. Catch a subclass when you can act on it:

- ``ProtocolError``: the peer sent bytes that are not a valid ``drift/0`` frame or message.
- ``AuthError``: a token or a peer identity was refused (the reason is in the message).
- ``PeerLost``: the peer went away (closed, reset, timed out) while we were talking to it.
- ``TooSlow`` (a ``PeerLost``): the peer sent below the receiver's minimum byte rate.
- ``ConnectTimeout``: no connection could be made within the allowed time.
- ``SessionError``: the coordinator refused a request that is well-formed but not allowed now
  (dataset size mismatch, too little VRAM, session finished, ...).
- ``SessionFinished``: the coordinator said the session is over (its ``Finish``), so a
  request that waits for more training (the next epoch's shard) has no answer.
- ``ConfigError``: a local setting is wrong (bad flag, bad combination of Trainer options).
- ``PieceRefused``: a data-plane piece was not taken or not given: the member refused it or
  does not hold it, or the local store has no room for it (``code`` says which).
"""

from __future__ import annotations


class DriftError(Exception):
    """Root of every error raised by lightning_drift."""


class ProtocolError(DriftError):
    """The peer broke the wire protocol: truncated, oversized or malformed frame, unknown type."""


class BlobTooLarge(ProtocolError):
    """A blob header declared more bytes than the receiver accepts (refused before reading)."""

    def __init__(self, message: str, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class AuthError(DriftError):
    """A token or a peer was refused. The message names the reason (expired, forged, ...)."""


class PeerLost(DriftError):
    """The peer closed, reset or stopped answering the connection; the work in flight is lost."""


class TooSlow(PeerLost):
    """The peer sent too slowly: below the receiver's minimum byte rate, the stream is dropped.

    An honest peer on a slow link gets this too: its link is slower than the receiver
    accepts (``--min-upload-rate`` on the coordinator)."""


class ConnectTimeout(DriftError):
    """Dialing the coordinator did not succeed within the connect timeout."""


class SessionError(DriftError):
    """The session refused a well-formed request (bad dataset size, too little VRAM, finished)."""

    def __init__(self, message: str, code: str = "session") -> None:
        super().__init__(message)
        self.code = code


class SessionFinished(DriftError):
    """The coordinator said the session is over: there is no more training to wait for.

    ``final_round`` is the session's last completed round; ``sha256`` and ``checkpoint`` name
    the coordinated checkpoint of that round (empty when the coordinator did not say).
    """

    def __init__(self, final_round: int, sha256: str = "", checkpoint: str = "") -> None:
        super().__init__(f"session finished at round {final_round}")
        self.final_round = final_round
        self.sha256 = sha256
        self.checkpoint = checkpoint


class ConfigError(DriftError):
    """A local setting is wrong; the message says which and how to fix it."""


class PieceRefused(DriftError):
    """A piece of the sharded data plane was refused: the member it was pushed to did not take
    it (its reason is in the message), the member asked for it does not hold it
    (``no_piece``), or a store has no room for it (``store_full``)."""

    def __init__(self, message: str, code: str = "refused") -> None:
        super().__init__(message)
        self.code = code


__all__ = [
    "AuthError",
    "BlobTooLarge",
    "ConfigError",
    "ConnectTimeout",
    "DriftError",
    "PeerLost",
    "PieceRefused",
    "ProtocolError",
    "SessionError",
    "SessionFinished",
    "TooSlow",
]
