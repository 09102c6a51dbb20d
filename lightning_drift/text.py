"""Text from elsewhere made safe to show a person or write into a log line. Pure.

A node names itself, its devices and its errors; a coordinator names its session. None of it
may reach a terminal, a rich table or a log as it came: an escape sequence would drive the
operator's terminal, a newline would forge a log line, a megabyte would flood both.
:func:`clean_text` is the one place that makes such text safe; the trust boundary applies it
where a node's message enters the coordinator, and the views apply it again to everything they
show (``lightning_drift.coordinator.monitor.shown``).
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Sequence

_SPACES = re.compile(r"\s+")
_HEX64 = re.compile(r"[0-9a-f]{64}")


def clean_text(text: object, limit: int) -> str:
    """``text`` safe to show and log: control and format characters (ESC, newlines, bidi
    overrides, zero-width marks) become spaces or go, runs of whitespace become one space,
    and it is cut to ``limit`` characters (the last one an ellipsis when cut)."""
    s = text if isinstance(text, str) else str(text)
    if len(s) > 4 * limit + 4:  # no need to look at more than can be kept
        s = s[: 4 * limit + 4]
    out = []
    for ch in s:
        cat = unicodedata.category(ch)
        if cat in ("Cc", "Zl", "Zp"):
            out.append(" ")
        elif cat[0] == "C":  # Cf (format), Cs, Co, Cn
            continue
        else:
            out.append(ch)
    s = _SPACES.sub(" ", "".join(out)).strip()
    if len(s) > limit:
        s = s[: max(0, limit - 1)] + "…"
    return s


SHORT_ID = 8  # hex characters of a node id shown to a person: enough to tell nodes apart


def short_id(node: str) -> str:
    """The first characters of a node id (its endpoint key in hex), as logs and views show
    it. Ids are hex after the trust boundary, so the prefix needs no escaping."""
    return node[:SHORT_ID]


def is_hex64(value: object) -> bool:
    """``value`` is 64 lowercase hex digits, as every side writes a sha256 or a node id."""
    return isinstance(value, str) and _HEX64.fullmatch(value) is not None


def all_hex64(values: Sequence[object]) -> bool:
    """Every one of ``values`` passes :func:`is_hex64`, checked in one pass over them all: a
    commit's or an order's list of hashes, where one check per hash cost a thousand calls a
    round. The joined text must be hex and round-trip through ``bytes.fromhex`` unchanged
    (so lowercase, no spaces), and every value must be 64 characters long."""
    try:
        joined = "".join(values)  # type: ignore[arg-type]  # a value that is not text: False
    except TypeError:
        return False
    if not joined.isascii() or not set(map(len, values)) <= {64}:  # type: ignore[arg-type]
        return False
    try:
        return bytes.fromhex(joined).hex() == joined
    except ValueError:
        return False


__all__ = ["SHORT_ID", "all_hex64", "clean_text", "is_hex64", "short_id"]
