"""Sizes and durations as people write and read them. Pure: no I/O.

One home for turning ``"8GiB"`` or ``"7d"`` into numbers (options, config files) and bytes
into text (messages, the live view), so every message shows a size the same way.
"""

from __future__ import annotations

import math

from lightning_drift.errors import ConfigError

_DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, "w": 604800.0}
_SIZE_UNITS = {"k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def format_gib(n: int) -> str:
    """``n`` bytes in GiB with one decimal: ``"8.0 GiB"`` (the unit GPU memory is sold in)."""
    return f"{n / 2**30:.1f} GiB"


def parse_duration(text: str) -> float:
    """``"90s"``, ``"30m"``, ``"24h"``, ``"7d"`` or plain seconds → seconds."""
    t = text.strip().lower()
    try:
        value = (
            float(t[:-1]) * _DURATION_UNITS[t[-1]] if t and t[-1] in _DURATION_UNITS else float(t)
        )
    except ValueError:
        raise ConfigError(f"duration {text!r} is not like 90s, 30m, 24h or 7d") from None
    if value <= 0:
        raise ConfigError(f"duration {text!r} must be positive")
    return value


def parse_size(text: str | int) -> int:
    """``"8GiB"``, ``"512MiB"``, ``"8G"``, ``"8GB"`` or plain bytes → bytes.

    Binary (1024-based) multiples, as GPU memory is counted: ``8G`` = ``8GB`` = ``8GiB``."""
    if isinstance(text, int):
        value = float(text)
    else:
        t = text.strip().lower().removesuffix("ib").removesuffix("b")
        try:
            value = float(t[:-1]) * _SIZE_UNITS[t[-1]] if t and t[-1] in _SIZE_UNITS else float(t)
        except ValueError:
            raise ConfigError(
                f"size {text!r} is not like 8GiB, 512MiB or a number of bytes"
            ) from None
    if not math.isfinite(value) or value < 0:
        raise ConfigError(f"size {text!r} must be a finite number of bytes, not negative")
    return int(value)


__all__ = ["format_gib", "parse_duration", "parse_size"]
