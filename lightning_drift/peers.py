"""Peers named by endpoint id: what a person types to name a node or a coordinator. Pure.

Every iroh endpoint is named by its Ed25519 public key, written as 64 hex characters. Where a
command takes a peer (``drift train --peer``, ``drift-coord serve --peers``) it takes one of:

- ``ID``: the id alone. In internet mode iroh finds the peer by its id (discovery); in local
  mode an id has no address, so it can only be waited for (the peer dials in), not dialled.
- ``ID@HOST:PORT``: the id and a direct address to dial (local mode, a LAN, a forwarded port).
- an endpoint ticket (``endpoint…``, what a listening node prints): the id, its addresses and
  its relay in one string; ``lightning_drift.transport`` decodes it.

Whichever form, the connection is authenticated by the key: a peer at that address that does
not hold the key is refused in the QUIC handshake.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from lightning_drift.errors import ConfigError

_HEX_ID = re.compile(r"[0-9a-fA-F]{64}")
_TICKET_PREFIX = "endpoint"


@dataclass(frozen=True)
class PeerName:
    """One peer as given (``text``, the id in lowercase): its id (``key_hex``; empty for a
    ticket until the transport decodes it) and where to dial it, if that was given (``addr``
    or ``ticket``)."""

    text: str
    key_hex: str = ""
    addr: str = ""  # "host:port" of the ID@HOST:PORT form
    ticket: str = ""

    @property
    def has_address(self) -> bool:
        """Whether this names where to dial the peer (not only who it is)."""
        return bool(self.addr or self.ticket)


def parse_peer(text: str) -> PeerName:
    """Read ``ID``, ``ID@HOST:PORT`` or a ticket; ConfigError saying which forms exist."""
    t = text.strip() if isinstance(text, str) else ""
    if t.lower().startswith(_TICKET_PREFIX):
        return PeerName(t, ticket=t)
    key, sep, addr = t.partition("@")
    if not _HEX_ID.fullmatch(key):
        raise ConfigError(
            f"peer {t[:40]!r} is not an endpoint id (64 hex characters), ID@HOST:PORT or an "
            "endpoint ticket; a node prints its id with `drift id` and its ticket when it "
            "listens"
        )
    if sep:
        host, colon, port = addr.rpartition(":")
        if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
            raise ConfigError(f"peer {t[:90]!r}: the address after @ must be HOST:PORT")
    key = key.lower()
    return PeerName(f"{key}@{addr}" if sep else key, key_hex=key, addr=addr)


def split_peers(values: Iterable[str]) -> list[str]:
    """``["A,B", "C"]`` → ``["A", "B", "C"]``: a flag may be repeated or take a comma list.
    Each is checked (:func:`parse_peer`); empty items are dropped."""
    out = []
    for value in values:
        for item in str(value).split(","):
            if item.strip():
                out.append(parse_peer(item).text)
    return out


__all__ = ["PeerName", "parse_peer", "split_peers"]
