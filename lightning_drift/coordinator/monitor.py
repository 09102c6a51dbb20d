"""The operator's view of a session: a rich table, plain log lines, or JSON.

``drift-coord serve`` refreshes :func:`render_table` live on a terminal and prints
:func:`render_lines` otherwise; ``drift-coord status`` and ``drift status`` render a
``SessionStatus`` fetched with an observer token the same way.

Every string a node chose (its name, its device's name) goes through :func:`safe_text` before
it is shown: a node must not be able to restyle or garble the operator's view.
"""

from __future__ import annotations

import json
import math
import re
import time

import msgspec
from rich.markup import escape
from rich.table import Table

from lightning_drift.protocol import NodeStatus, SessionStatus
from lightning_drift.units import format_gib

STATE_STYLE = {
    "training": "green",
    "barrier": "cyan",
    "ready": "yellow",
    "joined": "yellow",
    "lost": "red",
    "left": "dim",
}


_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def safe_text(text: str, limit: int = 64, *, markup: bool = True) -> str:
    """A node-provided string as it may be shown: control and bidi characters replaced, at
    most ``limit`` characters, and (``markup``: for rich tables) rich markup escaped."""
    text = _CONTROL.sub("?", str(text))
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return escape(text) if markup else text


def _vram(n: int) -> str:
    return format_gib(n) if n > 0 else "-"


def _used_peak(n: NodeStatus) -> str:
    if n.vram_used <= 0 and n.vram_peak <= 0:
        return "-"
    return f"{n.vram_used / 2**30:.1f}/{format_gib(max(n.vram_peak, n.vram_used))}"


def _loss(n: NodeStatus) -> str:
    if n.loss is None or not math.isfinite(n.loss):
        return "-" if n.loss is None else str(n.loss)
    return f"{n.loss:.4g}"


def _node_label(n: NodeStatus, markup: bool = True) -> str:
    node_id = safe_text(n.node_id, 8, markup=markup)
    return f"{safe_text(n.name, markup=markup)} ({node_id})" if n.name else node_id


def _title(st: SessionStatus) -> str:
    title = (
        f"session {safe_text(st.session_id)} · {safe_text(st.state)} · round {st.round} · epoch "
        f"{min(st.epoch + 1, st.epochs)}/{st.epochs} · {safe_text(st.aggregation)}"
    )
    if st.stop_reason:
        title += f" · stopping early: {safe_text(st.stop_reason, 200)}"
    return title


def _row(n: NodeStatus, markup: bool = True) -> list[str]:
    return [
        _node_label(n, markup),
        safe_text(n.device, markup=markup) if n.device else "-",
        _vram(n.vram_total),
        f"{n.share:.1%}" if n.share else "-",
        f"{n.samples_per_s:.1f}" if n.samples_per_s else "-",
        _loss(n),
        _used_peak(n),
        str(n.round),
        f"{n.barrier_wait_s:.1f}s" if n.barrier_wait_s else "-",
        safe_text(n.state, 16, markup=markup) + (" (asked to stop)" if n.stop_asked else ""),
    ]


COLUMNS = (
    "node",
    "device",
    "VRAM",
    "share",
    "samples/s",
    "loss",
    "VRAM used/peak",
    "round",
    "barrier wait",
    "state",
)
_RIGHT = ("share", "samples/s", "loss", "VRAM used/peak", "round")


def render_table(st: SessionStatus) -> Table:
    """One row per node: node, device, VRAM, share, samples/s, loss (its last report), VRAM
    used/peak (RAM for a CPU node), round, barrier wait, state."""
    table = Table(title=_title(st), caption=safe_text(st.checkpoint, 300) or None, expand=False)
    for col in COLUMNS:
        table.add_column(col, justify="right" if col in _RIGHT else "left")
    for n in st.nodes:
        row = _row(n)
        style = STATE_STYLE.get(n.state, "")
        row[-1] = f"[{style}]{row[-1]}[/]" if style else row[-1]
        table.add_row(*row)
    return table


def render_lines(st: SessionStatus, now: float | None = None) -> list[str]:
    """The same content as plain ``key=value`` log lines (for logs and non-terminals)."""
    stamp = time.strftime("%H:%M:%S", time.localtime(now if now is not None else time.time()))
    head = (
        f"{stamp} session={st.session_id} state={st.state} round={st.round} "
        f"epoch={min(st.epoch + 1, st.epochs)}/{st.epochs} aggregation={st.aggregation} "
        f"nodes={len(st.nodes)}"
    )
    if st.stop_reason:
        head += f" stop={_plain(st.stop_reason)}"
    out = [head]
    for n in st.nodes:
        node, device, vram, share, rate, loss, used_peak, arrived_round, wait, _ = _row(n, False)
        out.append(
            f"{stamp}   node={_plain(node)} device={_plain(device)} "
            f"vram={vram.replace(' ', '')} share={share} samples_per_s={rate} loss={loss} "
            f"vram_used_peak={used_peak.replace(' ', '')} round={arrived_round} "
            f"barrier_wait={wait} state={_plain(n.state)}"
            + (" stop_asked=yes" if n.stop_asked else "")
        )
    return out


def _plain(text: str) -> str:
    """One ``key=value`` token: no spaces."""
    return safe_text(text, 200, markup=False).replace(" ", "_")


def render_json(st: SessionStatus) -> str:
    """The status as indented JSON (the wire form of SessionStatus)."""
    return json.dumps(msgspec.to_builtins(st), indent=2, sort_keys=True)


__all__ = ["COLUMNS", "render_json", "render_lines", "render_table", "safe_text"]
