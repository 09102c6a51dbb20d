"""Sizes and durations as people write them, and bytes as messages show them."""

from __future__ import annotations

import pytest

from lightning_drift.errors import ConfigError
from lightning_drift.units import format_gib, parse_duration, parse_size


def test_parse_duration():
    assert parse_duration("24h") == 86400 and parse_duration("90") == 90
    assert parse_duration("30m") == 1800 and parse_duration(" 7D ") == 7 * 86400
    with pytest.raises(ConfigError):
        parse_duration("soon")
    with pytest.raises(ConfigError, match="positive"):
        parse_duration("0s")


def test_parse_size_is_binary():
    assert parse_size("8GiB") == parse_size("8G") == parse_size("8gb") == 8 << 30
    assert parse_size("512MiB") == 512 << 20 and parse_size("1000") == 1000 and parse_size(7) == 7
    for bad in ("lots", "-1", "inf"):
        with pytest.raises(ConfigError):
            parse_size(bad)


def test_format_gib_has_one_decimal():
    assert format_gib(8 << 30) == "8.0 GiB" and format_gib(3 << 29) == "1.5 GiB"
    assert format_gib(0) == "0.0 GiB"
